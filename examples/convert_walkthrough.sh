#!/usr/bin/env bash
# Walk-through: from FasterDecoding/Medusa heads to vLLM, step by step.
#
#   make model                        # once: environment + the default model
#   bash examples/convert_walkthrough.sh
#
# Medusa heads are published in FasterDecoding's format (config.json +
# medusa_lm_head.safetensors). vLLM's own Medusa code expects another layout. With
# vllm-medusa installed, vLLM reads either; `vllm-medusa convert` writes the vLLM layout,
# checks it numerically, and can make a folder that stock vLLM (no plugin) loads too.
#
# Everything this script writes goes to a temporary folder, removed when it exits.
# Set MEDUSA_HEADS=DIR to walk through your own FasterDecoding heads for SmolLM2 instead.

set -euo pipefail

# Run from the repository root (where `make model` put models/ and .venv/).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ ! -x .venv/bin/vllm-medusa ]]; then
    echo "no .venv/bin/vllm-medusa: run 'make model' first" >&2
    exit 1
fi
# The project's environment first on PATH: `python` and `vllm-medusa` are the venv's.
export PATH="$PWD/.venv/bin:$PATH"
# vLLM on CPU is much slower without Intel's OpenMP runtime (installed by `make setup`).
if [[ -f "$PWD/.venv/lib/libiomp5.so" ]]; then
    export LD_PRELOAD="$PWD/.venv/lib/libiomp5.so"
fi

BASE=models/SmolLM2-135M-Instruct # the target model the heads were trained for
if [[ ! -f "$BASE/config.json" ]]; then
    echo "no $BASE: run 'make model' first" >&2
    exit 1
fi

WORK="$(mktemp -d "${TMPDIR:-/tmp}/medusa-walkthrough.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

step() { printf '\n=== %s\n' "$*"; }

# ---------------------------------------------------------------------------------------
step "(a) The heads shipped with vllm-medusa, in FasterDecoding's format"
# ---------------------------------------------------------------------------------------
# They live inside the installed package; default_heads_path() says where.
SRC="${MEDUSA_HEADS:-$(python -c 'from vllm_medusa.heads import default_heads_path; print(default_heads_path())')}"
if [[ ! -f "$SRC/config.json" ]]; then
    echo "no heads at $SRC (config.json missing)" >&2
    exit 1
fi
echo "SRC=$SRC"
ls -l "$SRC"
# config.json: FasterDecoding's keys (medusa_num_heads, medusa_num_layers, ...). "version": "2"
# means the heads reuse the base model's lm_head instead of carrying their own.
cat "$SRC/config.json"
echo
# The tensors, in FasterDecoding's names: {head}.{layer}.linear.weight/bias, and
# {head}.{num_layers}.weight for heads with their own lm_head.
python - "$SRC/medusa_lm_head.safetensors" <<'EOF'
import sys

from safetensors import safe_open

with safe_open(sys.argv[1], "pt") as f:
    for name in sorted(f.keys()):
        print(f"  {name:28s} {f.get_slice(name).get_shape()}")
EOF

# ---------------------------------------------------------------------------------------
step "(b) Convert to vLLM's Medusa layout, checked against the source"
# ---------------------------------------------------------------------------------------
# --base-model checks that hidden size and vocabulary match the target model and supplies
# its lm_head, so --verify can compare source and converted heads logit for logit. Nothing
# is written unless the check passes.
CONVERTED="$WORK/heads-vllm"
vllm-medusa convert "$SRC" "$CONVERTED" --base-model "$BASE" --verify
ls -l "$CONVERTED"
# config.json now says model_type "medusa", num_heads, num_hidden_layers, original_lm_head...
cat "$CONVERTED/config.json"
echo
# ...and the tensors are named blocks.{head}.layers.{layer}.weight/bias (+ lm_heads.{head}).
python - "$CONVERTED/model.safetensors" <<'EOF'
import sys

from safetensors import safe_open

with safe_open(sys.argv[1], "pt") as f:
    for name in sorted(f.keys()):
        print(f"  {name:28s} {f.get_slice(name).get_shape()}")
EOF

# ---------------------------------------------------------------------------------------
step "(c) A folder for stock vLLM, without the plugin: --embed-lm-head"
# ---------------------------------------------------------------------------------------
# Stock vLLM cannot share the target's lm_head with heads that reuse it, so --embed-lm-head
# stores a copy of it in the folder as lm_heads.0 (vocabulary x hidden: larger on disk).
# With vllm-medusa installed, the folder from (b) is the better choice: no copy.
# Heads that have their own lm_heads already load in stock vLLM: the flag is for reused ones.
ORIGINAL_LM_HEAD="$(python -c '
import sys, warnings
warnings.simplefilter("ignore")
from vllm_medusa.converters import load_checkpoint
print(load_checkpoint(sys.argv[1]).original_lm_head)' "$SRC")"
if [[ "$ORIGINAL_LM_HEAD" == "True" ]]; then
    STOCK="$WORK/heads-vllm-stock"
    vllm-medusa convert "$SRC" "$STOCK" --base-model "$BASE" --embed-lm-head --verify
    ls -l "$STOCK"
    # To check it really needs no plugin, load it with plugins disabled: VLLM_PLUGINS="" (an
    # empty allow-list) in front of an LLM(...) run like the one in (e).
else
    echo "these heads carry their own lm_heads: the folder from (b) already suits stock vLLM"
fi

# ---------------------------------------------------------------------------------------
step "(d) A conversion that fails: the output folder already exists"
# ---------------------------------------------------------------------------------------
# Errors are one line on stderr, saying what is wrong and what to do; exit status 2 means
# bad input (1: verification failed). Nothing is changed; --force would replace the folder.
status=0
vllm-medusa convert "$SRC" "$CONVERTED" --base-model "$BASE" 2>"$WORK/error.txt" || status=$?
echo "exit status: $status"
echo "stderr: $(cat "$WORK/error.txt")"
if [[ "$status" -ne 2 ]]; then
    echo "expected exit status 2" >&2
    exit 1
fi

# ---------------------------------------------------------------------------------------
step "(e) Greedy decoding with the converted heads in vLLM"
# ---------------------------------------------------------------------------------------
# The only Medusa-specific part of a vLLM program is speculative_config. Greedy output is
# exactly what the base model alone would produce; the heads only make it come faster.
# vLLM starts its engine in a spawned process that re-imports the main script, so the
# program must be a file (not stdin) and keep its work under a __main__ guard.
cat > "$WORK/generate.py" <<'EOF'
import sys

from vllm import LLM, SamplingParams

from vllm_medusa.metrics import spec_decode_stats


def main(base: str, heads: str) -> None:
    llm = LLM(
        model=base,
        speculative_config={"method": "medusa", "model": heads, "num_speculative_tokens": 4},
        dtype="float32",
        enforce_eager=True,
        kv_cache_memory_bytes=1 << 30,
        max_model_len=2048,
        disable_log_stats=False,  # keep the counters that spec_decode_stats reads
    )
    params = SamplingParams(temperature=0.0, max_tokens=32)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    output = llm.chat(messages, params, use_tqdm=False)[0].outputs[0]
    print(f"\n{len(output.token_ids)} tokens: {output.text!r}")
    stats = spec_decode_stats(llm)
    print(f"mean acceptance length: {stats.mean_acceptance_length:.2f} tokens per step")


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
EOF
python "$WORK/generate.py" "$BASE" "$CONVERTED"

step "Done. The temporary folder $WORK is removed now."

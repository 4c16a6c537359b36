"""`vllm-medusa calibrate`: measure the heads and this machine, then choose the tree and the
draft count per batch size that are fastest here, for the plugin to use by default.

1. Acceptance: an engine verifies a probe tree (every rank up to `--probe-ranks` at each
   depth, below the chain of best guesses) on held-out prompts, greedy; the debug records
   (`vllm_medusa.debug`) give, per head depth d and rank r, how often the rank-r token of head
   d was the target's when the path above it had been accepted. Where the heads' drafting
   settings add copy branches (`vllm_medusa.drafting`), the probe has them too, and the same
   records give what the branch adds to each tree size's accepted length.
2. Trees: for each size n, the n most probable paths (`tree.best_tree`). They are nested, so
   one tree in that order serves every size: its first n nodes are the best n-node tree.
3. Step cost: for each size n (0: no speculation) an engine with that tree and the heads'
   drafting settings (copy branches, pruning: as they will run) decodes batches of B
   requests; the decode time and the tokens vLLM counts as accepted give the time of a step.
   The engines are up at once and take turns round by round: on a machine whose speed drifts
   over minutes (shared cloud machines drift by a quarter), engines measured one after
   another would differ by the drift.
4. Choice: predicted tokens/s = B x expected acceptance length / step time. The expected
   length counts the heads' nodes that pruning keeps (as the probe records show) and the copy
   branch's gain, its drafts scaled by what the timed engines of step 3 accepted against that
   expectation, pooled (`acceptance_scale`).
   Per batch size the fastest n wins, but only if it beats no speculation by `--margin`.
   Each batch size's prefill time is recorded too: with the step times, it lets
   `vllm_medusa.prediction` predict a workload whose answers end at EOS (`vllm-medusa bench`).

The result is written beside the heads (`medusa_calibration.json`), with what it was
measured on; engines that name those heads and set no tree or schedule of their own use it
(`patches/speculative_config`).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from vllm_medusa.drafting import (
    CONFIG_KEY,
    DRAFTING_ENV,
    Drafting,
    DraftingError,
    configured_drafting,
)

CALIBRATION_FILE = "medusa_calibration.json"
# Prompt tokens of the long prompt that measures a step's cost per context token: long enough
# to stand out of the step times' noise (a 1,000-token context steps about 15 % slower than a
# 100-token one, float32, batch 1), short enough to leave room for the answer in 2,048.
LONG_PROMPT_TOKENS = 1024


def calibration_file(dtype: str, cpu_kind: str | None = None) -> str:
    """Where a calibration for `dtype` sits beside the heads: float32's in
    `medusa_calibration.json`, another dtype's in `medusa_calibration.DTYPE.json`, so that one
    heads folder serves engines of either dtype. With `cpu_kind` (see `cpu_kind`), one for that
    kind of CPU, kept beside the main one: `medusa_calibration.float32.avx2.json`."""
    if cpu_kind is not None:
        return f"medusa_calibration.{dtype}.{cpu_kind}.json"
    return CALIBRATION_FILE if dtype == "float32" else f"medusa_calibration.{dtype}.json"


FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin")
# Each calibration engine's KV cache: the timed engines of every tree size are up at once,
# and 16 requests of a prompt and 96 tokens need a fraction of this.
ENGINE_KV_CACHE_BYTES = 1 << 30
# vLLM caps a schedule's last range at the engine's max_num_seqs.
LAST_BATCH_SIZE = 1024
# CPU instruction sets that change what a step costs (vLLM's CPU kernels and oneDNN pick
# their code by them); the calibration records which of them its CPU had.
CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


class CalibrationError(ValueError):
    """A calibration file that cannot be used as written."""


@dataclass
class Calibration:
    heads_fingerprint: str  # see `heads_fingerprint`
    model: dict[str, Any]  # the target: architecture, hidden size, vocabulary, layers
    dtype: str  # the model's dtype in the engines measured, e.g. "float32"
    device: str  # "cpu", "cuda", ...
    machine: dict[str, Any]  # where it was measured, for the reader
    acceptance: list[list[float]]  # [depth][rank]: rate of the rank-r token of head d
    tree: list[list[int]]  # most probable paths first: its first n nodes are the best n-tree
    schedule: list[list[int]]  # [[first batch size, last batch size, draft nodes], ...]
    measurements: list[dict[str, Any]] = field(default_factory=list)
    # The heads' drafting settings the steps were measured with (`vllm_medusa.drafting`).
    drafting: dict[str, Any] | None = None
    # Drafts accepted per step in the timed engines over those the probe expects (see
    # `acceptance_scale`); predictions use the expected drafts times this.
    acceptance_scale: float = 1.0
    version: int = FORMAT_VERSION


def heads_fingerprint(heads_dir: str | os.PathLike) -> str:
    """What identifies a heads folder: its config and its weight files' names and sizes."""
    folder = Path(heads_dir)
    digest = hashlib.sha256()
    config = folder / "config.json"
    if config.is_file():
        digest.update(config.read_bytes())
    for path in sorted(folder.iterdir()):
        if path.suffix in WEIGHT_SUFFIXES:
            digest.update(f"{path.name}:{path.stat().st_size}".encode())
    return digest.hexdigest()[:16]


def model_identity(hf_config: Any) -> dict[str, Any]:
    return {
        "architecture": (getattr(hf_config, "architectures", None) or ["?"])[0],
        "hidden_size": int(hf_config.hidden_size),
        "vocab_size": int(hf_config.vocab_size),
        "num_layers": int(getattr(hf_config, "num_hidden_layers", 0)),
    }


def load_calibration(path: str | os.PathLike) -> Calibration:
    """Read and check a calibration file; CalibrationError names what is wrong."""
    from vllm_medusa.tree import TreeError, build_tree

    where = str(path)
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CalibrationError(
            f"Medusa calibration {where!r} cannot be read as JSON ({e}): "
            "run vllm-medusa calibrate again or delete the file"
        ) from None
    if not isinstance(data, dict) or data.get("version") != FORMAT_VERSION:
        raise CalibrationError(
            f"Medusa calibration {where!r} is not a version-{FORMAT_VERSION} calibration: "
            "run vllm-medusa calibrate again or delete the file"
        )
    try:
        calibration = Calibration(**data)
        tree = build_tree(calibration.tree, name="calibrated", ordered=True)
        _check_schedule(calibration.schedule, tree.num_nodes)
    except (TypeError, TreeError, ValueError) as e:
        raise CalibrationError(
            f"Medusa calibration {where!r} is malformed ({e}): "
            "run vllm-medusa calibrate again or delete the file"
        ) from None
    return calibration


def _check_schedule(schedule: Any, num_nodes: int) -> None:
    if not isinstance(schedule, list) or not schedule:
        raise ValueError("schedule must be a non-empty list of [first, last, drafts]")
    for entry in schedule:
        if (
            not isinstance(entry, list)
            or len(entry) != 3
            or not all(isinstance(v, int) for v in entry)
            or not 1 <= entry[0] <= entry[1]
            or not 0 <= entry[2] <= num_nodes
        ):
            raise ValueError(f"schedule entry {entry!r} is not [first, last, drafts <= tree]")


def mismatch(
    calibration: Calibration, heads_dir: str, model: dict[str, Any], dtype: str, device: str
) -> str | None:
    """Why this calibration does not describe these heads, model, dtype and device (None: it
    does)."""
    if calibration.heads_fingerprint != heads_fingerprint(heads_dir):
        return "the heads changed since it was measured"
    if calibration.model != model:
        return f"it was measured for another model ({calibration.model}, not {model})"
    if calibration.dtype != dtype:
        return f"it was measured in {calibration.dtype}, this engine runs {dtype}"
    if calibration.device != device:
        return f"it was measured on {calibration.device}, this engine runs on {device}"
    return None


def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


@functools.cache
def _cpu_flags() -> frozenset[str] | None:
    # Read once per process: engines check their calibration at every validation of their
    # speculative config.
    for line in _cpuinfo():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return None


def cpu_features() -> list[str] | None:
    """Which of `CPU_FEATURES` this CPU has (None where /proc/cpuinfo does not say)."""
    flags = _cpu_flags()
    return None if flags is None else [f for f in CPU_FEATURES if f in flags]


def cpu_kind(features: list[str]) -> str:
    """What names calibrations for a CPU with these `CPU_FEATURES`: the most capable of them."""
    return features[-1] if features else "generic"


def other_cpu(calibration: Calibration) -> str | None:
    """Why this CPU is not of the kind the calibration was measured on (None: it is, or the
    calibration does not say). Same-named CPUs differ: one "AMD EPYC" has AVX-512 with
    bfloat16, another AVX2 only, and a step's cost with N more tokens differs with them."""
    measured = calibration.machine.get("cpu_features")
    here = cpu_features()
    if calibration.device != "cpu" or measured is None or here is None or measured == here:
        return None
    return f"it was measured on a CPU with {_features(measured)}, this one has {_features(here)}"


def find_calibration(
    heads_dir: str | os.PathLike, dtype: str
) -> tuple[Path, Calibration, str | None] | None:
    """The calibration an engine of `dtype` with these heads reads, with why it was measured
    on another kind of CPU (None: on this kind): this dtype's file, else float32's (which
    `mismatch` sets aside); if that was measured on another kind of CPU, the heads' file for
    this kind, where they carry one. Only then, so that a user's own calibration in the main
    file wins once run here. None without a calibration file."""
    path = Path(heads_dir) / calibration_file(dtype)
    if not path.is_file():
        path = Path(heads_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    calibration = load_calibration(path)
    other = other_cpu(calibration)
    if other is not None:
        kind_path = Path(heads_dir) / calibration_file(dtype, cpu_kind(cpu_features()))
        if kind_path.is_file():
            path, calibration = kind_path, load_calibration(kind_path)
            other = other_cpu(calibration)
    return path, calibration, other


def _features(features: list[str]) -> str:
    return " ".join(features) if features else f"none of {' '.join(CPU_FEATURES)}"


def machine_description() -> dict[str, Any]:
    import torch

    cpu = platform.processor()
    for line in _cpuinfo():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {
        "cpu": cpu,
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "measured": time.strftime("%Y-%m-%d"),
    }


def probe_paths(depth: int, ranks: int) -> list[list[int]]:
    """Every rank below the chain of best guesses, at every depth: [r], [0, r], [0, 0, r]..."""
    return [[0] * d + [r] for d in range(depth) for r in range(ranks)]


def acceptance_from_records(
    records: list[dict[str, Any]], depth: int, ranks: int
) -> list[list[float]]:
    """[depth][rank] acceptance rates of the heads' nodes from debug records of one tree (0
    where untried). Nodes only a copy branch proposed are left out."""
    from vllm_medusa.debug import AcceptanceTable
    from vllm_medusa.tree import build_tree

    table = AcceptanceTable()
    for record in records:
        paths = [tuple(d["path"]) for d in record["drafted"] if d["path"] is not None]
        tree = build_tree([list(p) for p in paths])
        # The accepted path's stretch of heads' nodes, as nodes of `tree`.
        accepted = [tree.node(path) for path in _accepted_heads_stretch(record, 0.0)]
        table.add(tree, tree.num_nodes, accepted)
    return [[table.rate(d + 1, r) or 0.0 for r in range(ranks)] for d in range(depth)]


def _accepted_heads_stretch(record: dict[str, Any], prune_below: float) -> list[tuple[int, ...]]:
    """The paths of the accepted heads' nodes of one step, from the root, up to the first node
    only a copy branch proposed or that pruning at `prune_below` would have dropped (its path
    probability under the heads below the threshold, as `MedusaProposer.propose_trees`)."""
    stretch = []
    path_prob = 1.0
    drafted = record["drafted"]
    for node in record["accepted_nodes"]:
        draft = drafted[node - 1]
        if draft["path"] is None:
            break
        if prune_below > 0:
            path_prob *= draft["prob"] if draft.get("prob") is not None else 1.0
            if path_prob < prune_below:
                break
        stretch.append(tuple(draft["path"]))
    return stretch


def pruning_survival(
    records: list[dict[str, Any]], depth: int, ranks: int, prune_below: float
) -> list[list[float]]:
    """[depth][rank]: of the heads' nodes the target accepted, the share that pruning at
    `prune_below` keeps (1 where none was accepted). The probe drafts unpruned, so without this
    the expected length counts nodes that users' engines never draft."""
    kept = [[0] * ranks for _ in range(depth)]
    total = [[0] * ranks for _ in range(depth)]
    for record in records:
        unpruned = _accepted_heads_stretch(record, 0.0)
        survived = len(_accepted_heads_stretch(record, prune_below))
        for i, path in enumerate(unpruned):
            d, r = len(path) - 1, path[-1]
            if d < depth and r < ranks:
                total[d][r] += 1
                kept[d][r] += i < survived
    return [
        [k / t if t else 1.0 for k, t in zip(ks, ts, strict=True)]
        for ks, ts in zip(kept, total, strict=True)
    ]


def copy_gain(
    records: list[dict[str, Any]], paths: list[tuple[int, ...]], prune_below: float = 0.0
) -> float:
    """Mean tokens per step that a copy branch adds to a tree of `paths`: per step, how much
    longer the accepted run along the copy branch is than the accepted path's stretch inside
    the tree (after pruning at `prune_below`; 0 without copy branches)."""
    if not records:
        return 0.0
    tree = set(paths)
    gain = 0
    for record in records:
        drafted = record["drafted"]
        accepted = [drafted[n - 1] for n in record["accepted_nodes"]]
        copied = next((i for i, d in enumerate(accepted) if not d["copy"]), len(accepted))
        stretch = _accepted_heads_stretch(record, prune_below)
        inside = next((i for i, p in enumerate(stretch) if p not in tree), len(stretch))
        gain += max(0, copied - inside)
    return gain / len(records)


def acceptance_scale(
    expected: dict[tuple[int, int], float], measured: dict[tuple[int, int], dict[str, float]]
) -> float:
    """Accepted drafts per step that the timed engines measured, over those the probe's table
    expects, pooled over every batch size and tree size. The probe answers until EOS and the
    timed engines decode a fixed length, which accept differently; the table ranks trees, and
    this one factor, measured over every timed engine at once, sets the level (each engine's
    own count is too few steps to trust alone)."""
    drafts = [(expected[k] - 1.0, row["measured_acceptance"] - 1.0) for k, row in measured.items()]
    predicted = sum(e for e, _ in drafts)
    return sum(m for _, m in drafts) / predicted if predicted > 0 else 1.0


def choose_schedule(
    predicted: dict[tuple[int, int], float], batch_sizes: list[int], margin: float
) -> list[list[int]]:
    """Per measured batch size the draft count with the highest predicted tokens/s, if it
    beats no speculation (0 drafts) by `margin`; each holds up to the next batch size."""
    schedule = []
    sizes = sorted({n for _, n in predicted})
    for i, b in enumerate(sorted(batch_sizes)):
        best = max(sizes, key=lambda n: predicted[(b, n)])
        if predicted[(b, best)] < margin * predicted[(b, 0)]:
            best = 0
        last = sorted(batch_sizes)[i + 1] - 1 if i + 1 < len(batch_sizes) else LAST_BATCH_SIZE
        schedule.append([b, last, best])
    return schedule


@dataclass
class _Engine:
    """One calibration engine: the model, the heads with a given tree, or no speculation."""

    model: str
    heads: str
    dtype: str
    tree: list[list[int]] | None  # None: no speculation
    env: dict[str, str] = field(default_factory=dict)
    # Every drafting setting, in place of the heads' and the user's (empty: theirs).
    drafting: dict[str, Any] = field(default_factory=dict)

    def __enter__(self):
        from vllm import LLM

        from vllm_medusa.engine import engine_kwargs, medusa_config
        from vllm_medusa.tree import tree_setting

        spec = None
        if self.tree is not None:
            spec = medusa_config(self.heads, num_speculative_tokens=len(self.tree))
        env = dict(self.env)
        if self.drafting:
            env[DRAFTING_ENV] = json.dumps(self.drafting)
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        try:
            with tree_setting(json.dumps(self.tree) if self.tree else None):
                self.llm = LLM(
                    model=self.model,
                    speculative_config=spec,
                    **engine_kwargs(
                        dtype=self.dtype,
                        enable_prefix_caching=False,
                        kv_cache_memory_bytes=ENGINE_KV_CACHE_BYTES,
                    ),
                )
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return self.llm

    def __exit__(self, *exc):
        from vllm_medusa.engine import shutdown

        shutdown(self.llm)


def _chat(llm, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    """Seconds to answer `prompts` in one batch, greedy, exactly `max_tokens` tokens each,
    and the prompts' tokens."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params, use_tqdm=False)
    return time.perf_counter() - start, sum(len(o.prompt_token_ids) for o in outputs)


def probe_records(
    model: str,
    heads: str,
    dtype: str,
    drafting: Drafting,
    prompts: list[str],
    depth: int,
    ranks: int,
    tokens: int,
) -> list[dict[str, Any]]:
    """Debug records of the probe tree verified on `prompts`, greedy, with the copy branches
    `drafting` has, and no pruning (every probe node is tried)."""
    with tempfile.TemporaryDirectory() as tmp:
        records_path = Path(tmp) / "steps.jsonl"
        env = {"VLLM_MEDUSA_DEBUG_FILE": str(records_path)}
        probe = probe_paths(depth, ranks)
        unpruned = asdict(replace(drafting, prune_below=0.0))
        with _Engine(model, heads, dtype, probe, env, unpruned) as llm:
            from vllm import SamplingParams

            conversations = [[{"role": "user", "content": p}] for p in prompts]
            params = SamplingParams(temperature=0.0, max_tokens=tokens)
            llm.chat(conversations, params, use_tqdm=False)
        return [json.loads(line) for line in records_path.read_text().splitlines()]


def _long_prompt(llm, prompts: list[str], tokens: int) -> str:
    """The prompts joined, in turn and again, cut to about `tokens` tokens."""
    tokenizer = llm.get_tokenizer()
    parts: list[str] = []
    ids: list[int] = []
    while len(ids) < tokens:
        parts.append(prompts[len(parts) % len(prompts)])
        ids = tokenizer.encode("\n\n".join(parts), add_special_tokens=False)
    return tokenizer.decode(ids[:tokens])


def _time_batches(
    engines: dict[int, Any], batches: list[list[str]], tokens: int
) -> tuple[dict[int, float], dict[int, float], int]:
    """Per engine: seconds spent decoding `batches` (after their prefills) and prefilling
    them, and the batches' prompt tokens. Every engine runs each batch in turn, in an order
    rotated batch by batch, so that a machine whose speed drifts over minutes moves every
    engine alike. An engine's first call after another engine's long run is slower by about
    0.1 s (a 2-core CPU, float32), which no server answering its own requests pays: each turn
    starts with an untimed one-token request."""
    sizes = list(engines)
    decode = dict.fromkeys(sizes, 0.0)
    prefill = dict.fromkeys(sizes, 0.0)
    prompt_tokens = 0
    for i, batch in enumerate(batches):
        for n in sizes[i % len(sizes) :] + sizes[: i % len(sizes)]:
            _chat(engines[n], batch[:1], 1)
            first, batch_tokens = _chat(engines[n], batch, 1)
            prefill[n] += first
            decode[n] += max(_chat(engines[n], batch, tokens)[0] - first, 1e-6)
        prompt_tokens += batch_tokens
    return decode, prefill, prompt_tokens


def measure_steps(
    engines: dict[int, Any],
    batch_sizes: list[int],
    prompts: list[str],
    tokens: int,
    rounds: int,
    progress,
) -> dict[tuple[int, int], dict[str, float]]:
    """Per batch size B and engine of n draft nodes (0: no speculation): the time of one
    decode step with B requests, the decode tokens/s measured, the time of a prefill of B
    prompts with their tokens (`vllm_medusa.prediction` fits a line through these), and the
    context per request the steps had. Each round decodes B requests of `tokens` tokens (EOS
    ignored) after timing their prefill alone; rounds use different prompts.
    Then, at the smallest B, the same with one long prompt (`LONG_PROMPT_TOKENS`) per
    request: what a step costs more per request per context token (`context_ms_per_token`,
    the same in every row of an engine), for workloads whose prompts are longer than these.
    A request's decode steps are its decoded tokens less the drafts it accepted, which counts
    the steps where pruning left it nothing to draft as well."""
    from vllm_medusa.metrics import count_spec_decoding

    sizes = list(engines)
    counters = {n: count_spec_decoding(engines[n]) for n in sizes if n}

    def timed(batches: list[list[str]]) -> dict[int, dict[str, float]]:
        before = {n: replace(counters[n]) for n in sizes if n}
        decode, prefill, prompt_tokens = _time_batches(engines, batches, tokens)
        b = len(batches[0])
        decoded = len(batches) * b * (tokens - 1)  # each request's first token is prefill's
        rows = {}
        for n in sizes:
            accepted = counters[n].minus(before[n]).num_accepted_tokens if n else 0
            rows[n] = {
                "step_ms": 1000 * decode[n] / ((decoded - accepted) / b),
                "measured_tok_s": decoded / decode[n],
                "measured_acceptance": decoded / (decoded - accepted),
                "prefill_ms": 1000 * prefill[n] / len(batches),
                "prompt_tokens": prompt_tokens / len(batches),
                # A request's mean context over its decode steps.
                "context_tokens": prompt_tokens / len(batches) / b + tokens / 2,
            }
            progress.update(1)
        return rows

    results = {}
    for b in batch_sizes:
        batches = max(1, rounds // b)
        rows = timed(
            [[prompts[(i * b + j) % len(prompts)] for j in range(b)] for i in range(batches)]
        )
        results.update({(b, n): row for n, row in rows.items()})
    smallest = batch_sizes[0]
    # Room for the answer and the chat template's tokens in the engines' context.
    room = engines[sizes[0]].llm_engine.model_config.max_model_len - tokens - 64
    long_prompt = _long_prompt(engines[sizes[0]], prompts, min(LONG_PROMPT_TOKENS, room))
    long = timed([[long_prompt] * smallest] * max(1, rounds // 2))
    for n in sizes:
        short = results[(smallest, n)]
        longer = long[n]["context_tokens"] - short["context_tokens"]
        # Each of the `smallest` requests has the longer context.
        extra = (long[n]["step_ms"] - short["step_ms"]) / (smallest * longer) if longer > 0 else 0
        for b in batch_sizes:
            results[(b, n)]["context_ms_per_token"] = max(0.0, extra)
    return results


def calibrate(args: argparse.Namespace) -> Calibration:
    from tqdm import tqdm
    from transformers import AutoConfig

    from vllm_medusa.converters import load_checkpoint
    from vllm_medusa.distill import load_prompts
    from vllm_medusa.tree import best_tree, expected_acceptance_length

    config_file = Path(args.heads) / "config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    drafting = configured_drafting(config.get(CONFIG_KEY))  # bad settings: stop before engines
    heads = load_checkpoint(args.heads)
    depth = min(heads.num_heads, args.max_depth)
    split = "heldout" if args.prompts is None else None
    prompts = [p.turns[0] for p in load_prompts(args.prompts, split=split)][: args.num_prompts]
    batch_sizes = sorted(set(args.batch_sizes))
    sizes = sorted(set(args.sizes))
    # The probe, then each engine at each batch size and with long prompts.
    progress = tqdm(
        total=1 + (1 + len(sizes)) * (len(batch_sizes) + 1), desc="calibrating", unit="run"
    )

    records = probe_records(
        args.model,
        args.heads,
        args.dtype,
        drafting,
        prompts,
        depth,
        args.probe_ranks,
        args.max_tokens,
    )
    acceptance = acceptance_from_records(records, depth, args.probe_ranks)
    survival = pruning_survival(records, depth, args.probe_ranks, drafting.prune_below)
    progress.update(1)
    tree = best_tree(acceptance, max(sizes))
    with contextlib.ExitStack() as stack:
        engines = {
            n: stack.enter_context(
                _Engine(
                    args.model, args.heads, args.dtype, [list(p) for p in tree.paths[:n]] or None
                )
            )
            for n in [0, *sizes]
        }
        measured = measure_steps(
            engines, batch_sizes, prompts, args.max_tokens, args.rounds, progress
        )
    progress.close()

    # Per tree size, drafted as users' engines draft: pruned nodes add nothing, a copy branch
    # adds what it is accepted beyond the tree.
    by_size = {0: 1.0}
    for n in sizes:
        prefix = best_tree(acceptance, n)
        by_size[n] = expected_acceptance_length(acceptance, prefix, survival) + copy_gain(
            records, list(prefix.paths), drafting.prune_below
        )
    expected = {(b, n): by_size[n] for b, n in measured}
    scale = acceptance_scale(expected, measured)
    predicted = {}
    measurements = []
    for (b, n), row in sorted(measured.items()):
        length = 1.0 + scale * (expected[(b, n)] - 1.0)
        predicted[(b, n)] = b * length / (row["step_ms"] / 1000)
        measurements.append(
            {"batch_size": b, "draft_nodes": n, "expected_acceptance": expected[(b, n)],
             "predicted_tok_s": predicted[(b, n)], **row}
        )  # fmt: skip
    schedule = choose_schedule(predicted, batch_sizes, args.margin)
    nodes = max(1, max(n for _, _, n in schedule))
    return Calibration(
        heads_fingerprint=heads_fingerprint(args.heads),
        model=model_identity(AutoConfig.from_pretrained(args.model)),
        dtype=args.dtype,
        device="cpu",
        machine=machine_description(),
        acceptance=[[round(v, 4) for v in row] for row in acceptance],
        tree=[list(p) for p in tree.paths[:nodes]],
        schedule=schedule,
        measurements=measurements,
        drafting=asdict(drafting),
        acceptance_scale=round(scale, 4),
    )


def format_table(calibration: Calibration) -> str:
    """Predicted and measured tokens/s per batch size (rows) and tree size (columns)."""
    rows = calibration.measurements
    sizes = sorted({m["draft_nodes"] for m in rows})
    lines = ["batch  " + "  ".join(f"{'n=' + str(n):>15}" for n in sizes)]
    for b in sorted({m["batch_size"] for m in rows}):
        cells = []
        for n in sizes:
            m = next(m for m in rows if m["batch_size"] == b and m["draft_nodes"] == n)
            cells.append(f"{m['predicted_tok_s']:7.1f}/{m['measured_tok_s']:<7.1f}")
        lines.append(f"{b:>5}  " + "  ".join(cells))
    lines.append("(predicted/measured decode tokens/s; n = draft nodes per request, 0 = none)")
    lines.append(f"schedule [[first batch size, last, draft nodes]]: {calibration.schedule}")
    lines.append(f"tree: {calibration.tree}")
    return "\n".join(lines)


def write_plot(calibration: Calibration, path: Path) -> bool:
    """Predicted (dashed) and measured (solid) tokens/s against tree size, one colour per
    batch size. False where matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    figure, axes = plt.subplots(figsize=(7, 4.5))
    for b in sorted({m["batch_size"] for m in calibration.measurements}):
        rows = sorted(
            (m for m in calibration.measurements if m["batch_size"] == b),
            key=lambda m: m["draft_nodes"],
        )
        x = [m["draft_nodes"] for m in rows]
        line = axes.plot(x, [m["measured_tok_s"] for m in rows], marker="o", label=f"batch {b}")
        axes.plot(x, [m["predicted_tok_s"] for m in rows], "--", color=line[0].get_color())
    axes.set_xlabel("draft nodes per request (tree size)")
    axes.set_ylabel("decode tokens/s")
    axes.set_yscale("log")
    axes.set_title("measured (solid) and predicted (dashed)")
    axes.legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return True


def build_parser() -> argparse.ArgumentParser:
    from vllm_medusa.default_model import default_model_path
    from vllm_medusa.engine import default_dtype

    p = argparse.ArgumentParser(prog="vllm-medusa calibrate", description=__doc__.split("\n")[0])
    p.add_argument("--heads", required=True, help="Medusa heads folder")
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--prompts", help="JSON-lines prompts (default: the built-in held-out set)")
    p.add_argument(
        "--out",
        help=f"output file (default: HEADS/{CALIBRATION_FILE} for float32, "
        "HEADS/medusa_calibration.DTYPE.json for another --dtype)",
    )
    p.add_argument(
        "--dtype",
        default=default_dtype(),
        help="the dtype engines will run in (default: bfloat16 where the CPU has AVX512-BF16 "
        "or AMX, else float32; here %(default)s)",
    )
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 6, 8])
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=96,
        help="tokens per request measured (answers of chat length: shorter ones measured "
        "shorter contexts and more acceptance than served answers have)",
    )
    p.add_argument(
        "--rounds", type=int, default=4, help="requests per batch size: max(1, ROUNDS / B) batches"
    )
    p.add_argument("--probe-ranks", type=int, default=6)
    p.add_argument("--max-depth", type=int, default=4)
    p.add_argument("--margin", type=float, default=1.05)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    heads_dir = Path(args.heads)
    if not heads_dir.is_dir():
        print(f"vllm-medusa calibrate: heads folder {str(heads_dir)!r} does not exist")
        return 2
    if min(args.sizes) < 1 or min(args.batch_sizes) < 1:
        print("vllm-medusa calibrate: --sizes and --batch-sizes must be at least 1")
        return 2
    out = Path(args.out) if args.out else heads_dir / calibration_file(args.dtype)
    try:
        calibration = calibrate(args)
    except DraftingError as e:
        print(f"vllm-medusa calibrate: {e}")
        return 2
    # Written whole or not at all: a reader never sees half a file.
    partial = out.with_suffix(".json.partial")
    partial.write_text(json.dumps(asdict(calibration), indent=1))
    partial.replace(out)
    print(format_table(calibration))
    plot = out.with_suffix(".png")
    if write_plot(calibration, plot):
        print(f"plot: {plot}")
    else:
        print("plot: not written (install matplotlib for it)")
    print(f"calibration: {out}")
    return 0

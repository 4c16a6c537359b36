"""`vllm-medusa bench`: tokens/s and acceptance length, with and without Medusa.

Engines on the same prompts: no speculation, vLLM's built-in Medusa (this plugin disabled
through `VLLM_PLUGINS`), this plugin at the heads' defaults (`plugin`: their calibration, if
any), with a chain of k heads, and with a tree (`--tree`), each in its own process so that
one engine's plugin state or memory never touches another's. The engines are all up at once
and take turns, one at a time, batch size by batch size and run by run, so that a machine
whose speed drifts over minutes shifts every configuration alike. Batch size b means b requests
in flight: the prompts go in groups of b, one group after another (b=1: one prompt at a
time). `--spec-schedule` hands the plugin's chain and tree engines vLLM's
`num_speculative_tokens_per_batch_size`. Greedy runs' outputs are compared with the
no-speculation outputs. Sampled runs (`--temperatures 0.7 1.0`, with `--top-p`) are reported
apart from greedy ones, with the target's mean log-probability of the sampled tokens: the same
as without speculation (within sampling noise) when verification is exact; typical acceptance
(`plugin-chain-typical`, `plugin-tree-typical`, not run by default) raises it.

`plugin` runs whatever the heads do by default (their calibration, copy branches and pruning
if their config turns them on); `plugin-copy` the same with per-request drafting set by
`--drafting` (copy branches on by default); `plugin-chain` and `plugin-tree` are the heads
alone (no copy branch, no pruning). `--per-category N` takes the first N prompts of each
category of the prompt file (Spec-Bench has 13), and the greedy batch-1 runs report the mean
acceptance length per category.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_medusa.calibrate import find_calibration, mismatch, model_identity
from vllm_medusa.default_model import default_model_path
from vllm_medusa.drafting import DRAFTING_ENV, configured_drafting
from vllm_medusa.heads import default_heads_path
from vllm_medusa.prediction import StepTable, predicted_tok_s
from vllm_medusa.tree import TREE_ENV
from vllm_medusa.typical import TYPICAL_ENV

# "plugin": the heads with nothing but num_speculative_tokens, so a calibration beside them
# (vllm-medusa calibrate) decides.
DEFAULT_CONFIGS = (
    "none",
    "vllm-medusa-builtin",
    "plugin",
    "plugin-copy",
    "plugin-chain",
    "plugin-tree",
)
# Typical acceptance (not exact) on the plugin's chain and tree: VLLM_MEDUSA_TYPICAL=1.
CONFIGS = (*DEFAULT_CONFIGS, "plugin-chain-typical", "plugin-tree-typical")
# Each engine's KV cache: every configuration's engine is up at once, and 16 requests of a
# Spec-Bench prompt and 128 new tokens in float32 need about 0.6 GiB.
BENCH_KV_CACHE_BYTES = 1 << 30


def _worker(args: argparse.Namespace) -> int:
    """Serve one engine configuration: start it, then run the cells the parent names on stdin
    ("TEMPERATURE BATCH RUN", one per line; "exit" ends) and answer "done" on the control
    pipe after each; at exit, write the raw measurements as JSON."""
    from vllm import LLM, SamplingParams

    from vllm_medusa.distill import load_prompts
    from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown

    prompts = _select(load_prompts(args.prompts, split=args.split), args)
    categories = [p.category for p in prompts]
    conversations = [[{"role": "user", "content": p.turns[0]}] for p in prompts]
    spec = None if args.config == "none" else medusa_config(args.heads, args.k)
    if spec and args.spec_schedule and args.config.startswith("plugin-"):
        spec["num_speculative_tokens_per_batch_size"] = json.loads(args.spec_schedule)
    llm = LLM(
        model=args.model,
        speculative_config=spec,
        # Every configuration's engine stays up for the whole benchmark: a cache sized for
        # the benchmark's requests, not the default's 2 GiB each.
        **engine_kwargs(
            max_num_seqs=max(args.batch_sizes),
            dtype=args.dtype,
            kv_cache_memory_bytes=BENCH_KV_CACHE_BYTES,
            enforce_eager=not args.compiled,
        ),
    )
    llm.chat(conversations[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    control = os.fdopen(args.control_fd, "w")
    control.write("ready\n")
    control.flush()
    runs = []
    for line in sys.stdin:
        if line.strip() == "exit":
            break
        temperature, batch, run = line.split()
        record = _run_cell(
            llm, args, conversations, categories, float(temperature), int(batch), int(run)
        )
        runs.append(record)
        print(
            f"[{args.config}] temperature {temperature} batch {batch} run {run}: "
            f"{record['tokens'] / record['seconds']:.1f} tok/s",
            file=sys.stderr,
        )
        control.write("done\n")
        control.flush()
    shutdown(llm)
    Path(args.worker_out).write_text(json.dumps(runs))
    return 0


def _run_cell(
    llm,
    args: argparse.Namespace,
    conversations: list[list[dict]],
    categories: list[str],
    temperature: float,
    batch: int,
    run: int,
) -> dict:
    """Every prompt once, in groups of `batch` requests: seconds, tokens and what was
    accepted."""
    from vllm import SamplingParams

    from vllm_medusa.metrics import spec_decode_stats

    spec = args.config != "none"
    params = SamplingParams(
        temperature=temperature,
        top_p=args.top_p if temperature else 1.0,
        max_tokens=args.max_tokens,
    )
    # Every cell asks the same prompts: without this, a cell would find the prompts of the
    # cells before it in the prefix cache, which no user's new prompts do.
    llm.reset_prefix_cache()
    before = spec_decode_stats(llm) if spec else None
    # Greedy batch 1, first run: acceptance per prompt, summed per category.
    per_prompt = spec and batch == 1 and not temperature and run == 0
    per_category: dict[str, list[int]] = {}  # category -> [drafts, accepted]
    start = time.perf_counter()
    outputs = []
    for group in range(0, len(conversations), batch):
        chats = conversations[group : group + batch]
        if per_prompt:
            seconds_before = time.perf_counter()
            stats_before = spec_decode_stats(llm)
            # Reading the counters is not part of the timed work.
            start += time.perf_counter() - seconds_before
        outputs += llm.chat(chats, params, use_tqdm=False)
        if per_prompt:
            seconds_before = time.perf_counter()
            step = spec_decode_stats(llm).minus(stats_before)
            cell = per_category.setdefault(categories[group], [0, 0])
            cell[0] += step.num_drafts
            cell[1] += step.num_accepted_tokens
            start += time.perf_counter() - seconds_before
    seconds = time.perf_counter() - start
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    record = {
        "temperature": temperature,
        "batch": batch,
        "run": run,
        "seconds": seconds,
        "tokens": sum(len(t) for t in tokens),
        "token_ids": tokens,
        "prompt_tokens": [len(o.prompt_token_ids) for o in outputs],
        # Within a cell, prompts still share the chat template's opening from the cache.
        "cached_tokens": [o.num_cached_tokens or 0 for o in outputs],
    }
    if temperature:
        record["logprob_sum"] = _target_logprob_sum(llm, outputs)
    if spec:
        record["spec"] = spec_decode_stats(llm).minus(before).as_dict()
    if per_category:
        record["per_category"] = per_category
    return record


def _select(prompts: list, args: argparse.Namespace) -> list:
    """The first `--num-prompts` prompts, or the first `--per-category` of each category."""
    if not args.per_category:
        return prompts[: args.num_prompts]
    taken: dict[str, int] = {}
    chosen = []
    for prompt in prompts:
        if taken.get(prompt.category, 0) < args.per_category:
            taken[prompt.category] = taken.get(prompt.category, 0) + 1
            chosen.append(prompt)
    return chosen


def _target_logprob_sum(llm, outputs) -> float:
    """The target's total log-probability of the generated tokens (temperature 1, no top-p),
    scored afterwards as prompt logprobs of prompt + answer, outside the timed run."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    prompts = [
        TokensPrompt(prompt_token_ids=o.prompt_token_ids + list(o.outputs[0].token_ids))
        for o in outputs
    ]
    scored = llm.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    total = 0.0
    for output, score in zip(outputs, scored, strict=True):
        start = len(output.prompt_token_ids)
        tokens = score.prompt_token_ids[start:]
        total += sum(
            lp[t].logprob for t, lp in zip(tokens, score.prompt_logprobs[start:], strict=True)
        )
    return total


def _calibration_table(args: argparse.Namespace) -> StepTable | None:
    """The step times of the calibration that the `plugin` engine uses, if it uses one and
    it records what a prediction needs (see `vllm_medusa.prediction`)."""
    from transformers import AutoConfig
    from vllm.platforms import current_platform

    found = find_calibration(args.heads, args.dtype)
    if found is None:
        return None
    _, calibration, _ = found
    target = model_identity(AutoConfig.from_pretrained(args.model))
    device = current_platform.device_type
    if mismatch(calibration, args.heads, target, args.dtype, device) is not None:
        return None
    return StepTable.from_calibration(calibration)


def _predicted(table: StepTable, runs: list[dict], config: str) -> float:
    """The calibration's tokens/s for these runs' prompts and answers (median over runs)."""
    return statistics.median(
        predicted_tok_s(
            table,
            r["prompt_tokens"],
            [len(t) for t in r["token_ids"]],
            r["batch"],
            speculate=config == "plugin",
            cached_tokens=r.get("cached_tokens"),
        )
        for r in runs
    )


def _summarise(
    raw: dict[str, list[dict]],
    temperatures: list[float],
    batch_sizes: list[int],
    table: StepTable | None = None,
) -> list[dict]:
    """One row per (temperature, config, batch size); with the plugin's calibration's
    `table`, greedy rows of no speculation and of `plugin` carry what it predicts."""
    rows = []
    reference = {
        (r["temperature"], r["batch"], r["run"]): r["token_ids"] for r in raw.get("none", [])
    }
    baseline: dict[tuple[float, int], float] = {}
    for temperature, config, batch in itertools.product(temperatures, CONFIGS, batch_sizes):
        if config not in raw:
            continue
        key = (temperature, batch)
        runs = [r for r in raw[config] if (r["temperature"], r["batch"]) == key]
        rates = [r["tokens"] / r["seconds"] for r in runs]
        median = statistics.median(rates)
        if config == "none":
            baseline[key] = median
        row = {
            "config": config,
            "temperature": temperature,
            "batch": batch,
            "runs": len(runs),
            "tok_s_median": round(median, 2),
            "tok_s_min": round(min(rates), 2),
            "tok_s_max": round(max(rates), 2),
            "speedup": round(median / baseline[key], 3) if key in baseline else None,
            # Sampled outputs differ from run to run: only greedy ones are compared.
            "identical_to_none": all(
                r["token_ids"] == reference.get((temperature, batch, r["run"])) for r in runs
            )
            if reference and not temperature
            else None,
        }
        if table is not None and not temperature and config in ("none", "plugin"):
            row["predicted_tok_s"] = round(_predicted(table, runs, config), 2)
        if temperature:
            tokens = sum(r["tokens"] for r in runs)
            row["mean_logprob"] = round(sum(r["logprob_sum"] for r in runs) / tokens, 3)
        if runs and "spec" in runs[0]:
            drafts = sum(r["spec"]["num_drafts"] for r in runs)
            accepted = sum(r["spec"]["num_accepted_tokens"] for r in runs)
            row["mean_acceptance_length"] = round(1 + accepted / drafts, 3) if drafts else 0
        with_categories = [r for r in runs if "per_category" in r]
        if with_categories:
            row["acceptance_by_category"] = {
                category: round(1 + accepted / drafts, 3) if drafts else None
                for category, (drafts, accepted) in with_categories[0]["per_category"].items()
            }
        rows.append(row)
    return rows


def format_categories(rows: list[dict]) -> str:
    """Mean acceptance length per prompt category (greedy, batch 1), one column a config."""
    rows = [r for r in rows if "acceptance_by_category" in r]
    if not rows:
        return ""
    categories = list(rows[0]["acceptance_by_category"])
    lines = [
        "| category | " + " | ".join(r["config"] for r in rows) + " |",
        "|---|" + "---|" * len(rows),
    ]
    for category in categories:
        cells = [str(r["acceptance_by_category"].get(category, "-")) for r in rows]
        lines.append(f"| {category} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _prediction_cell(row: dict) -> str:
    if "predicted_tok_s" not in row:
        return "-"
    predicted = row["predicted_tok_s"]
    return f"{predicted:.1f} ({predicted / row['tok_s_median'] - 1:+.0%})"


def format_table(rows: list[dict]) -> str:
    lines = [
        "| config | temperature | batch | tok/s median | min-max | speedup | accept len "
        "| identical | mean logprob | predicted by calibration |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        identical = {None: "-", True: "yes", False: "NO"}[r["identical_to_none"]]
        lines.append(
            f"| {r['config']} | {r['temperature']} | {r['batch']} | {r['tok_s_median']:.1f} | "
            f"{r['tok_s_min']:.1f}-{r['tok_s_max']:.1f} | {speedup} | "
            f"{r.get('mean_acceptance_length', '-')} | {identical} | "
            f"{r.get('mean_logprob', '-')} | {_prediction_cell(r)} |"
        )
    return "\n".join(lines)


def _builtin_heads(heads: str, model: str, folder: Path) -> str:
    """vLLM's built-in Medusa cannot share the target's lm_head: give it a copy."""
    from vllm_medusa.converters import convert_checkpoint, load_checkpoint

    if not load_checkpoint(heads).original_lm_head:
        return heads
    out = folder / "builtin-heads"
    convert_checkpoint(heads, out, base_model=model, embed_lm_head=True)
    return str(out)


def build_parser() -> argparse.ArgumentParser:
    from vllm_medusa.engine import default_dtype

    p = argparse.ArgumentParser(prog="vllm-medusa bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(default_model_path()))
    p.add_argument("--heads", default=str(default_heads_path()))
    p.add_argument(
        "--prompts",
        default=None,
        help="JSON-lines prompts, e.g. Spec-Bench's question.jsonl "
        "(default: the built-in held-out prompts)",
    )
    p.add_argument(
        "--split",
        default=None,
        help="use only prompts of this split (default: heldout for the built-in set)",
    )
    p.add_argument("--num-prompts", type=int, default=8)
    p.add_argument(
        "--per-category",
        type=int,
        default=0,
        help="instead of --num-prompts: the first N prompts of each category",
    )
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument(
        "--temperatures",
        type=float,
        nargs="+",
        default=[0.0],
        help="0: greedy; above 0: sampled, reported apart (e.g. 0 0.7 1.0)",
    )
    p.add_argument("--top-p", type=float, default=0.9, help="top-p of sampled runs")
    p.add_argument(
        "--dtype",
        default=default_dtype(),
        help="the engines' dtype (default: bfloat16 where the CPU has AVX512-BF16 or AMX, "
        "else float32; here %(default)s)",
    )
    p.add_argument(
        "--compiled",
        action="store_true",
        help="compile the engines as vLLM does by default (`vllm serve` without "
        "--enforce-eager): a minute or two per engine start here; default: eager, as the "
        "project's commands run",
    )
    p.add_argument("-k", type=int, default=4, help="chain length (heads used by the chains)")
    p.add_argument(
        "--tree",
        default="[[0],[1],[2],[0,0],[1,0]]",
        help="tree for plugin-tree: a name, chain:K, a JSON list or a .json file "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--spec-schedule",
        default=None,
        help="JSON [[first batch, last batch, drafts], ...] for the plugin's engines: vLLM's "
        "num_speculative_tokens_per_batch_size (drafts count tree nodes; 0: none)",
    )
    p.add_argument(
        "--drafting",
        default='{"copy": true, "min_match": 2, "prune_below": 0.1}',
        help="per-request drafting of plugin-copy, as VLLM_MEDUSA_DRAFTING (default: %(default)s)",
    )
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(DEFAULT_CONFIGS))
    p.add_argument("--out", type=Path, default=Path("results/bench.json"))
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    p.add_argument("--control-fd", type=int, help=argparse.SUPPRESS)
    return p


def _worker_command(args: argparse.Namespace, config: str, heads: str, out: Path) -> list[str]:
    cmd = [
        sys.executable, "-m", "vllm_medusa.benchmark",
        "--config", config, "--worker-out", str(out), "--heads", heads, "--model", args.model,
        "--num-prompts", str(args.num_prompts), "--per-category", str(args.per_category),
        "--max-tokens", str(args.max_tokens), "--runs", str(args.runs), "-k", str(args.k),
        "--batch-sizes", *map(str, args.batch_sizes),
        "--temperatures", *map(str, args.temperatures),
        "--top-p", str(args.top_p), "--dtype", args.dtype,
    ]  # fmt: skip
    if args.spec_schedule:
        cmd += ["--spec-schedule", args.spec_schedule]
    if args.compiled:
        cmd.append("--compiled")
    if args.prompts:
        cmd += ["--prompts", args.prompts]
    if args.split:
        cmd += ["--split", args.split]
    return cmd


def _worker_env(args: argparse.Namespace, config: str) -> dict[str, str]:
    env = dict(os.environ)
    for name in (TREE_ENV, TYPICAL_ENV, DRAFTING_ENV):
        env.pop(name, None)
    if config == "vllm-medusa-builtin":
        env["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin: vLLM's own Medusa
    elif config.startswith("plugin-chain"):
        env[TREE_ENV] = f"chain:{args.k}"
    elif config.startswith("plugin-tree"):
        env[TREE_ENV] = args.tree
    if config.startswith(("plugin-chain", "plugin-tree")):
        env[DRAFTING_ENV] = json.dumps({"copy": False, "prune_below": 0})
    elif config == "plugin-copy":
        env[DRAFTING_ENV] = args.drafting
    if config.endswith("-typical"):
        env[TYPICAL_ENV] = "1"
    return env


class _Worker:
    """One configuration's engine in its own process (so that one engine's plugin state or
    memory never touches another's), idle until told to run a cell."""

    def __init__(self, args: argparse.Namespace, config: str, tmp: Path) -> None:
        heads = args.heads
        if config == "vllm-medusa-builtin":
            heads = _builtin_heads(args.heads, args.model, tmp)
        self.config = config
        self.out = tmp / f"{config}.json"
        read_fd, write_fd = os.pipe()
        cmd = _worker_command(args, config, heads, self.out) + ["--control-fd", str(write_fd)]
        self.process = subprocess.Popen(
            cmd, env=_worker_env(args, config), stdin=subprocess.PIPE, pass_fds=(write_fd,),
            text=True,
        )  # fmt: skip
        os.close(write_fd)
        self.control = os.fdopen(read_fd)
        self._expect("ready")

    def _expect(self, word: str) -> None:
        line = self.control.readline().strip()
        if line != word:
            self.process.kill()
            raise RuntimeError(f"benchmark engine {self.config!r} stopped (see its log above)")

    def run(self, temperature: float, batch: int, run: int) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(f"{temperature} {batch} {run}\n")
        self.process.stdin.flush()
        self._expect("done")

    def finish(self) -> list[dict]:
        assert self.process.stdin is not None
        self.process.stdin.write("exit\n")
        self.process.stdin.close()
        if self.process.wait() != 0:
            raise RuntimeError(f"benchmark engine {self.config!r} failed at exit")
        return json.loads(self.out.read_text())


def _run_alternated(args: argparse.Namespace, tmp: Path) -> dict[str, list[dict]]:
    """Every configuration's engine up at once, one running at a time, taking turns cell by
    cell (temperature, batch size, run), and each run in a rotated order: a machine whose
    speed drifts over minutes moves every configuration alike, instead of favouring
    whichever ran while it was fast."""
    workers: list[_Worker] = []
    try:
        for config in args.configs:
            workers.append(_Worker(args, config, tmp))
        for temperature, batch in itertools.product(args.temperatures, args.batch_sizes):
            for run in range(args.runs):
                shift = run % len(workers)
                for worker in workers[shift:] + workers[:shift]:
                    worker.run(temperature, batch, run)
        return {worker.config: worker.finish() for worker in workers}
    finally:
        for worker in workers:
            if worker.process.poll() is None:
                worker.process.kill()


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec_schedule:
        try:
            json.loads(args.spec_schedule)
        except json.JSONDecodeError as e:
            parser.error(f"--spec-schedule is not JSON ({e}): give e.g. '[[1, 1, 5], [2, 256, 0]]'")
    try:
        configured_drafting(None, {DRAFTING_ENV: args.drafting})
    except ValueError as e:
        parser.error(f"--drafting: {e}")
    if args.split is None and args.prompts is None:
        args.split = "heldout"
    if args.worker_out:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        raw = _run_alternated(args, Path(tmp))
    table = _calibration_table(args) if "plugin" in args.configs else None
    rows = _summarise(raw, args.temperatures, args.batch_sizes, table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {
        k: v
        for k, v in vars(args).items()
        if k not in ("config", "worker_out", "control_fd", "out")
    }
    # Per run, what a prediction needs, so that it can be worked out again from the file.
    runs = {
        config: [
            {
                k: r[k]
                for k in (
                    "temperature",
                    "batch",
                    "run",
                    "seconds",
                    "prompt_tokens",
                    "cached_tokens",
                )
            }
            | {"answer_tokens": [len(t) for t in r["token_ids"]]}
            for r in records
        ]
        for config, records in raw.items()
    }
    report = {"settings": settings, "results": rows, "runs": runs}
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_table(rows))
    print(format_categories(rows))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`vllm-medusa bench`: greedy tokens/s and acceptance length, with and without Medusa.

Engines on the same prompts: no speculation, vLLM's built-in Medusa (this plugin disabled
through `VLLM_PLUGINS`), this plugin with a chain of k heads, and this plugin with a tree
(`--tree`), each in its own process so that one engine's plugin state or memory never
touches another's. Batch size b means b requests in flight: the prompts go in groups of b,
one group after another (b=1: one prompt at a time). `--spec-schedule` hands the plugin's
engines vLLM's `num_speculative_tokens_per_batch_size`. Every run's outputs are compared
with the no-speculation outputs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vllm_medusa.default_model import default_model_path
from vllm_medusa.heads import default_heads_path
from vllm_medusa.tree import TREE_ENV

CONFIGS = ("none", "vllm-medusa-builtin", "plugin-chain", "plugin-tree")


def _worker(args: argparse.Namespace) -> int:
    """Run one engine configuration and write its raw measurements as JSON."""
    from vllm import LLM, SamplingParams

    from vllm_medusa.distill import load_prompts
    from vllm_medusa.engine import engine_kwargs, medusa_config, shutdown
    from vllm_medusa.metrics import spec_decode_stats

    prompts = [p.turns[0] for p in load_prompts(args.prompts, split=args.split)]
    prompts = prompts[: args.num_prompts]
    spec = None if args.config == "none" else medusa_config(args.heads, args.k)
    if spec and args.spec_schedule and args.config.startswith("plugin"):
        spec["num_speculative_tokens_per_batch_size"] = json.loads(args.spec_schedule)
    llm = LLM(
        model=args.model,
        speculative_config=spec,
        **engine_kwargs(max_num_seqs=max(args.batch_sizes)),
    )
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=False)
    conversations = [[{"role": "user", "content": p}] for p in prompts]
    llm.chat(conversations[:1], SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    runs = []
    for batch in args.batch_sizes:
        for run in range(args.runs):
            before = spec_decode_stats(llm) if spec else None
            start = time.perf_counter()
            outputs = []
            for group in range(0, len(conversations), batch):
                chats = conversations[group : group + batch]
                outputs += llm.chat(chats, params, use_tqdm=False)
            seconds = time.perf_counter() - start
            tokens = [list(o.outputs[0].token_ids) for o in outputs]
            record = {
                "batch": batch,
                "run": run,
                "seconds": seconds,
                "tokens": sum(len(t) for t in tokens),
                "token_ids": tokens,
            }
            if spec:
                record["spec"] = spec_decode_stats(llm).minus(before).as_dict()
            runs.append(record)
            print(
                f"[{args.config}] batch {batch} run {run}: {record['tokens'] / seconds:.1f} tok/s",
                file=sys.stderr,
            )
    shutdown(llm)
    Path(args.worker_out).write_text(json.dumps(runs))
    return 0


def _summarise(raw: dict[str, list[dict]], batch_sizes: list[int]) -> list[dict]:
    rows = []
    reference = {(r["batch"], r["run"]): r["token_ids"] for r in raw.get("none", [])}
    baseline: dict[int, float] = {}
    for config in CONFIGS:
        if config not in raw:
            continue
        for batch in batch_sizes:
            runs = [r for r in raw[config] if r["batch"] == batch]
            rates = [r["tokens"] / r["seconds"] for r in runs]
            median = statistics.median(rates)
            if config == "none":
                baseline[batch] = median
            row = {
                "config": config,
                "batch": batch,
                "runs": len(runs),
                "tok_s_median": round(median, 2),
                "tok_s_min": round(min(rates), 2),
                "tok_s_max": round(max(rates), 2),
                "speedup": round(median / baseline[batch], 3) if batch in baseline else None,
                "identical_to_none": all(
                    r["token_ids"] == reference.get((r["batch"], r["run"])) for r in runs
                )
                if reference
                else None,
            }
            if runs and "spec" in runs[0]:
                drafts = sum(r["spec"]["num_drafts"] for r in runs)
                accepted = sum(r["spec"]["num_accepted_tokens"] for r in runs)
                row["mean_acceptance_length"] = round(1 + accepted / drafts, 3) if drafts else 0
            rows.append(row)
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [
        "| config | batch | tok/s median | min-max | speedup | accept len | identical |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speedup = "" if r["speedup"] is None else f"{r['speedup']:.2f}x"
        identical = {None: "-", True: "yes", False: "NO"}[r["identical_to_none"]]
        lines.append(
            f"| {r['config']} | {r['batch']} | {r['tok_s_median']:.1f} | "
            f"{r['tok_s_min']:.1f}-{r['tok_s_max']:.1f} | {speedup} | "
            f"{r.get('mean_acceptance_length', '-')} | {identical} |"
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
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("-k", type=int, default=4, help="chain length (heads used by the chains)")
    p.add_argument(
        "--tree",
        default=None,
        help="tree for plugin-tree: a name, chain:K, a JSON list or a .json file "
        "(default: the heads' config.json medusa_choices)",
    )
    p.add_argument(
        "--spec-schedule",
        default=None,
        help="JSON [[first batch, last batch, drafts], ...] for the plugin's engines: vLLM's "
        "num_speculative_tokens_per_batch_size (drafts count tree nodes; 0: none)",
    )
    p.add_argument("--configs", nargs="+", choices=CONFIGS, default=list(CONFIGS))
    p.add_argument("--out", type=Path, default=Path("results/bench.json"))
    p.add_argument("--config", choices=CONFIGS, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.spec_schedule:
        try:
            json.loads(args.spec_schedule)
        except json.JSONDecodeError as e:
            parser.error(f"--spec-schedule is not JSON ({e}): give e.g. '[[1, 1, 5], [2, 256, 0]]'")
    if args.split is None and args.prompts is None:
        args.split = "heldout"
    if args.worker_out:
        return _worker(args)
    raw: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for config in args.configs:
            heads = args.heads
            env = dict(os.environ)
            env.pop(TREE_ENV, None)
            if config == "vllm-medusa-builtin":
                heads = _builtin_heads(args.heads, args.model, Path(tmp))
                env["VLLM_PLUGINS"] = ""  # an allow-list naming no plugin: vLLM's own Medusa
            elif config == "plugin-chain":
                env[TREE_ENV] = f"chain:{args.k}"
            elif config == "plugin-tree" and args.tree:
                env[TREE_ENV] = args.tree
            out = Path(tmp) / f"{config}.json"
            cmd = [
                sys.executable,
                "-m",
                "vllm_medusa.benchmark",
                "--config",
                config,
                "--worker-out",
                str(out),
                "--heads",
                heads,
                "--model",
                args.model,
                "--num-prompts",
                str(args.num_prompts),
                "--max-tokens",
                str(args.max_tokens),
                "--runs",
                str(args.runs),
                "-k",
                str(args.k),
                "--batch-sizes",
                *map(str, args.batch_sizes),
            ]
            if args.spec_schedule:
                cmd += ["--spec-schedule", args.spec_schedule]
            if args.prompts:
                cmd += ["--prompts", args.prompts]
            if args.split:
                cmd += ["--split", args.split]
            subprocess.run(cmd, env=env, check=True)
            raw[config] = json.loads(out.read_text())
    rows = _summarise(raw, args.batch_sizes)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k not in ("config", "worker_out", "out")}
    args.out.write_text(json.dumps({"settings": settings, "results": rows}, indent=2) + "\n")
    print(format_table(rows))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

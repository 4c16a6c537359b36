"""`vllm-medusa load`: the same mixed, concurrent request load against a Medusa server and a
server without speculation, every greedy output compared.

Requests mix completions and chat, streaming and not, prompt lengths (single prompts and
several joined), max_tokens from 1 to a few hundred and stop strings. They are drawn from a
seed, so both servers get exactly the same ones. Greedy decoding must give the same text and
token ids with and without Medusa; any difference, error or request left unsent makes the
command exit 1. Only loopback servers are accepted.

The servers take turns: the whole load goes to one, then the other, round after round in an
order that alternates (reference, Medusa, Medusa, reference, ...), and the speed ratio is the
median of the rounds'. Shared machines drift by a quarter over minutes; one server measured
minutes after the other would differ by the drift.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vllm_medusa.default_model import default_model_path
from vllm_medusa.heads import default_heads_path
from vllm_medusa.metrics import SpecDecodeStats

STOP_STRINGS = (("\n\n",), (".",), ("\n", "!"))


@dataclass(frozen=True)
class LoadRequest:
    index: int
    api: str  # "completion" or "chat"
    prompt: str
    max_tokens: int
    stream: bool
    stop: tuple[str, ...]


@dataclass
class LoadResult:
    index: int
    text: str | None = None
    token_ids: list[int] | None = None
    finish_reason: str | None = None
    num_tokens: int = 0
    latency_s: float = 0.0
    ttft_s: float | None = None  # streamed requests only
    error: str | None = None


@dataclass
class RunSummary:
    """What one server did with the whole load."""

    name: str
    requests: int
    completed: int
    errors: int
    not_sent: int
    output_tokens: int
    wall_s: float
    output_tok_s: float
    tpot_ms: float | None  # streamed requests: (latency - first token) / (tokens - 1)
    latency_per_token_ms: float | None  # all requests: latency / tokens
    spec_decode: dict[str, Any] | None = None
    first_errors: tuple[str, ...] = ()

    def line(self) -> str:
        tpot = f"{self.tpot_ms:.1f}" if self.tpot_ms is not None else "-"
        per_tok = f"{self.latency_per_token_ms:.1f}" if self.latency_per_token_ms else "-"
        text = (
            f"{self.name}: {self.completed}/{self.requests} completed, {self.errors} errors, "
            f"{self.not_sent} not sent, {self.output_tokens} output tokens in "
            f"{self.wall_s:.1f} s = {self.output_tok_s:.1f} tok/s, TPOT {tpot} ms, "
            f"latency per token {per_tok} ms"
        )
        if self.spec_decode and self.spec_decode["num_drafts"]:
            text += f", acceptance length {self.spec_decode['mean_acceptance_length']:.2f}"
        return text


# About 4 characters a token: prompts up to this length leave room for several hundred new
# tokens within the 2048-token context the servers here run with.
MAX_PROMPT_CHARS = 4000


def build_requests(
    prompts: list[str],
    num_requests: int,
    max_tokens: int,
    seed: int = 0,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
) -> list[LoadRequest]:
    """A deterministic mix: a third short answers (1-16 tokens), a third medium, a third up to
    max_tokens; a quarter of prompts are several prompts joined into one long one (up to
    max_prompt_chars; longer prompts are left out, a server would refuse them)."""
    prompts = [p for p in prompts if len(p) <= max_prompt_chars]
    if not prompts:
        raise ValueError(f"no prompt of at most {max_prompt_chars} characters")
    rng = random.Random(seed)
    requests = []
    for i in range(num_requests):
        prompt = rng.choice(prompts)
        if rng.random() < 0.25:
            prompt = "Answer each of these in turn.\n\n" + prompt
            for part in rng.sample(prompts, k=min(len(prompts), rng.randint(1, 3))):
                if len(prompt) + len(part) + 2 <= max_prompt_chars:
                    prompt += "\n\n" + part
        bucket = rng.random()
        if bucket < 0.1:
            tokens = 1
        elif bucket < 0.35:
            tokens = rng.randint(2, min(16, max_tokens))
        elif bucket < 0.7:
            tokens = rng.randint(1, min(64, max_tokens))
        else:
            tokens = rng.randint(1, max_tokens)
        requests.append(
            LoadRequest(
                index=i,
                api=rng.choice(("completion", "chat")),
                prompt=prompt,
                max_tokens=tokens,
                stream=rng.random() < 0.5,
                stop=rng.choice(STOP_STRINGS) if rng.random() < 0.3 else (),
            )
        )
    return requests


def choice_token_ids(choice: Any) -> list[int] | None:
    """Token ids of a response choice or stream chunk: vLLM's `token_ids` field, or, for chat
    stream chunks, which lack it, the logprob entries written as "token_id:N"."""
    ids = getattr(choice, "token_ids", None)
    if ids is not None:
        return list(ids)
    logprobs = getattr(choice, "logprobs", None)
    if logprobs is not None and getattr(logprobs, "content", None) is not None:
        return [int(entry.token.removeprefix("token_id:")) for entry in logprobs.content]
    return None


def greedy_kwargs(model: str, max_tokens: int, stream: bool, api: str) -> dict[str, Any]:
    """Greedy sampling with token ids in every answer, streamed or not."""
    extra: dict[str, Any] = {"return_token_ids": True}
    kwargs: dict[str, Any] = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }
    if stream:
        kwargs["stream_options"] = {"include_usage": True}
        if api == "chat":
            kwargs["logprobs"] = True
            kwargs["top_logprobs"] = 0
            extra["return_tokens_as_token_ids"] = True
    kwargs["extra_body"] = extra
    return kwargs


async def _send(client: Any, model: str, req: LoadRequest) -> LoadResult:
    """One request, greedy, with the token ids vLLM returns on request."""
    common = greedy_kwargs(model, req.max_tokens, req.stream, req.api)
    common["stop"] = list(req.stop) or None
    result = LoadResult(req.index)
    start = time.perf_counter()
    if req.api == "chat":
        messages = [{"role": "user", "content": req.prompt}]
        call = client.chat.completions.create(messages=messages, **common)
    else:
        call = client.completions.create(prompt=req.prompt, **common)
    if not req.stream:
        response = await call
        choice = response.choices[0]
        result.text = choice.message.content if req.api == "chat" else choice.text
        result.token_ids = choice_token_ids(choice)
        result.finish_reason = choice.finish_reason
        result.num_tokens = response.usage.completion_tokens
    else:
        stream = await call
        pieces: list[str] = []
        ids: list[int] | None = []
        async for chunk in stream:
            if chunk.usage is not None:
                result.num_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue
            choice = chunk.choices[0]
            piece = choice.delta.content if req.api == "chat" else choice.text
            if piece and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - start
            pieces.append(piece or "")
            chunk_ids = choice_token_ids(choice)
            if chunk_ids is None and piece:
                ids = None  # text without ids: compare text only
            elif chunk_ids is not None and ids is not None:
                ids.extend(chunk_ids)
            if choice.finish_reason is not None:
                result.finish_reason = choice.finish_reason
        result.text = "".join(pieces)
        result.token_ids = ids
        if not result.num_tokens and ids is not None:
            result.num_tokens = len(ids)
    result.latency_s = time.perf_counter() - start
    return result


async def run_load(
    base_url: str,
    requests: list[LoadRequest],
    concurrency: int = 16,
    time_limit_s: float = 1800.0,
    model: str | None = None,
) -> tuple[list[LoadResult], float]:
    """Send every request, at most `concurrency` at a time; returns results and wall time.

    A request still unsent when the time limit is reached is not sent; one in flight is cut
    off at the limit. Both show up as errors in its result.
    """
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=None)
    if model is None:
        model = (await client.models.list()).data[0].id
    gate = asyncio.Semaphore(concurrency)
    deadline = time.monotonic() + time_limit_s

    async def one(req: LoadRequest) -> LoadResult:
        async with gate:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return LoadResult(req.index, error="not sent: time limit reached")
            try:
                return await asyncio.wait_for(_send(client, model, req), remaining)
            except asyncio.TimeoutError:
                return LoadResult(req.index, error="cut off: time limit reached")
            except Exception as e:  # noqa: BLE001 - every failure is a result to report
                return LoadResult(req.index, error=f"{type(e).__name__}: {e}")

    start = time.perf_counter()
    try:
        results = await asyncio.gather(*(one(r) for r in requests))
    finally:
        await client.close()
    return list(results), time.perf_counter() - start


def summarize(
    name: str,
    results: list[LoadResult],
    wall_s: float,
    spec_decode: SpecDecodeStats | None = None,
) -> RunSummary:
    done = [r for r in results if r.error is None]
    not_sent = sum(1 for r in results if r.error and r.error.startswith("not sent"))
    tokens = sum(r.num_tokens for r in done)
    tpots = [
        (r.latency_s - r.ttft_s) / (r.num_tokens - 1)
        for r in done
        if r.ttft_s is not None and r.num_tokens > 1
    ]
    per_token = [r.latency_s / r.num_tokens for r in done if r.num_tokens > 0]
    errors = [f"request {r.index}: {r.error}" for r in results if r.error]
    return RunSummary(
        name=name,
        requests=len(results),
        completed=len(done),
        errors=len(errors) - not_sent,
        not_sent=not_sent,
        output_tokens=tokens,
        wall_s=wall_s,
        output_tok_s=tokens / wall_s if wall_s > 0 else 0.0,
        tpot_ms=1000 * sum(tpots) / len(tpots) if tpots else None,
        latency_per_token_ms=1000 * sum(per_token) / len(per_token) if per_token else None,
        spec_decode=spec_decode.as_dict() if spec_decode is not None else None,
        first_errors=tuple(errors[:5]),
    )


def mismatch(ref: LoadResult, got: LoadResult) -> str | None:
    """How a greedy output differs from the reference's, or None if it does not."""
    if ref.text != got.text:
        return f"request {ref.index}: text {got.text!r} != reference {ref.text!r}"
    if ref.token_ids is not None and got.token_ids is not None and ref.token_ids != got.token_ids:
        return f"request {ref.index}: token ids differ from the reference's"
    if ref.finish_reason != got.finish_reason:
        return f"request {ref.index}: finish {got.finish_reason} != {ref.finish_reason}"
    return None


def mismatches(reference: list[LoadResult], candidate: list[LoadResult]) -> list[str]:
    """Differences between requests both servers completed."""
    diffs = (
        mismatch(ref, got)
        for ref, got in zip(reference, candidate, strict=True)
        if ref.error is None and got.error is None
    )
    return [d for d in diffs if d is not None]


def load_prompt_texts(path: str | None) -> list[str]:
    """First turns of a JSON-lines prompt file; by default the package's held-out prompts."""
    from vllm_medusa.distill import load_prompts

    prompts = load_prompts(path, split="heldout" if path is None else None)
    return [p.turns[0] for p in prompts]


async def _measured_run(
    name: str, base_url: str, requests: list[LoadRequest], args: argparse.Namespace
) -> tuple[list[LoadResult], RunSummary]:
    from vllm_medusa.server import spec_decode_metrics

    root = base_url.rsplit("/v1", 1)[0]
    before = spec_decode_metrics(root)
    results, wall = await run_load(base_url, requests, args.concurrency, args.time_limit)
    stats = spec_decode_metrics(root).minus(before)
    return results, summarize(name, results, wall, stats if stats.num_drafts else None)


def _speculative_config(args: argparse.Namespace) -> dict[str, Any]:
    if args.speculative_config:
        return json.loads(args.speculative_config)
    return {
        "method": "medusa",
        "model": str(args.heads),
        "num_speculative_tokens": args.num_speculative_tokens,
    }


def turn_order(rounds: int) -> list[str]:
    """Which server takes each turn: reference first, then each round starts with the server
    that ended the one before (reference, medusa, medusa, reference, ...)."""
    order = []
    for i in range(rounds):
        pair = ["reference", "medusa"]
        order += pair if i % 2 == 0 else pair[::-1]
    return order


def _run_both(args: argparse.Namespace, requests: list[LoadRequest]) -> dict[str, Any]:
    """Every round sends the whole load to each server in turn, one server at a time so that
    neither competes for cores; both are up throughout (the idle one waits on its socket)."""
    from vllm_medusa.server import check_loopback, running_server

    urls = {"reference": args.reference_url, "medusa": args.medusa_url}
    runs: dict[str, list[tuple[list[LoadResult], RunSummary]]] = {n: [] for n in urls}
    with contextlib.ExitStack() as stack:
        for name, url in urls.items():
            if url is not None:
                urls[name] = check_loopback(url)
                continue
            config = _speculative_config(args) if name == "medusa" else None
            log = Path(args.log_dir) / f"{name}-server.log"
            print(f"starting the {name} server (log: {log})", file=sys.stderr)
            urls[name] = stack.enter_context(running_server(args.model, log, config)).base_url
        for turn, name in enumerate(turn_order(args.rounds)):
            label = f"{name} (round {turn // 2 + 1})" if args.rounds > 1 else name
            runs[name].append(asyncio.run(_measured_run(label, urls[name], requests, args)))
    reference = runs["reference"][0][0]
    diffs = [
        f"{summary.name}: {diff}"
        for results, summary in runs["reference"][1:] + runs["medusa"]
        for diff in mismatches(reference, results)
    ]
    ratios = [
        med.output_tok_s / ref.output_tok_s
        for (_, ref), (_, med) in zip(runs["reference"], runs["medusa"], strict=True)
        if ref.output_tok_s > 0
    ]
    return {
        "reference": [summary for _, summary in runs["reference"]],
        "medusa": [summary for _, summary in runs["medusa"]],
        "speedup": statistics.median(ratios) if ratios else None,
        "round_speedups": ratios,
        "mismatches": diffs,
        "results": {name: [asdict(r) for r in res[0][0]] for name, res in runs.items()},
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vllm-medusa load", description=__doc__)
    p.add_argument("--prompts", default=None, help="JSON-lines prompts (default: held-out)")
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=300, help="largest max_tokens drawn")
    p.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="whole loads per server, the servers taking turns; the speed ratio is the "
        "median of the rounds'",
    )
    p.add_argument("--time-limit", type=float, default=1800.0, help="seconds per server run")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--medusa-url", default=None, help="running Medusa server, .../v1")
    p.add_argument("--reference-url", default=None, help="running server without speculation")
    p.add_argument("--model", type=Path, default=default_model_path(), help="to start servers")
    p.add_argument("--heads", type=Path, default=default_heads_path())
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--speculative-config", default=None, help="JSON, replaces --heads")
    p.add_argument("--log-dir", default="results/load", help="server logs when started here")
    p.add_argument("--json", type=Path, default=None, help="write summaries and outputs here")
    return p


def check_args(args: argparse.Namespace) -> None:
    if min(args.num_requests, args.concurrency, args.max_tokens, args.rounds) < 1:
        raise ValueError(
            "--num-requests, --concurrency, --max-tokens and --rounds must be at least 1"
        )
    if args.time_limit <= 0:
        raise ValueError("--time-limit must be positive")
    for url in (args.medusa_url, args.reference_url):
        if url is not None:
            from vllm_medusa.server import check_loopback

            check_loopback(url)
    if args.medusa_url is None and not (args.speculative_config or args.heads.is_dir()):
        raise ValueError(f"heads folder {str(args.heads)!r} does not exist: pass --heads DIR")
    needs_model = args.medusa_url is None or args.reference_url is None
    if needs_model and not (args.model / "config.json").is_file():
        raise ValueError(
            f"model folder {str(args.model)!r} has no config.json: pass --model DIR "
            "or run `vllm-medusa prepare-model`"
        )


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_args(args)
        prompts = load_prompt_texts(args.prompts)
        requests = build_requests(prompts, args.num_requests, args.max_tokens, args.seed)
        report = _run_both(args, requests)
    except (ValueError, RuntimeError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"vllm-medusa load: error: {e}", file=sys.stderr)
        return 2
    summaries = report["reference"] + report["medusa"]
    for summary in summaries:
        print(summary.line())
        for err in summary.first_errors:
            print(f"  {err}")
    if report["speedup"] is not None:
        rounds = ", ".join(f"{r:.2f}x" for r in report["round_speedups"])
        print(
            f"medusa / reference output tok/s: {report['speedup']:.2f}x "
            f"(median of {len(report['round_speedups'])} rounds: {rounds})"
        )
    diffs = report["mismatches"]
    print(f"greedy outputs compared: {len(diffs)} mismatches")
    for diff in diffs[:10]:
        print(f"  {diff}")
    if args.json is not None:
        out = {
            **{k: [asdict(s) for s in report[k]] for k in ("reference", "medusa")},
            **{k: report[k] for k in ("speedup", "round_speedups", "mismatches", "results")},
        }
        args.json.write_text(json.dumps(out, indent=1))
    failed = len(diffs) + sum(s.errors + s.not_sent for s in summaries)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

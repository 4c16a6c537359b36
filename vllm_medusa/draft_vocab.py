"""Draft vocabulary: the tokens the heads may propose, the ones the target says most often.

Every step the heads project their states onto the vocabulary, which reads a [vocab, hidden]
matrix: for SmolLM2 49,152 x 576, a fifth of the model's parameters, read for a handful of
rows (about 4.7 ms of a 50 ms float32 step on this project's CPU, 2.9 ms of bfloat16's).
Restricted to the K tokens the target uses most in its own answers, the projection reads K
rows (0.6 ms at K = 8192 in float32, 0.17 ms in bfloat16). A token outside them is never
drafted, which costs acceptance only where the target says a rare token; verification still
uses the target's full vocabulary, so output does not change (vLLM's own Medusa calls such a
list `token_map`).

The ranking is counted from the target's greedy answers to training prompts (self-distilled
text, as the heads are trained on) and kept beside the heads in `medusa_draft_vocab.json`;
`vllm-medusa train` writes it, `vllm-medusa draft-vocab` writes it for heads made elsewhere.
How many tokens to use is the drafting setting `draft_vocab` (0: the whole vocabulary).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

DRAFT_VOCAB_FILE = "medusa_draft_vocab.json"
COVERAGE_SIZES = (1024, 2048, 4096, 8192)


class DraftVocabError(ValueError):
    """A draft vocabulary that cannot be used as asked."""


def rank_tokens(answers: Iterable[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Token ids seen in `answers`, most frequent first (ties by id), and their counts."""
    counts: dict[int, int] = {}
    for answer in answers:
        for token in answer:
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts, key=lambda token: (-counts[token], token))
    return ranked, [counts[token] for token in ranked]


def coverage(
    ranked: Sequence[int], answers: Iterable[Sequence[int]], sizes: Sequence[int]
) -> dict[int, float]:
    """{size: share of the tokens of `answers` among the first `size` of `ranked`}."""
    tokens = [token for answer in answers for token in answer]
    if not tokens:
        return {}
    position = {token: i for i, token in enumerate(ranked)}
    unseen = len(tokens) + max(sizes)  # a token the ranking lacks is beyond every size
    ranks = torch.tensor([position.get(token, unseen) for token in tokens])
    return {size: round(float((ranks < size).float().mean()), 4) for size in sizes}


def write_draft_vocab(
    heads_dir: str | os.PathLike,
    ranked: Sequence[int],
    counts: Sequence[int],
    source: dict[str, Any],
) -> Path:
    """Write the ranking beside the heads, whole or not at all."""
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    record = {**source, "token_ids": list(ranked), "counts": list(counts)}
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".draft_vocab.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(record, f)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)
    return path


def load_draft_vocab(heads_dir: str | os.PathLike, size: int, vocab_size: int) -> torch.Tensor:
    """The first `size` tokens of the heads' ranking (all of them where it holds fewer), as
    sorted token ids [K] long."""
    path = Path(heads_dir) / DRAFT_VOCAB_FILE
    if not path.is_file():
        raise DraftVocabError(
            f"draft_vocab={size} but {os.fspath(heads_dir)!r} has no {DRAFT_VOCAB_FILE}: "
            f"run `vllm-medusa draft-vocab --heads {os.fspath(heads_dir)}`, or set "
            'medusa_drafting {"draft_vocab": 0} to draft from the whole vocabulary'
        )
    try:
        ranked = json.loads(path.read_text())["token_ids"]
        ids = torch.tensor(ranked[:size], dtype=torch.long)
    except (ValueError, KeyError, TypeError) as e:
        raise DraftVocabError(
            f"{path}: not a draft vocabulary ({e}): write it again with `vllm-medusa draft-vocab`"
        ) from None
    if ids.ndim != 1 or ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise DraftVocabError(
            f"{path}: token ids outside the target's vocabulary of {vocab_size}: it was made "
            "for another model; write it again with `vllm-medusa draft-vocab`"
        )
    return ids.sort().values


def answer_tokens(targets: torch.Tensor) -> list[list[int]]:
    """Training rows' next tokens ([rows, 1 + heads], -1 past an answer's end) as one list:
    every answer token once."""
    column = targets[:, 0]
    return [column[column >= 0].tolist()]


def build_parser() -> argparse.ArgumentParser:
    from vllm_medusa.default_model import default_model_path

    p = argparse.ArgumentParser(
        prog="vllm-medusa draft-vocab",
        description="Rank the tokens the target says most often in its own answers to "
        f"training prompts, written beside the heads ({DRAFT_VOCAB_FILE}), so that the heads "
        "draft from the most frequent ones (drafting setting draft_vocab).",
    )
    p.add_argument("--heads", type=Path, required=True, help="Medusa heads folder")
    p.add_argument("--model", type=Path, default=default_model_path(), help="target model")
    p.add_argument("--prompts", default=None, help="JSON-lines prompts (default: built-in)")
    p.add_argument("--max-tokens", type=int, default=256, help="answer length")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not (args.heads / "config.json").is_file():
        print(
            f"vllm-medusa draft-vocab: error: {args.heads} has no config.json: "
            "name a Medusa heads folder",
            file=sys.stderr,
        )
        return 2
    from vllm import LLM

    from vllm_medusa.distill import generate_answers, load_prompts
    from vllm_medusa.engine import engine_kwargs, shutdown

    try:
        prompts = load_prompts(args.prompts)
    except (ValueError, FileNotFoundError) as e:
        print(f"vllm-medusa draft-vocab: error: {e}", file=sys.stderr)
        return 2
    llm = LLM(
        model=str(args.model),
        **engine_kwargs(max_num_seqs=256, max_num_batched_tokens=8192),
    )
    try:
        sequences = generate_answers(llm, prompts, max_tokens=args.max_tokens)
    finally:
        shutdown(llm)
    answers = {
        split: [s.token_ids[s.answer_start :] for s in sequences if (s.split == "heldout") == held]
        for split, held in (("train", False), ("heldout", True))
    }
    ranked, counts = rank_tokens(answers["train"])
    held_coverage = coverage(ranked, answers["heldout"], COVERAGE_SIZES)
    path = write_draft_vocab(
        args.heads,
        ranked,
        counts,
        {
            "model": args.model.name,
            "prompts": args.prompts or "builtin",
            "answers": len(answers["train"]),
            "tokens": sum(counts),
            "heldout_coverage": held_coverage,
        },
    )
    print(f"{len(ranked)} distinct tokens in {sum(counts)} answer tokens; written to {path}")
    for size, share in held_coverage.items():
        print(f"  the {size} most frequent cover {100 * share:.1f} % of held-out answer tokens")
    return 0

"""Command line: ``vllm-medusa convert SRC DST [...]`` (also ``python -m vllm_medusa.converters``).

Exit codes: 0 success, 1 verification failed (nothing written), 2 bad input or usage.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from .checkpoint import DTYPES, ConversionError
from .convert import VerificationError, run_conversion
from .fasterdecoding import MedusaConfigWarning

PROG = "vllm-medusa convert"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Convert FasterDecoding/Medusa heads (heads-only or full Medusa-2 folders) "
        "to vLLM's Medusa layout.",
    )
    parser.add_argument("src", metavar="SRC", help="Medusa checkpoint folder")
    parser.add_argument("dst", metavar="DST", help="output folder (must not exist unless --force)")
    parser.add_argument(
        "--base-model",
        metavar="DIR",
        help="target model folder: checks hidden/vocab sizes, supplies the lm_head",
    )
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="output dtype (default: the source's)"
    )
    parser.add_argument(
        "--embed-lm-head",
        action="store_true",
        help="also store the base lm_head as lm_heads.0 so stock vLLM can load the folder",
    )
    parser.add_argument(
        "--verify", action="store_true", help="compare source and converted outputs numerically"
    )
    parser.add_argument("--force", action="store_true", help="replace DST after a successful run")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            checkpoint, result = run_conversion(
                args.src,
                args.dst,
                base_model=args.base_model,
                dtype=args.dtype,
                embed_lm_head=args.embed_lm_head,
                force=args.force,
                verify=args.verify,
            )
    except VerificationError as exc:
        _report_warnings(caught)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 1
    except ConversionError as exc:
        _report_warnings(caught)
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    _report_warnings(caught)
    if result is not None:
        print(
            f"verify: max |difference| {result.max_abs_diff:.3g} (tolerance "
            f"{result.tolerance:.3g}) over {result.compared}"
        )
    vocab = checkpoint.vocab_size if checkpoint.vocab_size is not None else "from target model"
    lm_head = "base model's (original_lm_head)" if checkpoint.original_lm_head else "own per head"
    if checkpoint.original_lm_head and args.embed_lm_head:
        lm_head += ", embedded as lm_heads.0"
    print(
        f"converted {checkpoint.num_heads} heads x {checkpoint.num_layers} layers, hidden "
        f"{checkpoint.hidden_size}, vocab {vocab}, bias {'yes' if checkpoint.has_bias else 'no'}, "
        f"lm_head {lm_head} -> {args.dst}"
    )
    return 0


def _report_warnings(caught: list[warnings.WarningMessage] | None) -> None:
    """Our config warnings as one plain line each; library warnings as usual."""
    for w in caught or []:
        if issubclass(w.category, MedusaConfigWarning):
            print(f"{PROG}: warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

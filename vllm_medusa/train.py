"""Training Medusa heads on a frozen base model, written in FasterDecoding's format.

The heads see only the base model's last hidden states (precomputed by `distill`), so a
training step costs the heads' own matmuls: on two CPU cores an epoch over a few hundred
answers takes minutes. The output folder (`config.json` + `medusa_lm_head.safetensors`) is
what FasterDecoding publishes, so the converter and the plugin read it like any published
checkpoint.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from vllm_medusa.distill import HeadData

HEADS_FILE = "medusa_lm_head.safetensors"
NEGATIVES_PER_ROW = 16
STATE_FILE = "train_state.pt"
TRAIN_SAMPLE_ROWS = 5_000


@dataclass
class TrainConfig:
    num_heads: int = 4
    num_layers: int = 1
    # False: heads reuse the base model's lm_head (FasterDecoding "version 2"), a few MB.
    own_lm_head: bool = False
    lr: float = 1e-3
    schedule: str = "cosine"  # cosine | linear | constant, after a linear warm-up
    warmup_ratio: float = 0.05
    epochs: float = 2.0
    max_steps: int | None = None
    batch_size: int = 512
    weight_decay: float = 0.0
    # Loss weight of head h is head_weight_decay**h (the Medusa recipe uses 0.8), unless
    # head_weights lists one weight per head.
    head_weight_decay: float = 0.8
    head_weights: list[float] | None = None
    # Tokens the training softmax runs over. "data": every target token of the data plus
    # each row's base top `negatives` (~4x cheaper than "full" on CPU); "batch": each step,
    # the batch's targets, its rows' top `negatives` and `random_negatives` random tokens
    # (~10x cheaper than "data", but measured worse on the later heads); "full": the whole
    # vocabulary.
    train_vocab: str = "data"
    negatives: int = 16
    random_negatives: int = 1024
    seed: int = 0
    device: str = "cpu"

    def loss_weights(self) -> list[float]:
        if self.head_weights is not None:
            if len(self.head_weights) != self.num_heads:
                raise ValueError(
                    f"head_weights has {len(self.head_weights)} values for "
                    f"{self.num_heads} heads: give one weight per head"
                )
            return list(self.head_weights)
        return [self.head_weight_decay**h for h in range(self.num_heads)]


class ResBlock(nn.Module):
    """FasterDecoding's block, `x + SiLU(Linear(x))`, zero-initialised: a new head starts
    as the identity, i.e. guessing what the base model's own lm_head guesses."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden_size, hidden_size)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + F.silu(self.linear(x))


class MedusaHeadStack(nn.Module):
    """Heads laid out as FasterDecoding's `medusa_head`: state-dict keys
    `{h}.{l}.linear.weight|bias` and, with own lm_heads, `{h}.{num_layers}.weight`."""

    def __init__(self, cfg: TrainConfig, lm_head: torch.Tensor) -> None:
        super().__init__()
        vocab, hidden = lm_head.shape
        heads = []
        for _ in range(cfg.num_heads):
            layers: list[nn.Module] = [ResBlock(hidden) for _ in range(cfg.num_layers)]
            if cfg.own_lm_head:
                proj = nn.Linear(hidden, vocab, bias=False)
                proj.weight.data.copy_(lm_head)  # start from the base model's lm_head
                layers.append(proj)
            heads.append(nn.Sequential(*layers))
        self.heads = nn.ModuleList(heads)
        self.num_layers = cfg.num_layers
        self.own_lm_head = cfg.own_lm_head
        self.register_buffer("base_lm_head", lm_head, persistent=False)  # [vocab, hidden]

    def head_states(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """hidden: [rows, hidden] -> one [rows, hidden] per head, before its lm_head."""
        return [head[: self.num_layers](hidden) for head in self.heads]

    def lm_head_weight(self, h: int) -> torch.Tensor:
        return self.heads[h][self.num_layers].weight if self.own_lm_head else self.base_lm_head

    def state_dict_fasterdecoding(self) -> dict[str, torch.Tensor]:
        return {k.removeprefix("heads."): v for k, v in self.state_dict().items()}


def _lr_factor(step: int, total: int, warmup: int, schedule: str) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "constant":
        return 1.0
    raise ValueError(f"unknown schedule {schedule!r}: use cosine, linear or constant")


@torch.inference_mode()
def _base_top_tokens(
    hidden: torch.Tensor, lm_head: torch.Tensor, k: int, chunk: int = 4096
) -> torch.Tensor:
    """[rows, k] the base lm_head's top-k tokens of each row (hidden: [rows, hidden]).

    A head starts as the identity, so the tokens its softmax must push down first are the
    ones the base lm_head already favours for that hidden state.
    """
    tops = []
    for start in range(0, hidden.shape[0], chunk):
        rows = hidden[start : start + chunk].to(lm_head.device)
        tops.append((rows @ lm_head.T).topk(k, dim=-1).indices.cpu())
    return torch.cat(tops)


def _data_vocab(data: HeadData, negatives: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Token ids of the "data" softmax: every target and every row's base top-k tokens, or
    None when that is the whole vocabulary."""
    used = torch.zeros(vocab, dtype=torch.bool)
    used[data.targets[data.targets >= 0]] = True
    used[negatives.flatten()] = True
    return None if bool(used.all()) else used.nonzero().flatten()


def _batch_vocab(
    targets: torch.Tensor, negatives: torch.Tensor, vocab: int, num_random: int, seed: int
) -> torch.Tensor:
    """Sorted token ids of one step's softmax: the batch's targets ([batch, heads]), its
    rows' base top-k ([batch, k]) and random tokens, drawn from `seed` so that a resumed run
    draws the same."""
    generator = torch.Generator().manual_seed(seed)
    random = torch.randint(vocab, (num_random,), generator=generator)
    ids = torch.cat([targets.flatten(), negatives.flatten(), random.to(targets.device)])
    return ids[ids >= 0].unique()


def _softmax_vocab(
    cfg: TrainConfig, data: HeadData, lm_head: torch.Tensor
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(per-row base top-k tokens [rows, k] for "batch", fixed token ids for "data")."""
    if cfg.train_vocab not in ("batch", "data", "full"):
        raise ValueError(f"unknown train_vocab {cfg.train_vocab!r}: use batch, data or full")
    if cfg.train_vocab == "full":
        return None, None
    negatives = _base_top_tokens(data.hidden, lm_head, cfg.negatives)
    if cfg.train_vocab == "batch":
        return negatives, None
    return None, _data_vocab(data, negatives, lm_head.shape[0])


def train_heads(
    data: HeadData,
    lm_head: torch.Tensor,
    cfg: TrainConfig,
    state_path: Path | None = None,
    resume: bool = False,
) -> MedusaHeadStack:
    """Train heads on precomputed hidden states.

    lm_head: [vocab, hidden] the base model's output projection (frozen).
    state_path: where the optimiser state is saved after each epoch; with `resume`, training
    continues from it.
    """
    if data.targets.shape[1] < cfg.num_heads + 1:
        raise ValueError(
            f"the data has targets for {data.targets.shape[1] - 1} heads, not {cfg.num_heads}: "
            "recompute it with more heads"
        )
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    lm_head = lm_head.to(device=device, dtype=torch.float32)
    model = MedusaHeadStack(cfg, lm_head).to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    rows = data.hidden.shape[0]
    steps_per_epoch = max(1, rows // cfg.batch_size)
    total = cfg.max_steps or max(1, int(cfg.epochs * steps_per_epoch))
    warmup = max(1, int(cfg.warmup_ratio * total))
    weights = cfg.loss_weights()
    negatives, fixed_vocab = _softmax_vocab(cfg, data, lm_head)

    step = 0
    if resume and state_path is not None and state_path.is_file():
        state = torch.load(state_path, weights_only=True, map_location=device)
        if state["config"] != asdict(cfg):
            raise ValueError(f"{state_path} was saved with other settings: train anew")
        model.heads.load_state_dict(state["heads"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]

    generator = torch.Generator().manual_seed(cfg.seed)
    order = torch.randperm(rows, generator=generator)
    for _ in range(step // steps_per_epoch):  # the same batches as an uninterrupted run
        order = torch.randperm(rows, generator=generator)
    bar = tqdm(total=total, initial=step, desc="Training heads", unit="step")
    model.train()
    while step < total:
        i = step % steps_per_epoch
        idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
        hidden = data.hidden[idx].to(device)  # [batch, hidden]
        targets = data.targets[idx].to(device)  # [batch, 1 + max_heads]
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, total, warmup, cfg.schedule)
        head_targets = targets[:, 1 : cfg.num_heads + 1]  # [batch, heads]
        vocab_ids = fixed_vocab
        if negatives is not None:
            seed = cfg.seed * 1_000_003 + step
            batch_negatives = negatives[idx].to(device)
            vocab_ids = _batch_vocab(
                head_targets, batch_negatives, lm_head.shape[0], cfg.random_negatives, seed
            )
        loss = torch.zeros((), device=device)
        accs = []
        for h, state_h in enumerate(model.head_states(hidden)):
            target = head_targets[:, h]
            valid = target >= 0
            weight = model.lm_head_weight(h)
            if vocab_ids is not None:
                weight = weight[vocab_ids]  # [train vocab, hidden]
                # Column of each target in the reduced softmax (every target is in it).
                target = torch.searchsorted(vocab_ids, target.clamp(min=0))
            logits = state_h[valid] @ weight.T  # [valid, train vocab]
            loss = loss + weights[h] * F.cross_entropy(logits, target[valid])
            accs.append((logits.argmax(-1) == target[valid]).float().mean().item())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
        bar.set_postfix(loss=f"{loss.item():.3f}", acc="/".join(f"{a:.2f}" for a in accs))
        bar.update()
        if step % steps_per_epoch == 0:
            order = torch.randperm(rows, generator=generator)
            if state_path is not None:
                _save_state(state_path, model, optimizer, step, cfg)
    bar.close()
    if state_path is not None:
        _save_state(state_path, model, optimizer, step, cfg)
    model.eval()
    return model


def _save_state(path: Path, model: MedusaHeadStack, optimizer, step: int, cfg: TrainConfig):
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "heads": model.heads.state_dict(),
            "optimizer": optimizer.state_dict(),
            "step": step,
            "config": asdict(cfg),
        },
        tmp,
    )
    os.replace(tmp, path)


@torch.inference_mode()
def topk_accuracy(
    model: MedusaHeadStack, data: HeadData, ks: tuple[int, ...] = (1, 5), batch: int = 1024
) -> dict[str, list[float]]:
    """Per-head top-k accuracy over the full vocabulary: {"top1": [head0, ...], ...}.

    "base_top1" is the base model's own lm_head on its next token, as a sanity check (it is
    ~1.0 on greedy self-distilled text).
    """
    num_heads = len(model.heads)
    hits = torch.zeros(len(ks), num_heads)
    counts = torch.zeros(num_heads)
    base_hits, base_count = 0.0, 0
    device = model.base_lm_head.device
    for start in range(0, data.hidden.shape[0], batch):
        hidden = data.hidden[start : start + batch].to(device)
        targets = data.targets[start : start + batch].to(device)
        base_pred = (hidden @ model.base_lm_head.T).argmax(-1)
        base_hits += (base_pred == targets[:, 0]).sum().item()
        base_count += targets.shape[0]
        for h, state_h in enumerate(model.head_states(hidden)):
            target = targets[:, h + 1]
            valid = target >= 0
            logits = state_h[valid] @ model.lm_head_weight(h).T
            top = logits.topk(max(ks), dim=-1).indices  # [valid, max k]
            for j, k in enumerate(ks):
                hits[j, h] += (top[:, :k] == target[valid, None]).any(-1).sum().item()
            counts[h] += valid.sum().item()
    result = {f"top{k}": (hits[j] / counts.clamp(min=1)).tolist() for j, k in enumerate(ks)}
    result["base_top1"] = [base_hits / max(1, base_count)]
    return result


def write_fasterdecoding(
    model: MedusaHeadStack,
    out_dir: Path,
    base_model: str,
    hidden_size: int,
    vocab_size: int,
    extra: dict | None = None,
) -> None:
    """Write `config.json` + `medusa_lm_head.safetensors` as FasterDecoding does, whole or
    not at all."""
    from safetensors.torch import save_file

    from vllm_medusa.converters.staging import staged_folder

    config = {
        "medusa_num_heads": len(model.heads),
        "medusa_num_layers": model.num_layers,
        "base_model_name_or_path": base_model,
        "hidden_size": hidden_size,
        "vocab_size": vocab_size,
    }
    if not model.own_lm_head:
        config["version"] = "2"
    config.update(extra or {})
    tensors = {
        k: v.detach().cpu().contiguous() for k, v in model.state_dict_fasterdecoding().items()
    }
    with staged_folder(Path(out_dir)) as tmp:
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / HEADS_FILE)


def build_head_data(
    base_model: str,
    prompts_path: str | None,
    data_dir: Path,
    max_heads: int,
    max_tokens: int = 256,
    max_prompts: int | None = None,
) -> tuple[HeadData, HeadData | None, dict]:
    """Self-distilled training (and held-out) rows, cached in `data_dir`.

    The cache is keyed by every setting that changes its content, so a second run with the
    same settings (a resumed or re-tuned training) skips generation entirely.
    """
    from vllm_medusa.distill import (
        generate_answers,
        load_prompts,
        recorded_head_data,
        recording_llm,
    )

    prompts = load_prompts(prompts_path)
    if max_prompts is not None:
        # Keep the held-out share: cap each split separately.
        train = [p for p in prompts if p.split != "heldout"][:max_prompts]
        held = [p for p in prompts if p.split == "heldout"][: max(1, max_prompts // 6)]
        prompts = train + held
    key = {
        "base_model": str(Path(base_model).resolve()),
        "prompts": prompts_path or "builtin",
        "max_heads": max_heads,
        "max_tokens": max_tokens,
        "num_prompts": len(prompts),
        "hidden_states": "recorded in vLLM",
    }
    data_dir.mkdir(parents=True, exist_ok=True)
    key_path = data_dir / "data_key.json"
    train_path, held_path = data_dir / "train_rows.pt", data_dir / "heldout_rows.pt"
    seconds: dict[str, float] = {}
    if key_path.is_file() and json.loads(key_path.read_text()) == key and train_path.is_file():
        held = HeadData.load(held_path) if held_path.is_file() else None
        return HeadData.load(train_path), held, seconds

    from vllm_medusa.engine import engine_kwargs

    start = time.perf_counter()
    # 256 answers in flight: ~20 % more tokens/s than 64 on two cores; the cache holds them.
    settings = engine_kwargs(
        max_num_seqs=256, max_num_batched_tokens=8192, kv_cache_memory_bytes=4 << 30
    )
    with recording_llm(base_model, **settings) as (llm, recorder):
        sequences = generate_answers(llm, prompts, max_tokens=max_tokens, recorder=recorder)
    seconds["generate"] = _elapsed(start)
    train = recorded_head_data([s for s in sequences if s.split != "heldout"], max_heads)
    train.save(train_path)
    held_seqs = [s for s in sequences if s.split == "heldout"]
    held = recorded_head_data(held_seqs, max_heads) if held_seqs else None
    if held is not None:
        held.save(held_path)
    key_path.write_text(json.dumps(key, indent=2))
    return train, held, seconds


def train_from_prompts(
    base_model: str,
    out_dir: Path,
    cfg: TrainConfig,
    prompts_path: str | None = None,
    data_dir: Path | None = None,
    max_tokens: int = 256,
    max_prompts: int | None = None,
    resume: bool = False,
) -> dict:
    """The whole recipe: answers, hidden states, training, held-out evaluation, output.

    Returns the report also written to `out_dir/training.json`.
    """
    from vllm_medusa.converters.hffolder import BaseModel

    start_all = time.perf_counter()
    base = BaseModel.open(base_model)
    data_dir = (
        Path(data_dir)
        if data_dir is not None
        else Path(out_dir).with_name(Path(out_dir).name + ".data")
    )
    train, held, seconds = build_head_data(
        base_model, prompts_path, data_dir, cfg.num_heads, max_tokens, max_prompts
    )
    start = time.perf_counter()
    model = train_heads(train, base.lm_head(), cfg, data_dir / STATE_FILE, resume=resume)
    seconds["train"] = _elapsed(start)
    report = {
        "base_model": base_model,
        "config": asdict(cfg),
        "rows": {
            "train": train.hidden.shape[0],
            "heldout": 0 if held is None else held.hidden.shape[0],
        },
        "seconds": seconds,
    }
    if held is not None:
        report["heldout"] = topk_accuracy(model, held, ks=(1, 5, 10))
    # The same on training rows (a sample): far above held-out means the heads memorise.
    sample = HeadData(train.hidden[:TRAIN_SAMPLE_ROWS], train.targets[:TRAIN_SAMPLE_ROWS])
    report["train_sample"] = topk_accuracy(model, sample, ks=(1, 5))
    report["seconds"]["total"] = _elapsed(start_all)
    write_fasterdecoding(model, Path(out_dir), base_model, base.hidden_size, base.vocab_size)
    _write_draft_vocab(Path(out_dir), base_model, prompts_path, train, held)
    (Path(out_dir) / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _write_draft_vocab(
    out_dir: Path,
    base_model: str,
    prompts_path: str | None,
    train: HeadData,
    held: HeadData | None,
) -> None:
    """The tokens of the training answers, most frequent first, beside the heads
    (`vllm_medusa.draft_vocab`), with how much of the held-out answers they cover."""
    from vllm_medusa.draft_vocab import (
        COVERAGE_SIZES,
        answer_tokens,
        coverage,
        rank_tokens,
        write_draft_vocab,
    )

    ranked, counts = rank_tokens(answer_tokens(train.targets))
    held_coverage = (
        {} if held is None else coverage(ranked, answer_tokens(held.targets), COVERAGE_SIZES)
    )
    write_draft_vocab(
        out_dir,
        ranked,
        counts,
        {
            "model": Path(base_model).name,
            "prompts": prompts_path or "builtin",
            "tokens": sum(counts),
            "heldout_coverage": held_coverage,
        },
    )


def _elapsed(start: float) -> float:
    return round(time.perf_counter() - start, 1)

"""Self-distillation data: the base model's own greedy answers and its last hidden states.

Medusa heads learn to guess what the base model will say next, so the best training text is
what the base model itself says (the Medusa recipe). Answers come from vLLM in large batches;
the base model's last hidden states are computed once, here, so training never runs the base
model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch
from tqdm import tqdm

BUILTIN_PROMPTS = "builtin"


@dataclass
class Prompt:
    id: str
    category: str
    split: str  # "train" or "heldout"
    turns: list[str]


@dataclass
class AnswerSequence:
    """One generated answer in its context: token ids and where the answer starts."""

    prompt_id: str
    split: str
    token_ids: list[int]
    answer_start: int


def load_prompts(path: str | os.PathLike | None = None, split: str | None = None) -> list[Prompt]:
    """Prompts from a JSON-lines file (`turns` list or a `prompt` string per line).

    Lines without a `split` count as training prompts. `None` or "builtin" means the prompt
    set shipped with the package.
    """
    if path is None or os.fspath(path) == BUILTIN_PROMPTS:
        text = resources.files("vllm_medusa.data").joinpath("train_prompts.jsonl").read_text()
        source = "the built-in prompt set"
    else:
        text = Path(path).read_text()
        source = os.fspath(path)
    prompts = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"] if "turns" in row else [row["prompt"]]
            if not turns or not all(isinstance(t, str) and t for t in turns):
                raise ValueError("empty turn")
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{source}:{lineno}: expected a JSON object with 'turns' (list of strings) "
                f"or 'prompt' (string): {e}"
            ) from None
        prompts.append(
            Prompt(
                id=str(row.get("id", row.get("question_id", lineno))),
                category=str(row.get("category", "")),
                split=str(row.get("split", "train")),
                turns=list(turns),
            )
        )
    if split is not None:
        prompts = [p for p in prompts if p.split == split]
    if not prompts:
        raise ValueError(f"{source}: no prompts" + (f" in split {split!r}" if split else ""))
    return prompts


def generate_answers(
    llm,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
) -> list[AnswerSequence]:
    """Greedy answers through vLLM, turn by turn, all prompts of a turn in one batch."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations: list[list[dict[str, str]]] = [[] for _ in prompts]
    sequences: list[AnswerSequence] = []
    num_turns = max(len(p.turns) for p in prompts)
    for turn in range(num_turns):
        active = [i for i, p in enumerate(prompts) if turn < len(p.turns)]
        for i in active:
            conversations[i].append({"role": "user", "content": prompts[i].turns[turn]})
        outputs = llm.chat([conversations[i] for i in active], params, use_tqdm=True)
        for i, out in zip(active, outputs, strict=True):
            answer = out.outputs[0]
            conversations[i].append({"role": "assistant", "content": answer.text})
            prompt_ids = list(out.prompt_token_ids)
            sequences.append(
                AnswerSequence(
                    prompt_id=prompts[i].id,
                    split=prompts[i].split,
                    token_ids=prompt_ids + list(answer.token_ids),
                    answer_start=len(prompt_ids),
                )
            )
    return sequences


@dataclass
class HeadData:
    """Training rows: one per answer position t.

    hidden:  [rows, hidden] the base model's last (normed) hidden state at position t
    targets: [rows, 1 + max_heads] token ids at t+1 (the base model's own next token), t+2,
             ... ; -1 where the sequence has ended. Column h+1 is head h's target.
    """

    hidden: torch.Tensor
    targets: torch.Tensor

    def save(self, path: Path) -> None:
        tmp = path.with_suffix(".tmp")
        torch.save({"hidden": self.hidden, "targets": self.targets}, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> HeadData:
        data = torch.load(path, weights_only=True)
        return cls(hidden=data["hidden"], targets=data["targets"])


@torch.inference_mode()
def compute_hidden_states(
    model_dir: str | os.PathLike,
    sequences: Iterable[AnswerSequence],
    max_heads: int = 5,
    device: str = "cpu",
    desc: str = "Hidden states",
) -> HeadData:
    """Run the base model once over every sequence and keep its answer positions."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.eval()
    base = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    hidden_rows, target_rows = [], []
    sequences = list(sequences)
    for seq in tqdm(sequences, desc=desc, unit="seq"):
        ids = torch.tensor(seq.token_ids, device=device)
        n = ids.shape[0]
        # Position t = answer_start-1 is the last prompt token: it predicts the answer's first.
        start = max(seq.answer_start - 1, 0)
        if start >= n - 1:
            continue
        hidden = base(input_ids=ids[None]).last_hidden_state[0]  # [n, hidden]
        positions = torch.arange(start, n - 1, device=device)  # answer positions
        offsets = torch.arange(1, max_heads + 2, device=device)  # t+1 .. t+max_heads+1
        index = positions[:, None] + offsets[None, :]  # [rows, 1 + max_heads]
        targets = torch.where(index < n, ids[index.clamp(max=n - 1)], -1)
        hidden_rows.append(hidden[positions].float().cpu())
        target_rows.append(targets.cpu())
    if not hidden_rows:
        raise ValueError("no answer tokens to train on: are the answers empty?")
    return HeadData(hidden=torch.cat(hidden_rows), targets=torch.cat(target_rows))

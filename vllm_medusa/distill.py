"""Self-distillation data: the base model's own greedy answers and its last hidden states.

Medusa heads learn to guess what the base model will say next, so the best training text is
what the base model itself says (the Medusa recipe). Answers come from vLLM in large batches,
and the last hidden states come with them: `HiddenStateRecorder` keeps, while vLLM generates,
the very rows its lm_head turns into tokens, so there is no second pass over the answers and
training never runs the base model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm import tqdm

if TYPE_CHECKING:
    from vllm import LLM

BUILTIN_PROMPTS = "builtin"


@dataclass
class Prompt:
    id: str
    category: str
    split: str  # "train" or "heldout"
    turns: list[str]


@dataclass
class AnswerSequence:
    """One generated answer in its context: token ids and where the answer starts.

    hidden: [len(answer), hidden] vLLM's last hidden state at positions answer_start-1 ..
    len(token_ids)-2 (row i produced answer token i), when recorded during generation.
    """

    prompt_id: str
    split: str
    token_ids: list[int]
    answer_start: int
    hidden: torch.Tensor | None = None


class HiddenStateRecorder:
    """Per request, the hidden states from which vLLM samples each token, as it generates.

    Installed into an in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), it wraps the
    model's `compute_logits`: each engine step hands it one row per scheduled request, the
    row the lm_head sees. Rows of partial prefills, whose tokens vLLM throws away, are
    dropped, so a request's rows are its hidden states at answer_start-1 .. n-2 in order.
    """

    def __init__(self) -> None:
        self.rows: dict[str, list[torch.Tensor]] = {}

    def install(self, llm: LLM) -> None:
        llm.collective_rpc(self._wrap)

    def _wrap(self, worker: Any) -> None:
        runner = worker.model_runner
        model = runner.get_model()
        compute_logits = model.compute_logits

        def recording(hidden_states: torch.Tensor) -> torch.Tensor:
            # hidden_states: [num_reqs, hidden], in the input batch's request order.
            num_reqs = runner.input_batch.num_reqs
            if hidden_states.shape[0] != num_reqs:
                raise RuntimeError(
                    f"{hidden_states.shape[0]} rows for {num_reqs} requests: hidden states "
                    "can be recorded only without speculative decoding"
                )
            discard = runner.discard_request_mask.np[:num_reqs]
            rows = hidden_states.detach().float().cpu()
            for i, req_id in enumerate(runner.input_batch.req_ids[:num_reqs]):
                if not discard[i]:
                    self.rows.setdefault(req_id, []).append(rows[i])
            return compute_logits(hidden_states)

        model.compute_logits = recording

    def take(self, request_id: str) -> torch.Tensor:
        """[steps, hidden] rows of one request (its external id) and forget them."""
        # The engine appends "-" and 8 random characters to the id it was given.
        matches = [k for k in self.rows if k.rsplit("-", 1)[0] == request_id]
        if len(matches) != 1:
            raise RuntimeError(f"{len(matches)} recorded requests for id {request_id!r}")
        return torch.stack(self.rows.pop(matches[0]))


@contextmanager
def recording_llm(model: str, **kwargs: Any) -> Iterator[tuple[LLM, HiddenStateRecorder]]:
    """An in-process `LLM` whose hidden states are recorded while it generates; shut down on
    exit, with torch's thread count (which the in-process engine lowers and locks) restored."""
    from vllm import LLM

    from vllm_medusa.engine import shutdown

    threads, set_num_threads = torch.get_num_threads(), torch.set_num_threads
    previous = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING")
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    try:
        llm = LLM(model=model, **kwargs)
    finally:
        if previous is None:
            del os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"]
        else:
            os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = previous
    try:
        recorder = HiddenStateRecorder()
        recorder.install(llm)
        yield llm, recorder
    finally:
        shutdown(llm)
        torch.set_num_threads = set_num_threads
        torch.set_num_threads(threads)


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
    llm: LLM,
    prompts: Sequence[Prompt],
    max_tokens: int = 256,
    recorder: HiddenStateRecorder | None = None,
) -> list[AnswerSequence]:
    """Greedy answers through vLLM, turn by turn, all prompts of a turn in one batch; with a
    recorder, each answer carries its hidden states."""
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
            hidden = None
            if recorder is not None:
                hidden = recorder.take(out.request_id)[: len(answer.token_ids)]
            sequences.append(
                AnswerSequence(
                    prompt_id=prompts[i].id,
                    split=prompts[i].split,
                    token_ids=prompt_ids + list(answer.token_ids),
                    answer_start=len(prompt_ids),
                    hidden=hidden,
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


def answer_targets(token_ids: torch.Tensor, start: int, max_heads: int) -> torch.Tensor:
    """[n - 1 - start, 1 + max_heads] tokens at t+1 .. t+1+max_heads for each position t in
    start .. n-2 (token_ids: [n]); -1 past the end of the sequence."""
    n = token_ids.shape[0]
    positions = torch.arange(start, n - 1)
    offsets = torch.arange(1, max_heads + 2)
    index = positions[:, None] + offsets[None, :]  # [rows, 1 + max_heads]
    return torch.where(index < n, token_ids[index.clamp(max=n - 1)], -1)


def recorded_head_data(sequences: Iterable[AnswerSequence], max_heads: int = 5) -> HeadData:
    """Training rows from answers whose hidden states were recorded during generation."""
    hidden_rows, target_rows = [], []
    for seq in sequences:
        if seq.hidden is None:
            raise ValueError(f"answer to prompt {seq.prompt_id} has no recorded hidden states")
        ids = torch.tensor(seq.token_ids)
        targets = answer_targets(ids, seq.answer_start - 1, max_heads)
        if seq.hidden.shape[0] != targets.shape[0]:
            raise RuntimeError(
                f"answer to prompt {seq.prompt_id}: {seq.hidden.shape[0]} hidden states "
                f"for {targets.shape[0]} answer tokens"
            )
        hidden_rows.append(seq.hidden)
        target_rows.append(targets)
    if not hidden_rows:
        raise ValueError("no answer tokens to train on: are the answers empty?")
    return HeadData(hidden=torch.cat(hidden_rows), targets=torch.cat(target_rows))


@torch.inference_mode()
def compute_hidden_states(
    model_dir: str | os.PathLike,
    sequences: Iterable[AnswerSequence],
    max_heads: int = 5,
    device: str = "cpu",
    desc: str = "Hidden states",
) -> HeadData:
    """Run the base model (Hugging Face) over every sequence and keep its answer positions:
    a check of the recorded rows, or for answers generated without a recorder."""
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
        hidden_rows.append(hidden[start : n - 1].float().cpu())
        target_rows.append(answer_targets(ids.cpu(), start, max_heads))
    if not hidden_rows:
        raise ValueError("no answer tokens to train on: are the answers empty?")
    return HeadData(hidden=torch.cat(hidden_rows), targets=torch.cat(target_rows))

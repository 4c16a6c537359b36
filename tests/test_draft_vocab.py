"""The draft vocabulary: ranking, coverage, the file beside the heads, the restricted
projection."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vllm_medusa.draft_vocab import (
    DRAFT_VOCAB_FILE,
    DraftVocabError,
    answer_tokens,
    coverage,
    load_draft_vocab,
    rank_tokens,
    write_draft_vocab,
)

SHIPPED = Path(__file__).parent.parent / "vllm_medusa/shipped_heads/SmolLM2-135M-Instruct"


def test_tokens_are_ranked_by_count_then_id():
    ranked, counts = rank_tokens([[5, 3, 5, 9], [3, 5, 7]])
    assert ranked == [5, 3, 7, 9] and counts == [3, 2, 1, 1]


def test_coverage_counts_tokens_the_ranking_lacks_as_uncovered():
    ranked = [5, 3, 7]
    # 8 is not in the ranking: no size covers it, however large.
    assert coverage(ranked, [[5, 5, 3, 8]], [1, 2, 100]) == {1: 0.5, 2: 0.75, 100: 0.75}


def test_answer_tokens_are_the_rows_next_tokens():
    targets = torch.tensor([[4, 6, 8], [6, 8, -1], [8, -1, -1], [-1, -1, -1]])
    assert answer_tokens(targets) == [[4, 6, 8]]


def test_written_vocabulary_loads_as_its_first_tokens_sorted(tmp_path: Path):
    write_draft_vocab(tmp_path, [40, 7, 12, 3], [9, 5, 2, 1], {"prompts": "test"})
    assert load_draft_vocab(tmp_path, 3, 50).tolist() == [7, 12, 40]
    # Asking for more than the ranking holds gives all of it.
    assert load_draft_vocab(tmp_path, 100, 50).tolist() == [3, 7, 12, 40]
    assert json.loads((tmp_path / DRAFT_VOCAB_FILE).read_text())["prompts"] == "test"
    assert [p.name for p in tmp_path.iterdir()] == [DRAFT_VOCAB_FILE]


def test_missing_or_foreign_vocabulary_is_refused_with_what_to_do(tmp_path: Path):
    with pytest.raises(DraftVocabError, match="vllm-medusa draft-vocab --heads"):
        load_draft_vocab(tmp_path, 8, 50)
    write_draft_vocab(tmp_path, [60, 7], [2, 1], {})
    with pytest.raises(DraftVocabError, match="outside the target's vocabulary of 50"):
        load_draft_vocab(tmp_path, 8, 50)
    (tmp_path / DRAFT_VOCAB_FILE).write_text('{"ids": []}')
    with pytest.raises(DraftVocabError, match="not a draft vocabulary"):
        load_draft_vocab(tmp_path, 8, 50)


def test_shipped_heads_ship_their_vocabulary_and_use_it():
    config = json.loads((SHIPPED / "config.json").read_text())
    size = config["medusa_drafting"]["draft_vocab"]
    ids = load_draft_vocab(SHIPPED, size, 49152)
    assert 0 < ids.numel() <= size and torch.equal(ids, ids.sort().values)


def test_restricted_projection_gives_the_full_logits_of_its_tokens():
    from vllm_medusa.model import DraftVocabProjection

    torch.manual_seed(0)
    weight = torch.randn(300, 16)  # [vocab, hidden]
    x = torch.randn(5, 16)
    ids = torch.tensor([2, 17, 40, 299])
    logits = DraftVocabProjection(weight, ids)(x)  # [5, 4]
    torch.testing.assert_close(logits, (x @ weight.T)[:, ids], rtol=1e-5, atol=1e-5)

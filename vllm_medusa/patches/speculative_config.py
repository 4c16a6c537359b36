"""Surface: `vllm.config.speculative.SpeculativeConfig` (vLLM 0.32).

Its pydantic validator `_verify_args` ends by calling
`verify_equal_vocab_size_if_draft_model()`, in the process that parses the user's settings
(the `LLM(...)` caller or the API server), after the heads' config is read. Extending that
call makes heads made for another model fail there, with one message, instead of failing
later inside a worker or drafting garbage.

The same call resolves the Medusa tree (`vllm_medusa.tree.configured_tree`), once, in that
process: with a tree, `num_speculative_tokens` becomes the tree's node count (the drafts the
scheduler makes room for per request and step), the heads' config asks for as many heads as
the tree is deep, and the resolved tree travels on that config to the engine's processes.

Per-request drafting (`vllm_medusa.drafting`: copy branches, pruning) is resolved there too:
it makes every request verify a tree of its own, so a chain is then served as a tree, and the
scheduler makes room for the copy branch's nodes on top of the static tree's.

Where the user sets neither a tree nor `num_speculative_tokens_per_batch_size`, a calibration
beside the heads (`vllm-medusa calibrate`, one file per dtype) supplies both, if it was
measured for these heads, this model, dtype and device; otherwise it is set aside with a
warning.
"""

from __future__ import annotations

import logging
from typing import Any

from vllm_medusa.calibrate import find_calibration, mismatch, model_identity
from vllm_medusa.draft_vocab import load_draft_vocab
from vllm_medusa.drafting import CONFIG_KEY as DRAFTING_KEY
from vllm_medusa.drafting import RESOLVED_ATTR as DRAFTING_ATTR
from vllm_medusa.drafting import Drafting, configured_drafting
from vllm_medusa.drafting import resolved_form as drafting_form
from vllm_medusa.tree import (
    CONFIG_KEY,
    RESOLVED_ATTR,
    MedusaTree,
    build_tree,
    chain_paths,
    configured_tree,
    resolved_form,
    tree_of_heads,
)

logger = logging.getLogger(f"vllm.{__name__}")

_ORIGINAL_ATTR = "_vllm_medusa_original_verify_vocab"
# On the heads' config: the schedule a calibration set, so that vLLM's second validation of
# the same config (inside its VllmConfig) tells it from a schedule the user set.
_CALIBRATED_ATTR = "vllm_medusa_calibrated_schedule"
_UNSET = object()


def check_heads_fit_target(
    *,
    heads_dir: str,
    num_heads: int,
    num_speculative_tokens: int | None,
    heads_hidden: int,
    heads_vocab: int | None,
    target_hidden: int,
    target_vocab: int,
) -> None:
    if heads_hidden != target_hidden:
        raise ValueError(
            f"Medusa heads {heads_dir!r} have hidden size {heads_hidden} but the target "
            f"model has {target_hidden}: use heads trained for this model"
        )
    if heads_vocab is not None and heads_vocab != target_vocab:
        raise ValueError(
            f"Medusa heads {heads_dir!r} predict a vocabulary of {heads_vocab} tokens but the "
            f"target model has {target_vocab}: use heads trained for this model"
        )
    if num_speculative_tokens is not None and num_speculative_tokens > num_heads:
        raise ValueError(
            f"num_speculative_tokens={num_speculative_tokens} but {heads_dir!r} has only "
            f"{num_heads} Medusa heads: set num_speculative_tokens to at most {num_heads}"
        )


def use_tree(
    spec_config, heads, tree: MedusaTree | None, num_heads: int, drafting: Drafting
) -> None:
    """Size the speculation for `tree` (None: the chain vLLM configured) and `drafting`."""
    resolved_drafting = drafting_form(drafting)
    if getattr(heads, DRAFTING_ATTR, _UNSET) != resolved_drafting and drafting.per_request:
        logger.info("vllm-medusa: per-request trees, %s", drafting)
    setattr(heads, DRAFTING_ATTR, resolved_drafting)
    if tree is None:
        setattr(heads, RESOLVED_ATTR, None)
        return
    if tree.depth > num_heads:
        raise ValueError(
            f"Medusa {tree.describe()} needs {tree.depth} heads but "
            f"{spec_config.draft_model_config.model!r} has {num_heads}: use a tree at most "
            f"{num_heads} deep"
        )
    heads.num_heads = tree.depth
    resolved = None if tree.is_chain and not drafting.per_request else resolved_form(tree)
    # vLLM validates the speculative config again inside its VllmConfig: log the tree once.
    if getattr(heads, RESOLVED_ATTR, _UNSET) != resolved:
        logger.info("vllm-medusa: %s", tree.describe())
    spec_config.num_speculative_tokens = tree.num_nodes + drafting.extra_nodes
    setattr(heads, RESOLVED_ATTR, resolved)


def calibrated_settings(
    spec_config: Any, log: bool = True
) -> tuple[MedusaTree, list[list[int]]] | None:
    """The tree and schedule of the calibration beside the heads, if it fits this engine."""
    import torch
    from vllm.platforms import current_platform

    heads_dir = spec_config.draft_model_config.model
    target = spec_config.target_model_config
    dtype = (
        str(target.dtype).removeprefix("torch.")
        if isinstance(target.dtype, torch.dtype)
        else str(target.dtype)
    )
    found = find_calibration(heads_dir, dtype)
    if found is None:
        return None
    path, calibration, other = found
    reason = mismatch(
        calibration,
        heads_dir,
        model_identity(target.hf_config),
        dtype,
        current_platform.device_type,
    )
    if reason is not None:
        if not log:
            return None
        logger.warning(
            "vllm-medusa: not using the calibration %s: %s; speculating with "
            "num_speculative_tokens (run vllm-medusa calibrate --heads %s to measure again)",
            path,
            reason,
            heads_dir,
        )
        return None
    tree = build_tree(calibration.tree, name="calibrated", ordered=True)
    if not log:
        return tree, calibration.schedule
    if other is not None:
        # Used all the same: without it the engine drafts a chain of num_speculative_tokens
        # at every batch size, which on any CPU costs more at large batches than its schedule.
        logger.warning(
            "vllm-medusa: using the calibration %s, but %s: its tree and drafts per batch "
            "size may not be the fastest here (run vllm-medusa calibrate --heads %s to "
            "measure this machine)",
            path,
            other,
            heads_dir,
        )
    logger.info(
        "vllm-medusa: calibration %s (measured %s): drafts per batch size %s",
        path,
        calibration.machine.get("measured", "?"),
        calibration.schedule,
    )
    return tree, calibration.schedule


def apply() -> None:
    from vllm.config.speculative import SpeculativeConfig

    if hasattr(SpeculativeConfig, _ORIGINAL_ATTR):
        return
    original = SpeculativeConfig.verify_equal_vocab_size_if_draft_model
    setattr(SpeculativeConfig, _ORIGINAL_ATTR, original)

    def verify_equal_vocab_size_if_draft_model(self) -> None:
        original(self)
        if self.method != "medusa" or self.draft_model_config is None:
            return
        heads = self.draft_model_config.hf_config
        target = self.target_model_config
        num_heads = getattr(heads, "checkpoint_num_heads", heads.num_heads)
        tree = configured_tree(getattr(heads, CONFIG_KEY, None))
        drafting = configured_drafting(getattr(heads, DRAFTING_KEY, None))
        schedule = None
        previous = getattr(heads, _CALIBRATED_ATTR, None)
        if tree is None and self.num_speculative_tokens_per_batch_size in (None, previous):
            calibrated = calibrated_settings(self, log=previous is None)
            if calibrated is not None:
                tree, schedule = calibrated
        if tree is None and drafting.per_request:
            # Requests' own trees grow from the chain, verified as trees. vLLM validates this
            # config twice; the second time num_speculative_tokens counts the copy branch too.
            tree = tree_of_heads(heads) or build_tree(
                chain_paths(self.num_speculative_tokens),
                name=f"chain:{self.num_speculative_tokens}",
            )
        check_heads_fit_target(
            heads_dir=self.draft_model_config.model,
            num_heads=num_heads,
            num_speculative_tokens=None if tree else self.num_speculative_tokens,
            heads_hidden=heads.hidden_size,
            heads_vocab=getattr(heads, "heads_vocab_size", None),
            target_hidden=target.get_hidden_size(),
            target_vocab=target.get_vocab_size(),
        )
        if drafting.draft_vocab:
            # A missing or foreign ranking stops the engine here, not in its worker.
            load_draft_vocab(
                self.draft_model_config.model, drafting.draft_vocab, target.get_vocab_size()
            )
        use_tree(self, heads, tree, num_heads, drafting)
        if schedule is not None:
            self.num_speculative_tokens_per_batch_size = schedule
            setattr(heads, _CALIBRATED_ATTR, schedule)

    SpeculativeConfig.verify_equal_vocab_size_if_draft_model = (
        verify_equal_vocab_size_if_draft_model
    )

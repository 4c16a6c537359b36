"""Surface: `vllm.triton_utils.dispatcher._rebind_kernels` (vLLM 0.32).

Every engine start on the CPU registers kernel overrides, and vLLM then scans the namespace
of every loaded module, reading `vars(value).get("kernel")` of each value. llvmlite's
`llvmlite.binding.ffi.lib` answers any attribute, `__dict__` included, with a function
wrapper, so once llvmlite is loaded the scan stops the engine ("'_lib_fn_wrapper' object has
no attribute 'get'"): in a process that compiled the few-rows kernel (`vllm_medusa.cpu_gemm`)
or ran numba (vLLM's prompt lookup, the copy branch) and then starts an engine in-process.
The scan runs with that one attribute set aside; it holds no Triton kernel.
"""

from __future__ import annotations

import functools
import sys
from typing import Any

_PATCHED_ATTR = "_vllm_medusa_patched"


def apply() -> None:
    from vllm.triton_utils import dispatcher

    rebind = dispatcher._rebind_kernels
    if getattr(rebind, _PATCHED_ATTR, False):
        return

    @functools.wraps(rebind)
    def rebind_past_llvmlite(overrides: Any) -> None:
        ffi = sys.modules.get("llvmlite.binding.ffi")
        lib = vars(ffi).pop("lib", None) if ffi is not None else None
        try:
            rebind(overrides)
        finally:
            if lib is not None:
                ffi.lib = lib

    setattr(rebind_past_llvmlite, _PATCHED_ATTR, True)
    dispatcher._rebind_kernels = rebind_past_llvmlite

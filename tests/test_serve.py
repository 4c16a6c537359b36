"""Medusa behind vLLM's OpenAI-compatible server, through the official `openai` client.

Two servers serve the whole module: one without speculation (the reference) and one with the
shipped heads. Greedy output through every path (completions, chat, streaming, concurrent
mixed load, after a client walks away) must equal the reference token for token. Bad
speculative configs must stop the server at start-up with one line saying why.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from fasterdecoding_fixtures import heads_config, make_heads, save_heads_folder

from vllm_medusa.distill import load_prompts
from vllm_medusa.heads import default_heads_path
from vllm_medusa.loadtest import build_requests, choice_token_ids, greedy_kwargs, turn_order
from vllm_medusa.loadtest import main as load_main
from vllm_medusa.server import OFFLINE_ENV, Server, launch, spec_decode_metrics, wait_ready
from vllm_medusa.tree import TREE_ENV

MAX_TOKENS = 48
# Each entry starts one Medusa server, shared by every test below: add another speculative
# config (extra keys merged into the shipped heads' config, and a tree) with one more line.
SPEC_CONFIGS = [
    # The shipped heads with a tree (`VLLM_MEDUSA_TREE`; their own config has none).
    pytest.param(({"num_speculative_tokens": 4}, "[[0],[1],[2],[0,0],[1,0]]"), id="tree"),
]


def medusa_config(extra: dict[str, Any]) -> dict[str, Any]:
    return {"method": "medusa", "model": str(default_heads_path()), **extra}


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return [p.turns[0] for p in load_prompts(split="heldout")[:4]]


@pytest.fixture(scope="module")
def reference_launch(smollm2_dir: Path, tmp_path_factory) -> Iterator[Server]:
    """The server without speculation, started but not waited for: both servers start side by
    side."""
    server = launch(smollm2_dir, tmp_path_factory.mktemp("servers") / "reference.log")
    yield server
    server.stop()


@pytest.fixture(scope="module", params=SPEC_CONFIGS)
def medusa_server(
    smollm2_dir: Path, tmp_path_factory, request, reference_launch: Server
) -> Iterator[Server]:
    log = tmp_path_factory.mktemp("servers") / "medusa.log"
    extra, tree = request.param
    server = launch(smollm2_dir, log, medusa_config(extra), env={TREE_ENV: tree})
    try:
        wait_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def reference_server(reference_launch: Server) -> Server:
    wait_ready(reference_launch)
    return reference_launch


def client(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def greedy(
    server: Server, api: str, prompt: str, stream: bool = False, max_tokens: int = MAX_TOKENS
) -> tuple[str, list[int] | None, str]:
    """(text, token ids, finish reason) of one greedy request."""
    kwargs = greedy_kwargs(server.model, max_tokens, stream, api)
    c = client(server)
    if api == "chat":
        call = c.chat.completions.create(messages=[{"role": "user", "content": prompt}], **kwargs)
    else:
        call = c.completions.create(prompt=prompt, **kwargs)
    if not stream:
        choice = call.choices[0]
        text = choice.message.content if api == "chat" else choice.text
        return text, choice_token_ids(choice), choice.finish_reason
    text, ids, finish = "", [], ""
    for chunk in call:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += (choice.delta.content if api == "chat" else choice.text) or ""
        ids += choice_token_ids(choice) or []
        finish = choice.finish_reason or finish
    return text, ids, finish


@pytest.fixture(scope="module")
def reference_outputs(reference_server: Server, prompts: list[str]) -> dict[tuple[str, str], Any]:
    return {
        (api, p): greedy(reference_server, api, p)
        for api in ("completion", "chat")
        for p in prompts
    }


def test_serve_command_is_vllm_serve():
    """`vllm-medusa serve` answers with vLLM's own `vllm serve` parser, options and all."""
    result = subprocess.run(
        [sys.executable, "-m", "vllm_medusa.cli", "serve", "--help=all"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **OFFLINE_ENV},
    )
    assert result.returncode == 0, result.stderr
    assert "usage: vllm serve [model_tag] [options]" in result.stdout
    for option in ("--api-server-count", "--headless", "--speculative-config"):
        assert option in result.stdout


def test_servers_run_through_vllm_serve(reference_server: Server, medusa_server: Server):
    """Both servers are `vllm-medusa serve MODEL ...`, the model given only as `vllm serve`'s
    positional argument (vLLM's module form would ignore it and serve its default model)."""
    for server in (reference_server, medusa_server):
        args = server.process.args
        assert args[1:5] == ["-m", "vllm_medusa.cli", "serve", server.model]
        assert "--model" not in args
        assert [m.id for m in client(server).models.list().data] == [server.model]


@pytest.mark.parametrize("api", ["completion", "chat"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_greedy_output_matches_server_without_speculation(
    medusa_server: Server, reference_outputs, prompts: list[str], api: str, stream: bool
):
    for prompt in prompts:
        expected = reference_outputs[(api, prompt)]
        assert expected[1]
        assert greedy(medusa_server, api, prompt, stream=stream) == expected, prompt


def test_metrics_count_drafts_and_accepted_tokens(medusa_server: Server, prompts: list[str]):
    before = spec_decode_metrics(medusa_server.root_url)
    for prompt in prompts:
        greedy(medusa_server, "chat", prompt, max_tokens=64)
    moved = spec_decode_metrics(medusa_server.root_url).minus(before)
    assert moved.num_drafts > 0
    assert moved.num_draft_tokens >= moved.num_drafts
    assert moved.num_accepted_tokens > 0, moved.as_dict()
    assert sum(moved.accepted_per_position) == moved.num_accepted_tokens
    # The drafts are the plugin's: its proposer, inside a worker process, names the heads.
    log = medusa_server.log_path.read_text(errors="replace")
    assert re.search(r"\(Worker[^)]*\).*vllm-medusa: \d+ heads", log)


def test_typical_acceptance_per_request_accepts_more(medusa_server: Server, prompts: list[str]):
    """`vllm_xargs: {"medusa_typical": 1}` switches one request to typical acceptance: the same
    sampled requests accept more drafts per step than with exact verification."""

    def accepted_per_draft(xargs: dict[str, Any] | None) -> float:
        before = spec_decode_metrics(medusa_server.root_url)
        for seed, prompt in enumerate(prompts * 2):
            client(medusa_server).completions.create(
                model=medusa_server.model,
                prompt=prompt,
                max_tokens=48,
                temperature=0.7,
                seed=seed,
                extra_body={"vllm_xargs": xargs} if xargs else None,
            )
        moved = spec_decode_metrics(medusa_server.root_url).minus(before)
        assert moved.num_drafts > 0
        return moved.num_accepted_tokens / moved.num_drafts

    exact = accepted_per_draft(None)
    typical = accepted_per_draft({"medusa_typical": 1})
    assert typical > exact > 0, (typical, exact)


def metric(server: Server, prefix: str) -> float:
    """Sum of the /metrics samples whose name and labels start with prefix."""
    text = httpx.get(f"{server.root_url}/metrics", timeout=10).text
    lines = [ln for ln in text.splitlines() if ln.startswith(prefix)]
    return sum(float(ln.rpartition(" ")[2]) for ln in lines)


GENERATED = "vllm:generation_tokens_total"
RUNNING = "vllm:num_requests_running"
MAX_TOKENS_ABANDONED = 1500


def test_server_keeps_serving_after_disconnect_and_abort(
    medusa_server: Server, reference_outputs, prompts: list[str]
):
    generated_before = metric(medusa_server, GENERATED)
    body = {
        "model": medusa_server.model,
        "prompt": prompts[0],
        "max_tokens": MAX_TOKENS_ABANDONED,
        "temperature": 0.0,
        "ignore_eos": True,
    }
    # A streaming client that reads a few chunks and hangs up.
    with httpx.Client(timeout=60) as http:
        url = f"{medusa_server.base_url}/completions"
        with http.stream("POST", url, json={**body, "stream": True}) as response:
            assert response.status_code == 200
            for i, _ in enumerate(response.iter_lines()):
                if i >= 3:
                    break
    # A non-streaming client that gives up before the answer.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{medusa_server.base_url}/completions", json=body, timeout=2.0)
    deadline = time.monotonic() + 30
    while metric(medusa_server, RUNNING) > 0 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert metric(medusa_server, RUNNING) == 0
    # Run to the end, the two requests would have generated 2 x 1500 tokens (EOS ignored).
    assert metric(medusa_server, GENERATED) - generated_before < 2 * MAX_TOKENS_ABANDONED
    for api in ("completion", "chat"):
        assert greedy(medusa_server, api, prompts[0]) == reference_outputs[(api, prompts[0])]


def seeded_load(server: Server, long_prompt: str) -> list[str]:
    """Three clients send long prompts with their own `seed` at once, beside short sampled and
    greedy requests: the server's token budget (2,048 per step) prefills them in chunks."""
    body = {"model": server.model, "max_tokens": 24, "temperature": 1.0}
    requests = [{**body, "prompt": f"{i}. {long_prompt}", "seed": 100 + i} for i in range(3)]
    requests += [{**body, "prompt": "Tell me about the sea.", "seed": 7}]
    requests += [{**body, "prompt": "Name three colours.", "temperature": 0.0}] * 2
    with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
        answers = list(
            pool.map(
                lambda r: httpx.post(f"{server.base_url}/completions", json=r, timeout=300),
                requests,
            )
        )
    assert [a.status_code for a in answers] == [200] * len(requests)
    return [a.json()["choices"][0]["text"] for a in answers]


def test_seeded_requests_under_load_keep_the_server_up(
    reference_server: Server, medusa_server: Server
):
    """One client's `seed` with a long prompt once stopped the CPU engine for everyone (its
    prefill chunk's discarded draw was rewound with an offset CPU generators lack). Now every
    request is answered, the same seeds give the same texts again, and the server stays up,
    with and without speculation."""
    long_prompt = " ".join(p.turns[0] for p in load_prompts(split="heldout"))[:5000]
    for server in (reference_server, medusa_server):
        first = seeded_load(server, long_prompt)
        again = seeded_load(server, long_prompt)
        assert first[:4] == again[:4], server.model
        assert len(set(first[:3])) > 1
        assert httpx.get(f"{server.root_url}/health", timeout=10).status_code == 200


def test_load_command_matches_reference_under_concurrency(
    reference_server: Server, medusa_server: Server, tmp_path: Path, capsys
):
    """A reduced `vllm-medusa load`: 40 mixed requests, 16 at a time, the servers taking
    turns for two rounds."""
    texts = [p.turns[0] for p in load_prompts(split="heldout")]
    requests = build_requests(texts, num_requests=40, max_tokens=32, seed=1)
    assert {r.api for r in requests} == {"completion", "chat"}
    assert {r.stream for r in requests} == {False, True}
    assert any(r.stop for r in requests) and any(r.max_tokens == 1 for r in requests)

    report = tmp_path / "load.json"
    argv = ["--medusa-url", medusa_server.base_url, "--reference-url", reference_server.base_url]
    argv += ["--num-requests", "40", "--concurrency", "16", "--max-tokens", "32", "--seed", "1"]
    code = load_main([*argv, "--rounds", "2", "--json", str(report)])
    out = capsys.readouterr().out
    print(out)
    result = json.loads(report.read_text())
    assert result["mismatches"] == []
    for name in ("reference", "medusa"):
        assert [run["name"] for run in result[name]] == [f"{name} (round {i})" for i in (1, 2)]
        for run in result[name]:
            assert (run["completed"], run["errors"]) == (40, 0)
            assert run["output_tokens"] > 40
        assert len(result["results"][name]) == 40
    assert all(run["spec_decode"]["num_drafts"] > 0 for run in result["medusa"])
    assert all(run["spec_decode"] is None for run in result["reference"])
    assert len(result["round_speedups"]) == 2
    assert min(result["round_speedups"]) <= result["speedup"] <= max(result["round_speedups"])
    assert "medusa / reference output tok/s" in out
    assert code == 0


def test_load_command_refuses_zero_rounds(capsys):
    assert load_main(["--rounds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--rounds must be at least 1" in err[0]


def test_load_rounds_alternate_which_server_goes_first():
    assert turn_order(1) == ["reference", "medusa"]
    assert turn_order(3) == ["reference", "medusa", "medusa", "reference", "reference", "medusa"]


def test_load_command_refuses_other_hosts(capsys):
    assert load_main(["--medusa-url", "http://192.0.2.1:8000/v1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a loopback address" in err[0]


def wrong_model_heads(folder: Path) -> Path:
    """Heads made for a model of hidden size 128 (SmolLM2's is 576)."""
    heads = make_heads(hidden=128, vocab=49152, num_heads=4, num_layers=1, own_lm_head=False)
    return save_heads_folder(folder, heads, heads_config(4, 1, version="2"), fmt="safetensors")


@pytest.mark.parametrize(
    ("make_heads_dir", "tree", "expected"),
    [
        (wrong_model_heads, None, "hidden size 128 but the target model has 576"),
        (lambda folder: folder, None, "Invalid repository ID or local directory specified"),
        (
            lambda folder: default_heads_path(),
            "[[0], [0, 1], [1, 1]]",
            "path [1, 1] has no parent [1]: add the parent path or remove this one",
        ),
    ],
    ids=["wrong-model-heads", "missing-folder", "malformed-tree"],
)
def test_bad_speculative_config_stops_server_at_startup(
    smollm2_dir: Path, tmp_path: Path, make_heads_dir, tree: str | None, expected: str
):
    heads = make_heads_dir(tmp_path / "heads")
    config = {"method": "medusa", "model": str(heads), "num_speculative_tokens": 4}
    env = {TREE_ENV: tree} if tree else None
    server = launch(smollm2_dir, tmp_path / "server.log", config, env=env)
    try:
        code = server.process.wait(timeout=240)
    finally:
        server.stop()
    log = server.log_path.read_text(errors="replace")
    assert code != 0
    assert any(expected in line for line in log.splitlines()), server.log_tail()

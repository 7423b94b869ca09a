"""Smoke runs of the benchmarks (seconds): the anchors on tiny models, checked against a no-cache
oracle, and the serving driver against a tiny in-process OpenAI-style SSE server.

Speed is never asserted here; only that the harness counts and times what it claims to.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/ lives at the repo root

torch = pytest.importorskip("torch")

from benchmarks.anchors import run_dera, run_hf_generate, run_proxy_tuning  # noqa: E402
from benchmarks.anchors.common import useful_tokens  # noqa: E402
from benchmarks.memory import PeakMemory, ProcessRssSampler  # noqa: E402
from benchmarks.models import load_policies, load_tokenizer  # noqa: E402
from benchmarks.serve import ServeConfig, main as serve_main, run_serve_benchmark  # noqa: E402
from benchmarks.serve_data import jsonl_requests, random_requests  # noqa: E402

PROMPTS = ["Hello world! How are you", "Paris is the capital of", "A policy is a distribution over the next"]
NEW = 5


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from policymix.tiny_models import build_family

    torch.set_num_threads(1)
    paths = build_family(tmp_path_factory.mktemp("bench-tiny"), ["base", "tuned", "untuned"])
    return load_policies(paths), load_tokenizer(paths["base"])


def _oracle(models_and_weights, tokenizer, prompt: str, steps: int) -> list[int]:
    """Greedy on sum_k w_k log_softmax(l_k), every step a full forward without any cache."""
    ids = tokenizer(prompt, return_tensors="pt").input_ids  # [1, P]
    out = []
    with torch.inference_mode():
        for _ in range(steps):
            score = sum(w * torch.log_softmax(m(input_ids=ids).logits[0, -1].float(), -1)
                        for m, w in models_and_weights)  # [V]
            nxt = int(score.argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def _sane(result, requests: int, batch: int) -> None:
    assert result.requests == requests and result.batch_size == batch and result.threads == 1
    assert result.tokens == requests * NEW == sum(map(len, result.outputs))
    assert result.wall_s > 0 and result.tok_s == pytest.approx(result.tokens / result.wall_s)
    assert result.peak_rss_bytes and result.peak_rss_bytes > 0
    row = result.to_dict()
    assert "outputs" not in row and row["tok_s"] > 0


def test_proxy_tuning_loop_matches_oracle_and_padding(tiny):
    models, tok = tiny
    single = run_proxy_tuning(models, tok, PROMPTS, NEW, alpha=1.0, batch_size=1)
    batched = run_proxy_tuning(models, tok, PROMPTS, NEW, alpha=1.0, batch_size=3)
    _sane(single, 3, 1)
    _sane(batched, 3, 3)
    oracle_models = [(models["base"], 1.0), (models["tuned"], 1.0), (models["untuned"], -1.0)]
    for prompt, got in zip(PROMPTS, single.outputs):
        assert got == _oracle(oracle_models, tok, prompt, NEW)
    assert batched.outputs == single.outputs  # left padding and positions are right


def test_proxy_tuning_with_alpha_zero_is_the_base_policy(tiny):
    models, tok = tiny
    proxy = run_proxy_tuning(models, tok, PROMPTS, NEW, alpha=0.0, batch_size=3)
    plain = run_hf_generate(models["base"], tok, PROMPTS, NEW, batch_size=3)
    _sane(plain, 3, 3)
    assert proxy.outputs == plain.outputs


def test_dera_loop_matches_oracle(tiny):
    models, tok = tiny
    result = run_dera(models, tok, PROMPTS[:2], NEW, beta=0.1, beta_prime=0.05)  # lambda 2: extrapolation
    _sane(result, 2, 1)
    assert result.params["lambda"] == pytest.approx(2.0)
    oracle_models = [(models["tuned"], 2.0), (models["base"], -1.0)]
    for prompt, got in zip(PROMPTS[:2], result.outputs):
        assert got == _oracle(oracle_models, tok, prompt, NEW)
    same = run_dera(models, tok, PROMPTS[:2], NEW, beta=0.1, beta_prime=0.1)  # lambda 1: the policy alone
    alone = run_hf_generate(models["tuned"], tok, PROMPTS[:2], NEW, batch_size=1)
    assert same.outputs == alone.outputs


def test_useful_tokens_cut_after_first_eos():
    rows = [[5, 1, 2, 2], [5, 6, 7, 8], [1, 2, 2, 2]]
    assert useful_tokens(rows, eos_id=1, ignore_eos=False) == [[5, 1], [5, 6, 7, 8], [1]]
    assert useful_tokens(rows, eos_id=1, ignore_eos=True) == rows


def test_peak_memory_sees_an_allocation():
    import numpy as np

    with PeakMemory() as mem:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        del block
    assert mem.rss_start_bytes > 0 and mem.rss_peak_bytes >= mem.rss_start_bytes
    if mem.exact:
        assert mem.rss_peak_bytes - mem.rss_start_bytes >= 48 * 2**20
    with ProcessRssSampler(os.getpid(), interval_s=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.samples >= 1 and sampler.peak_bytes >= sampler.start_bytes > 0


# ----------------------------------------------------------------------------- serving driver


def _sse_app(received: list):
    """An OpenAI-style streaming /v1/completions: one chunk per token, an end marker, usage, [DONE]."""
    app = FastAPI()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        received.append(body)
        if body["model"] == "broken":
            return JSONResponse({"error": {"message": "boom", "type": "server_error"}}, status_code=500)
        n, prompt = body["max_tokens"], body["prompt"]

        async def events():
            for i in range(n):
                await asyncio.sleep(0.002)
                finish = "length" if i == n - 1 else None
                chunk = {"object": "text_completion", "choices": [{"index": 0, "text": f" t{i}", "finish_reason": finish}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            yield 'data: {"choices": [{"index": 0, "text": "", "finish_reason": "length"}]}\n\n'  # end marker
            prompt_tokens = len(prompt) if isinstance(prompt, list) else len(prompt.split())
            usage = {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}
            yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def sse_server():
    import uvicorn

    received: list = []
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_sse_app(received), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            pytest.fail("tiny SSE server did not start")
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}", received
    server.should_exit = True
    thread.join(timeout=5)


def test_serve_benchmark_counts_and_latencies(sse_server):
    url, received = sse_server
    received.clear()
    mixture = {"weights": {"base": 0.5, "tuned": 0.5}}
    cfg = ServeConfig(base_url=url, model="base", mixture=mixture, num_prompts=12, input_len=8, output_len=6,
                      vocab_size=100, max_concurrency=4, server_pid=os.getpid(), save_requests=True)
    result = run_serve_benchmark(cfg)
    s = result["summary"]
    assert s["completed"] == 12 and s["failed"] == 0
    assert s["total_output_tokens"] == 72 and s["total_input_tokens"] == 96
    assert len(received) == 13  # the test request plus 12
    assert all(b["ignore_eos"] and b["stream"] and b["mixture"] == mixture and len(b["prompt"]) == 8
               for b in received)
    for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms"):
        stats = s[key]
        assert 0 < stats["mean"] and 0 < stats["median"] <= stats["p90"] <= stats["p99"]
    assert s["e2el_ms"]["median"] > s["ttft_ms"]["median"]
    per_request = result["requests"]
    assert all(len(r["itl"]) == 5 for r in per_request)  # 6 token chunks; the end marker is no token
    assert s["request_throughput"] == pytest.approx(12 / s["duration_s"])
    assert s["peak_server_rss_mib"] > 0


def test_serve_benchmark_poisson_varied_lengths(sse_server):
    url, _ = sse_server
    cfg = ServeConfig(base_url=url, model="base", num_prompts=10, input_len=5, output_len=8, range_ratio=0.5,
                      prompt_kind="text", request_rate=200.0, seed=3, test_request=False)
    wanted = sum(r.output_len for r in random_requests(10, 5, 8, 0.5, "text", seed=3))
    s = run_serve_benchmark(cfg)["summary"]
    assert s["completed"] == 10 and s["total_output_tokens"] == wanted


def test_serve_benchmark_reports_errors(sse_server):
    url, _ = sse_server
    s = run_serve_benchmark(ServeConfig(base_url=url, model="broken", num_prompts=3, input_len=4, output_len=4,
                                        vocab_size=50, test_request=False))["summary"]
    assert s["completed"] == 0 and s["failed"] == 3 and "HTTP 500" in s["errors"][0]
    assert s["ttft_ms"]["mean"] is None
    with pytest.raises(RuntimeError, match="test request"):
        run_serve_benchmark(ServeConfig(base_url=url, model="broken", num_prompts=1, input_len=4, output_len=4,
                                        vocab_size=50))


def test_serve_cli_writes_json_and_markdown(sse_server, tmp_path):
    url, _ = sse_server
    data = tmp_path / "prompts.jsonl"
    data.write_text('{"prompt": "hello there", "output_len": 3}\n\n{"prompt": [1, 2, 3]}\n')
    assert [r.output_len for r in jsonl_requests(data, 4)] == [3, 4]
    rc = serve_main(["--base-url", url, "--model", "base", "--dataset", "jsonl", "--dataset-path", str(data),
                     "--output-len", "4", "--result-dir", str(tmp_path), "--result-name", "run",
                     "--mixture", "dera"])
    assert rc == 0
    saved = json.loads((tmp_path / "run.json").read_text())
    assert saved["summary"]["total_output_tokens"] == 7 and saved["config"]["mixture"] == "dera"
    md = (tmp_path / "run.md").read_text()
    assert "| TTFT p99 (ms) |" in md and "output token throughput" in md

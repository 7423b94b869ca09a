"""Issue 5 through a live server on the native engine (tiny models): the mixing guard, backpressure
(queue, per-key limits, deadlines, the KV budget) and faults (disconnects, NaN, exceptions, out of
memory, a dead engine loop)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import openai
import pytest
import torch
import yaml

from api_helpers import LiveServer, sse_events
from engine_helpers import FaultyModel, faulty_prompt, make_request, submit
from policymix.api import build_app
from policymix.api.auth import hash_key
from policymix.config import ApiKeySpec
from policymix.engine.core import EngineCore
from policymix.engine.detokenizer import IncrementalDetokenizer
from policymix.engine.native import NativeEngine
from policymix.registry import Registry

JAILBREAK = {"weights": {"dpo": 1.0, "base": 1.5, "safe": -0.5}}  # pi_strong * pi_ref^1.5 / pi_safe^0.5
PROXY = {"proxy": {"base": "dpo", "tuned": "safe", "untuned": "base", "alpha": 1.0}}  # safe at +1: floors kept


def configured(tiny_registry, keys=(), **server):
    cfg = tiny_registry.config.model_copy(deep=True)
    for name, value in server.items():
        setattr(cfg.server, name, value)
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key(k), name=k, **scope) for k, scope in keys]
    return cfg


@contextmanager
def native_server(tiny_registry, keys=(), **server):
    """A live server over a fresh NativeEngine (own caches and queue) sharing the session's loaded models."""
    cfg = configured(tiny_registry, keys, **server)
    engine = NativeEngine(Registry(cfg, tiny_registry.policies))
    with LiveServer(build_app(engine, cfg, env={}, shutdown_s=5.0)) as srv:
        yield srv, engine


def slow_down(engine, seconds: float) -> None:
    """Every policy forward takes at least ``seconds`` (keeps requests running while a test looks)."""
    for runner in engine.core.runners.values():
        real = runner.forward

        def forward(real=real):
            time.sleep(seconds)
            return real()

        runner.forward = forward


def wait_for(pred, timeout: float = 20.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.01)
    return pred()


def idle(engine) -> bool:
    core = engine.core
    return (not core.running and not core.waiting and not engine._inbox
            and all(not r.slots for r in core.runners.values()) and all(v == 0 for v in core.reserved.values()))


def envelope(r: httpx.Response) -> dict:
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    return err


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


# ------------------------------------------------------------------------------------ the guard


def test_guard_without_keys_refuses_the_jailbreak_and_serves_proxy_tuning(tiny_registry):
    with native_server(tiny_registry) as (srv, _):
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="unused", max_retries=0)
        with pytest.raises(openai.PermissionDeniedError) as e:
            sdk.completions.create(model="dpo", prompt="x", max_tokens=2, extra_body={"mixture": JAILBREAK})
        assert e.value.status_code == 403 and e.value.code == "mixing_guard"
        assert "protected floor" in e.value.message and "'safe'" in e.value.message
        # MOD with a negative objective on the protected policy is the same inversion
        with pytest.raises(openai.PermissionDeniedError):
            sdk.chat.completions.create(model="safe", messages=[{"role": "user", "content": "x"}], max_tokens=2,
                                        extra_body={"mixture": {"reference": "base", "objectives": {"safe": -0.3}}})
        ok = sdk.completions.create(model="dpo", prompt="x", max_tokens=2, extra_body={"mixture": PROXY})
        assert ok.model_extra["policymix"]["weights"] == {"dpo": 1.0, "safe": 1.0, "base": -1.0}
        # DeRa realignment of the protected policy keeps its weight positive: served
        dera = {"reference": "base", "policy": "safe", "beta": 0.1, "beta_prime": 0.05}
        ok = sdk.completions.create(model="safe", prompt="x", max_tokens=2, extra_body={"mixture": dera})
        assert ok.model_extra["policymix"]["weights"] == pytest.approx({"safe": 2.0, "base": -1.0})


def test_guard_with_keys_scopes_and_logs(tiny_registry, caplog):
    keys = [("user", {}), ("lab", {"allow_inversion": True}), ("safe-only", {"policies": ["safe"]})]
    secret = "MY-SECRET-PROMPT-8d1f"
    with native_server(tiny_registry, keys) as (srv, _):
        def client(key):
            return openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)

        with caplog.at_level(logging.INFO):
            with pytest.raises(openai.PermissionDeniedError) as e:
                client("user").completions.create(model="dpo", prompt=secret, max_tokens=2,
                                                  extra_body={"mixture": JAILBREAK})
        assert e.value.code == "mixing_guard"
        ok = client("lab").completions.create(model="dpo", prompt=secret, max_tokens=2,
                                              extra_body={"mixture": JAILBREAK})
        assert ok.model_extra["policymix"]["weights"]["safe"] == -0.5
        # allow_inversion passes the floor rule only; the bounds hold for everyone
        with pytest.raises(openai.PermissionDeniedError, match="weight bound"):
            client("lab").completions.create(model="dpo", prompt="x", max_tokens=2,
                                             extra_body={"mixture": {"weights": {"base": 9.0, "safe": -8.0}}})
        # a key that may only use the protected policy never gets its reference alone
        safe_only = client("safe-only")
        safe_only.completions.create(model="safe", prompt="x", max_tokens=2)
        for model, mixture in (("base", None), ("safe", {"weights": {"base": 1.0}}),
                               ("safe", {"weights": {"safe": 0.0, "base": 1.0}}),
                               ("safe", {"reference": "base", "objectives": {"safe": 0.0}}),
                               ("safe", {"reference": "base", "policy": "safe", "beta": 0.1, "beta_prime": 0.2})):
            with pytest.raises(openai.PermissionDeniedError) as e:
                safe_only.completions.create(model=model, prompt="x", max_tokens=2,
                                             extra_body={"mixture": mixture} if mixture else None)
            assert e.value.status_code == 403, (model, mixture)
        # token signals would run the reference as an observer: refused for this key too
        with pytest.raises(openai.PermissionDeniedError) as e:
            safe_only.completions.create(model="safe", prompt="x", max_tokens=2,
                                         extra_body={"return_token_signals": True})
        assert "return_token_signals" in e.value.message
    refusals = [(r.key, r.rule, r.weights) for r in caplog.records if r.name == "policymix.guard"]
    assert [(key, "protected floor" in rule) for key, rule, _ in refusals] == [("user", True), ("lab", False)]
    assert refusals[0][2] == JAILBREAK["weights"] and "weight bound" in refusals[1][1]
    for record in caplog.records:  # no prompt text anywhere in the logs, extras included
        assert secret not in record.getMessage() and secret not in json.dumps(record.__dict__, default=str)


# ---------------------------------------------------------------------------------- backpressure


def test_full_queue_is_503_and_a_busy_key_429(tiny_registry):
    keys = [("single", {"max_concurrent": 1}), ("other", {})]
    with native_server(tiny_registry, keys, max_num_seqs=1, max_queue=1) as (srv, engine):
        slow_down(engine, 0.02)
        long_body = {"model": "base", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        short = {"model": "base", "prompt": "Hi", "max_tokens": 2}

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                async with c.stream("POST", "/v1/completions", json=long_body, headers=auth("single")) as r:
                    assert r.status_code == 200
                    lines = r.aiter_lines()  # kept: a dropped line iterator closes the connection
                    await anext(lines)  # running: it holds the only sequence slot
                    busy = await c.post("/v1/completions", json=short, headers=auth("single"))
                    burst = [asyncio.create_task(c.post("/v1/completions", json=short, headers=auth("other")))
                             for _ in range(4)]
                    for _ in range(1000):  # the refusals come at once; one request waits in the queue
                        if sum(t.done() for t in burst) >= 3:
                            break
                        await asyncio.sleep(0.01)
                # the long request leaves (disconnect): the queued one runs
                return busy, await asyncio.gather(*burst)

        busy, burst = asyncio.run(run())
    assert busy.status_code == 429 and busy.headers["retry-after"] == "1"
    assert envelope(busy)["code"] == "rate_limit_exceeded"
    codes = sorted(r.status_code for r in burst)
    assert codes == [200, 503, 503, 503], codes  # one queue place, one running slot (taken)
    for r in burst:
        if r.status_code == 503:
            assert int(r.headers["retry-after"]) >= 1 and envelope(r)["type"] == "server_overloaded"
            assert "full" in envelope(r)["message"]


def test_a_burst_on_an_idle_engine_is_not_refused(tiny_registry):
    # queue of 1, 8 sequence slots: 8 requests arriving at once all run (none waits for a step to be admitted)
    with native_server(tiny_registry, max_num_seqs=8, max_queue=1) as (srv, engine):
        slow_down(engine, 0.01)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = {"model": "base", "prompt": "Hi", "max_tokens": 4}
                return await asyncio.gather(*(c.post("/v1/completions", json=body) for _ in range(8)))

        assert [r.status_code for r in asyncio.run(run())] == [200] * 8


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_past_its_deadline_is_dropped(tiny_registry, stream):
    with native_server(tiny_registry, max_num_seqs=1, request_timeout_s=0.3) as (srv, engine):
        slow_down(engine, 0.02)
        seen = []
        real_render = engine.core.render
        engine.core.render = lambda req: seen.append(req) or real_render(req)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                long_body = {"model": "base", "prompt": "Hello", "max_tokens": 60, "ignore_eos": True}
                first = asyncio.create_task(c.post("/v1/completions", json=long_body))
                await asyncio.sleep(0.2)
                late = await c.post("/v1/completions", json={"model": "dpo", "prompt": "Hi", "max_tokens": 2,
                                                             "stream": stream})
                return await first, late

        first, late = asyncio.run(run())
        assert wait_for(lambda: idle(engine))
    assert first.status_code == 200
    assert late.status_code == 503, late.text  # before any byte: a real status, even when streaming
    err = envelope(late)
    assert err["code"] == "queue_timeout" and "deadline" in err["message"]
    assert late.headers["retry-after"] == "1"
    req = seen[-1]  # the engine got its deadline from server.request_timeout_s
    assert req.deadline == pytest.approx(req.arrival_time + 0.3)


def test_kv_budget_admission(tiny_registry):
    cfg = configured(tiny_registry, kv_budget_tokens=64)
    core = EngineCore(Registry(cfg, tiny_registry.policies))
    reqs = [make_request(core, "base", {"weights": {"base": 0.5, "dpo": 0.5}}, "Hello", max_tokens=30,
                         temperature=0, ignore_eos=True) for _ in range(3)]
    need = core.render(reqs[0]).reserved_tokens("dpo")
    assert 32 < need <= 64  # two cannot share the budget
    cols = [submit(core, r) for r in reqs]
    peak = 0
    while any(c.done is None for c in cols):
        core.step()
        for p in ("base", "dpo"):
            assert core.reserved[p] <= 64
            assert sum(core.runners[p].lengths) <= 64  # cached tokens, not only promises
        peak = max(peak, len(core.running))
    assert peak == 1 and all(c.done.error is None for c in cols)
    assert all(v == 0 for v in core.reserved.values())
    # n = 2 reserves for both samples: 2 * (prompt + max_tokens) > 64 is refused up front, with the numbers
    from policymix.errors import PolicymixError

    with pytest.raises(PolicymixError, match=f"needs {2 * need} KV-cache tokens .* budget of 64"):
        core.render(make_request(core, "base", None, "Hello", max_tokens=30, n=2, temperature=1.0))


def test_too_long_and_over_budget_are_400_with_the_numbers(tiny_registry):
    with native_server(tiny_registry, kv_budget_tokens=64, max_model_len=128) as (srv, _):
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "word " * 200, "max_tokens": 4})
        err = envelope(r)
        assert r.status_code == 400 and err["code"] == "context_length_exceeded" and err["param"] == "prompt"
        assert "128" in err["message"] and "for the completion" in err["message"]
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 100},
                       timeout=30)
        err = envelope(r)
        assert r.status_code == 400 and "budget of 64" in err["message"] and err["param"] == "max_tokens"


# ---------------------------------------------------------------------------------------- faults


def test_disconnect_mid_stream_frees_the_cache_at_once(tiny_registry):
    with native_server(tiny_registry) as (srv, engine):
        slow_down(engine, 0.005)
        body = {"model": "balanced", "prompt": "Hello", "max_tokens": 900, "n": 2, "temperature": 1.0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(timeout=60) as c:
            with c.stream("POST", f"{srv.url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                for _ in range(6):
                    next(lines)
                assert len(engine.core.runners["dpo"].slots) == 2 and engine.core.reserved["formal"] > 0
                steps_at_close = engine.core.steps
        assert wait_for(lambda: idle(engine))
        # freed within a few steps of the disconnect, not after the 900 tokens it asked for
        assert engine.core.steps - steps_at_close < 50
        stats = engine.stats()
        assert stats["running"] == 0 and stats["waiting"] == 0


def test_nan_in_one_request_is_an_sse_error_event_while_others_finish(tiny_registry):
    with native_server(tiny_registry) as (srv, engine):
        runner = engine.core.runners["small"]
        real = runner.forward
        calls = []

        def poisoned():  # the third step of policy `small` turns to NaN
            lp = real()
            calls.append(1)
            return torch.full_like(lp, float("nan")) if len(calls) >= 3 else lp

        runner.forward = poisoned

        async def read(c, body):
            async with c.stream("POST", "/v1/completions", json=body) as r:
                return r.status_code, "".join([line + "\n" async for line in r.aiter_lines()])

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                common = {"prompt": "Hello", "max_tokens": 12, "temperature": 0, "ignore_eos": True, "stream": True,
                          "logprobs": 1}  # a chunk for every token, even one that releases no text
                return await asyncio.gather(read(c, {**common, "model": "small"}),
                                            read(c, {**common, "model": "base"}))

        (bad_status, bad), (good_status, good) = asyncio.run(run())
        assert wait_for(lambda: idle(engine))
    assert bad_status == good_status == 200
    bad_events, good_events = sse_events(bad), sse_events(good)
    assert bad_events[-1] == "[DONE]" and "error" in bad_events[-2]
    assert bad_events[-2]["error"]["code"] == "nan" and "not finite" in bad_events[-2]["error"]["message"]
    assert len(bad_events) == 2 + 2  # two tokens streamed before the failure
    assert good_events[-1] == "[DONE]" and good_events[-2]["choices"][0]["finish_reason"] == "length"


def test_an_exception_in_one_requests_post_processing_fails_only_that_request(tiny_registry, monkeypatch):
    real_add = IncrementalDetokenizer.add

    def add(self, token_id):  # a request whose stop list holds BOOM crashes on its third token
        if "BOOM" in self.stop:
            self.boom = getattr(self, "boom", 0) + 1
            if self.boom == 3:
                raise RuntimeError("detokenizer bug")
        return real_add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", add)
    with native_server(tiny_registry) as (srv, engine):
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                common = {"model": "base", "prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True}
                return await asyncio.gather(c.post("/v1/completions", json={**common, "stop": ["BOOM"]}),
                                            c.post("/v1/completions", json={**common, "stream": True, "n": 2}),
                                            c.post("/v1/completions", json={**common, "stop": ["BOOM"], "stream": True}))

        crashed, fine, crashed_stream = asyncio.run(run())
        assert engine.is_healthy() and wait_for(lambda: idle(engine))
    assert crashed.status_code == 500
    assert "detokenizer bug" in envelope(crashed)["message"] and envelope(crashed)["code"] == "engine_error"
    events = sse_events(fine.text)
    assert [e["choices"][0]["finish_reason"] for e in events[:-1] if e["choices"][0]["finish_reason"]] == \
        ["length", "length"]
    events = sse_events(crashed_stream.text)
    assert "detokenizer bug" in events[-2]["error"]["message"]


def _cpu_allocator_failure():
    torch.empty(2**45, dtype=torch.float32)  # the genuine "can't allocate memory" of the CPU allocator


def _memory_error():
    raise MemoryError()


def _cuda_oom():
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (test)")


@pytest.mark.parametrize("oom", [_cpu_allocator_failure, _memory_error, _cuda_oom],
                         ids=["cpu-allocator", "MemoryError", "torch.OutOfMemoryError"])
def test_out_of_memory_at_admission_is_503_and_the_engine_keeps_serving(tiny_registry, oom):
    with native_server(tiny_registry) as (srv, engine):
        slow_down(engine, 0.005)
        cache = engine.core.runners["dpo"].cache
        real_reserve = cache.reserve
        failures = []

        def reserve(slots, capacity):  # the next allocation of policy `dpo` fails once
            if not failures:
                failures.append((slots, capacity))
                oom()
            return real_reserve(slots, capacity)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                body = {"model": "base", "prompt": "Hello", "max_tokens": 40, "ignore_eos": True, "stream": True}
                async with c.stream("POST", "/v1/completions", json=body) as running:
                    lines = running.aiter_lines()
                    seen = [await anext(lines)]
                    cache.reserve = reserve
                    refused = await c.post("/v1/completions", json={"model": "dpo", "prompt": "Hi", "max_tokens": 3})
                    seen += [line async for line in lines]
                    rest = "\n".join(seen) + "\n"
                again = await c.post("/v1/completions", json={"model": "dpo", "prompt": "Hi", "max_tokens": 3})
                return refused, rest, again

        refused, rest, again = asyncio.run(run())
        healthy = httpx.get(f"{srv.url}/health")
        assert wait_for(lambda: idle(engine))
    assert failures, "the admission did not allocate"
    assert refused.status_code == 503 and envelope(refused)["code"] == "out_of_memory"
    assert refused.headers["retry-after"] == "1" and "out of memory" in envelope(refused)["message"]
    events = sse_events(rest)  # the running request is unharmed
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    assert again.status_code == 200 and healthy.status_code == 200


def test_out_of_memory_in_a_forward_fails_only_the_request_whose_rows_raise(tiny_registry):
    # the batched forward raises; the engine runs its rows one by one: the request whose rows raise alone gets
    # 503 out_of_memory, the one beside it in the same forwards answers 200 with its full length
    trigger = 77
    with native_server(tiny_registry) as (srv, engine):
        runner = engine.core.runners["small"]
        runner.model = FaultyModel(runner.model, trigger, "oom")
        slow_down(engine, 0.02)

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                ok = asyncio.ensure_future(c.post("/v1/completions", json={
                    "model": "small", "prompt": "Hi", "max_tokens": 40, "ignore_eos": True}))
                await asyncio.sleep(0.2)
                bad = await c.post("/v1/completions", json={"model": "small", "prompt": faulty_prompt(trigger),
                                                            "max_tokens": 5})
                return bad, await ok

        bad, ok = asyncio.run(run())
    assert max(runner.model.hits) >= 2, "the faulty rows never shared a forward"  # the batch, then the row alone
    assert bad.status_code == 503 and envelope(bad)["code"] == "out_of_memory"
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 40


def test_health_turns_503_when_the_engine_loop_dies_and_nobody_is_left_waiting(tiny_registry):
    with native_server(tiny_registry) as (srv, engine):
        assert httpx.get(f"{srv.url}/health").status_code == 200
        fatal = []
        engine.on_fatal = fatal.append
        inside, release = threading.Event(), threading.Event()

        def step():  # the loop blocks in a step, then the step raises
            inside.set()
            release.wait(10)
            raise RuntimeError("engine bug")

        engine.core.step = step

        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=30) as c:
                body = {"model": "base", "prompt": "Hi", "max_tokens": 3}
                first = asyncio.create_task(c.post("/v1/completions", json=body))
                await asyncio.to_thread(inside.wait, 10)
                second = asyncio.create_task(c.post("/v1/completions", json=body))  # lands in the inbox
                await asyncio.to_thread(wait_for, lambda: engine._inbox, 10)
                release.set()
                return await first, await second

        first, second = asyncio.run(run())
        health = httpx.get(f"{srv.url}/health")
        after = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 1})
    for r in (first, second, after):
        assert r.status_code == 503, r.text
        assert "stopped" in envelope(r)["message"]
    assert health.status_code == 503 and envelope(health)["code"] == "unhealthy"
    assert fatal == ["RuntimeError: engine bug"]


def test_serve_exits_non_zero_when_the_engine_dies(tiny_dir, tmp_path):
    """A real `policymix serve` process whose engine step raises: the request is answered, the process exits 3."""
    config = tmp_path / "policymix.yaml"
    config.write_text(yaml.safe_dump({"policies": {"base": {"path": str(tiny_dir / "base")}}}))
    script = tmp_path / "dying_serve.py"
    script.write_text(
        "import sys\n"
        "from policymix import cli\n"
        "from policymix.engine.core import EngineCore\n"
        "def step(self):\n"
        "    raise RuntimeError('injected engine failure')\n"
        "EngineCore.step = step\n"
        "sys.exit(cli.main(sys.argv[1:]))\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLICYMIX_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, str(script), "serve", "--config", str(config), "--port", str(port),
                             "--log-level", "warning"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_for(lambda: _healthy(url) or proc.poll() is not None, timeout=120), "no health"
        assert proc.poll() is None, proc.stdout.read()
        r = httpx.post(f"{url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 503 and "injected engine failure" in envelope(r)["message"]
        out, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 3, out
    assert "the engine stopped: RuntimeError: injected engine failure" in out


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False


def test_stream_cleanup_runs_when_the_client_is_gone_before_the_first_byte():
    """ASGI 2.4 servers raise OSError from ``send`` once the client is gone: Starlette then never starts
    the SSE body, yet the engine request must be aborted and the key's concurrency slot given back."""
    from fake_engine import FakeEngine

    from api_helpers import fake_config

    engine = FakeEngine()
    app = build_app(engine, fake_config(api_keys=[{"key_sha256": hash_key("k"), "max_concurrent": 1}]), env={})

    async def call(stream: bool, gone: bool) -> list[dict]:
        body = json.dumps({"model": "base", "prompt": "hi", "max_tokens": 5, "stream": stream}).encode()
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        sent = []

        async def receive():
            if messages:
                return messages.pop()
            await asyncio.Event().wait()  # no disconnect message: the server reports it through send

        async def send(message):
            if gone:
                raise OSError("client disconnected")
            sent.append(message)

        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "raw_path": b"/v1/completions",
                 "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "scheme": "http",
                 "headers": [(b"content-type", b"application/json"), (b"authorization", b"Bearer k")],
                 "http_version": "1.1", "root_path": "", "asgi": {"version": "3.0", "spec_version": "2.4"}}
        try:
            await asyncio.wait_for(app(scope, receive, send), 10)
        except OSError:
            pass  # what the server sees of the ClientDisconnect: nobody to answer
        return sent

    async def run():
        await call(stream=True, gone=True)
        await asyncio.sleep(0.1)
        return await call(stream=False, gone=False)

    after = asyncio.run(run())
    assert engine.cancelled == [engine.requests[0].request_id]  # the engine request was aborted
    assert after[0]["status"] == 200, after  # the key's only slot was given back (else 429)
    metrics = app.state.serving.metrics.exposition().decode()
    assert 'policymix_requests_running{model="base"} 0.0' in metrics
    assert 'policymix_requests_waiting{model="base"} 0.0' in metrics

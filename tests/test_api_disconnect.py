"""A client that goes away cancels its engine request, streaming or not (live uvicorn, scripted engine)."""

from __future__ import annotations

import time

import httpx
import pytest

from api_helpers import live_fake
from fake_engine import FakeEngine


def wait_for(pred, timeout: float = 5.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


@pytest.mark.parametrize("stream", [False, True])
def test_disconnect_cancels_the_request(stream):
    engine = FakeEngine(delay=0.1)  # 13 tokens: 1.3 s if nobody leaves
    with live_fake(engine) as srv:
        body = {"model": "base", "prompt": "hi", "max_tokens": 20, "stream": stream}
        with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(5.0, read=0.35)) as c:
            if stream:
                with c.stream("POST", "/v1/completions", json=body) as r:
                    assert r.status_code == 200
                    next(r.iter_lines())  # the first token arrived; now leave
            else:
                with pytest.raises(httpx.ReadTimeout):
                    c.post("/v1/completions", json=body)
        t0 = time.monotonic()
        assert wait_for(lambda: len(engine.cancelled) == 1), "the engine request was not cancelled"
        assert time.monotonic() - t0 < 1.0
        assert not engine.active
        metrics = httpx.get(f"{srv.url}/metrics").text
        assert 'policymix_requests_total{model="base",outcome="aborted"} 1.0' in metrics
        assert 'policymix_requests_running{model="base"} 0.0' in metrics
        # the server keeps serving
        r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1})
        assert r.status_code == 200


def test_batched_prompts_all_cancelled():
    engine = FakeEngine(delay=0.1)
    with live_fake(engine) as srv:
        with httpx.Client(base_url=srv.url, timeout=httpx.Timeout(5.0, read=0.35)) as c:
            with pytest.raises(httpx.ReadTimeout):
                c.post("/v1/completions", json={"model": "base", "prompt": ["a", "b", "c"], "max_tokens": 20})
        assert wait_for(lambda: len(engine.cancelled) == 3)
        assert sorted(engine.cancelled) == sorted(r.request_id for r in engine.requests)

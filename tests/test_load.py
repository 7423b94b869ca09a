"""A bounded load test on loopback: waves of 2x the queue size of concurrent streaming requests, with
random disconnects, bad requests and a concurrency-limited key mixed in (native engine, tiny models).

Every request must end in exactly one known outcome (completed, rejected 429/503 with retry-after,
refused as bad input with the right 4xx, or disconnected by the client on purpose): nothing is lost,
nothing hangs, bad input never gets a 500. Afterwards the engine is back to idle (no cache slot, no
reserved token, nothing waiting, gauges at zero, process RSS within a tolerance of its warmed-up
level), and every seeded request that completed under load gives the same text when run alone.

    python -m pytest tests/test_load.py -q -s     # prints the counts (docs/reliability.md quotes them)
"""

from __future__ import annotations

import asyncio
import gc
import json
import random
from collections import Counter
from dataclasses import dataclass, field

import httpx
import psutil
import pytest

from api_helpers import LiveServer
from policymix.api import build_app
from policymix.api.auth import hash_key
from policymix.config import ApiKeySpec
from policymix.engine.native import NativeEngine
from policymix.registry import Registry

QUEUE = 8  # server.max_queue
SEQS = 4  # server.max_num_seqs
CONCURRENT = 2 * QUEUE  # streaming requests sent at once per wave
WAVES = 3
BAD_PER_WAVE = 6
LIMITED_KEY_CONCURRENCY = 2
REQUEST_TIMEOUT_S = 60  # a request without an answer by then counts as lost
RSS_TOLERANCE_MB = 64

CHAT = [{"role": "user", "content": "Tell me something."}]
RECIPES = [None, {"weights": {"base": 0.7, "dpo": 0.3}}, {"reference": "base", "policy": "dpo", "beta_prime": 0.2},
           {"proxy": {"base": "base", "tuned": "safe", "untuned": "small", "alpha": 0.5}}, "balanced"]
# (name, path, raw body, expected status)
BAD = [
    ("malformed json", "/v1/completions", b'{"model": "base", "prompt": ', 400),
    ("unknown model", "/v1/completions", {"model": "ghost", "prompt": "x"}, 404),
    ("negative max_tokens", "/v1/completions", {"model": "base", "prompt": "x", "max_tokens": -1}, 400),
    ("NaN weight", "/v1/completions", b'{"model": "base", "prompt": "x", "mixture": {"weights": {"base": NaN}}}', 400),
    ("jailbreak recipe", "/v1/completions",
     {"model": "dpo", "prompt": "x", "mixture": {"weights": {"dpo": 1, "base": 1, "safe": -1}}}, 403),
    ("too long prompt", "/v1/completions", {"model": "base", "prompt": "word " * 1500, "max_tokens": 4}, 400),
    ("greedy best_of", "/v1/completions", {"model": "base", "prompt": "x", "best_of": 2, "temperature": 0}, 400),
    ("two tokenizers", "/v1/chat/completions",
     {"model": "base", "messages": CHAT, "mixture": {"weights": {"base": 0.5, "other": 0.5}}}, 400),
    ("bad temperature", "/v1/chat/completions", {"model": "base", "messages": CHAT, "temperature": "hot"}, 400),
    ("no messages", "/v1/chat/completions", {"model": "base", "messages": []}, 400),
]


@dataclass
class Plan:
    """One streaming request of the load."""

    path: str
    body: dict
    key: str
    leave_after: int | None = None  # disconnect after this many events
    outcome: str = ""
    text: list[str] = field(default_factory=list)
    detail: str = ""

    @property
    def seeded(self) -> bool:
        return self.body.get("seed") is not None and self.body.get("temperature", 1.0) > 0


def plan_wave(rng: random.Random, wave: int) -> list[Plan]:
    plans = []
    for i in range(CONCURRENT):
        chat = rng.random() < 0.4
        recipe = rng.choice(RECIPES)
        body = {"model": "base" if recipe != "balanced" else "balanced", "max_tokens": rng.randint(24, 64),
                "stream": True, "ignore_eos": True, "temperature": rng.choice([0.0, 0.8, 1.0])}
        if isinstance(recipe, dict):
            body["mixture"] = recipe
        if body["temperature"] > 0:
            body["seed"] = 1000 * wave + i
            body["n"] = rng.choice([1, 1, 2])
        body.update({"messages": CHAT} if chat else {"prompt": f"Request {wave}-{i}: once upon a time"})
        leave = rng.choice([None] * 4 + [1, 3])  # about a third of the streams leave early
        key = "limited" if rng.random() < 0.25 else "open"
        plans.append(Plan("/v1/chat/completions" if chat else "/v1/completions", body, key, leave))
    return plans


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def _is_envelope(r: httpx.Response) -> bool:
    try:
        err = r.json()["error"]
    except (ValueError, KeyError, TypeError):
        return False
    return set(err) == {"message", "type", "param", "code"}


async def stream(client: httpx.AsyncClient, plan: Plan) -> None:
    """Run one streaming request to its outcome (sets plan.outcome)."""
    async with client.stream("POST", plan.path, json=plan.body, headers=auth(plan.key)) as r:
        if r.status_code != 200:
            await r.aread()
            ok = _is_envelope(r) and int(r.headers.get("retry-after", "0")) >= 1
            plan.outcome = f"rejected {r.status_code}" if r.status_code in (429, 503) and ok else "errored"
            plan.detail = r.text[:200]
            return
        events = []
        lines = r.aiter_lines()
        async for line in lines:
            if not line:
                continue
            assert line.startswith("data: "), line
            events.append(line[len("data: "):])
            if plan.leave_after is not None and len(events) >= plan.leave_after:
                plan.outcome = "disconnected"  # leaving the block closes the connection mid-stream
                return
            if events[-1] == "[DONE]":
                break
    chunks = [json.loads(e) for e in events[:-1]]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c.get("choices")
                and c["choices"][0].get("finish_reason")]
    n = plan.body.get("n", 1)
    if events[-1:] != ["[DONE]"] or any("error" in c for c in chunks) or len(finishes) != n:
        plan.outcome, plan.detail = "errored", " ".join(events)[-300:]
        return
    plan.outcome = "completed"
    plan.text = ["".join((c["choices"][0].get("text") or c["choices"][0].get("delta", {}).get("content") or "")
                         for c in chunks if c.get("choices") and c["choices"][0]["index"] == k) for k in range(n)]


async def bad(client: httpx.AsyncClient, name: str, path: str, body, expected: int) -> str:
    kwargs = {"content": body, "headers": {**auth("open"), "content-type": "application/json"}} \
        if isinstance(body, bytes) else {"json": body, "headers": auth("open")}
    r = await client.post(path, **kwargs)
    if r.status_code == expected and _is_envelope(r):
        return "bad input refused"
    return f"bad input answered {r.status_code}: {name}: {r.text[:150]}"


async def bounded(coro) -> str | None:
    try:
        await asyncio.wait_for(coro, REQUEST_TIMEOUT_S)
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return "lost"
    except httpx.HTTPError as err:
        return f"errored: {type(err).__name__}"
    return None


async def run_wave(client: httpx.AsyncClient, plans: list[Plan], bad_requests: list) -> list[str]:
    async def one(plan: Plan) -> str:
        failure = await bounded(stream(client, plan))
        if failure:
            plan.outcome = failure
        return plan.outcome

    async def one_bad(spec) -> str:
        result = []

        async def go():
            result.append(await bad(client, *spec))

        return await bounded(go()) or result[0]

    return list(await asyncio.gather(*(one(p) for p in plans), *(one_bad(b) for b in bad_requests)))


def rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def engine_idle(engine: NativeEngine) -> dict:
    core = engine.core
    return {"running": len(core.running), "waiting": len(core.waiting) + len(engine._inbox),
            "slots": sum(len(r.slots) for r in core.runners.values()),
            "reserved": sum(core.reserved.values())}


@pytest.fixture(scope="module")
def server(tiny_registry):
    cfg = tiny_registry.config.model_copy(deep=True)
    cfg.server.max_queue, cfg.server.max_num_seqs = QUEUE, SEQS
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key("open"), name="open"),
                           ApiKeySpec(key_sha256=hash_key("limited"), name="limited",
                                      max_concurrent=LIMITED_KEY_CONCURRENCY)]
    engine = NativeEngine(Registry(cfg, tiny_registry.policies))
    with LiveServer(build_app(engine, cfg, env={}, shutdown_s=5.0)) as srv:
        yield srv, engine


async def wait_idle(engine: NativeEngine, timeout: float = 20.0) -> dict:
    for _ in range(int(timeout / 0.02)):
        state = engine_idle(engine)
        if not any(state.values()):
            break
        await asyncio.sleep(0.02)
    return engine_idle(engine)


def test_load_with_disconnects_bad_input_and_seeded_determinism(server):
    srv, engine = server
    rng = random.Random(20261126)
    limits = httpx.Limits(max_connections=200, max_keepalive_connections=0)

    async def main():
        async with httpx.AsyncClient(base_url=srv.url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client:
            # warm-up: one wave grows the caches and allocator pools to their working size
            await run_wave(client, plan_wave(random.Random(1), 0), BAD[:2])
            await wait_idle(engine)
            before = {"rss_mb": rss_mb(), "kv_cache_bytes": sum(engine.stats()["kv_cache_bytes"].values())}
            outcomes: Counter = Counter()
            plans: list[Plan] = []
            for wave in range(1, WAVES + 1):
                wave_plans = plan_wave(rng, wave)
                bad_requests = rng.sample(BAD, BAD_PER_WAVE)
                outcomes.update(await run_wave(client, wave_plans, bad_requests))
                plans += wave_plans
            idle = await wait_idle(engine)
            after = {"rss_mb": rss_mb(), "kv_cache_bytes": sum(engine.stats()["kv_cache_bytes"].values())}
            metrics = (await client.get("/metrics")).text
            # seeded determinism: each seeded request that completed under load, now alone
            seeded = [p for p in plans if p.seeded and p.outcome == "completed"]
            mismatched = []
            for p in seeded:
                solo = Plan(p.path, p.body, "open")
                await stream(client, solo)
                if solo.text != p.text:
                    mismatched.append((p.body, p.text, solo.text))
            return outcomes, plans, before, after, idle, metrics, seeded, mismatched

    outcomes, plans, before, after, idle, metrics, seeded, mismatched = asyncio.run(main())
    total = WAVES * (CONCURRENT + BAD_PER_WAVE)
    print(f"\nload: {WAVES} waves x ({CONCURRENT} streams + {BAD_PER_WAVE} bad requests) = {total} requests; "
          f"queue {QUEUE}, {SEQS} sequences")
    for outcome, count in sorted(outcomes.items()):
        print(f"  {outcome:<22} {count}")
    print(f"  seeded requests compared with their solo run: {len(seeded)}, mismatched: {len(mismatched)}")
    print(f"  idle engine after the load: {idle}; RSS {before['rss_mb']:.0f} -> {after['rss_mb']:.0f} MiB; "
          f"KV cache {before['kv_cache_bytes'] / 2**20:.2f} -> {after['kv_cache_bytes'] / 2**20:.2f} MiB")

    assert sum(outcomes.values()) == total
    known = {"completed", "disconnected", "rejected 429", "rejected 503", "bad input refused"}
    unexpected = {o: c for o, c in outcomes.items() if o not in known}
    details = [p.detail for p in plans if p.outcome not in known]
    assert not unexpected, (unexpected, details[:3])  # nothing lost, errored, or a 500 for bad input
    assert outcomes["completed"] >= CONCURRENT and outcomes["disconnected"] > 0
    assert outcomes["rejected 503"] > 0 and outcomes["rejected 429"] > 0  # both limits were reached
    assert outcomes["bad input refused"] == WAVES * BAD_PER_WAVE
    assert len(seeded) >= 5 and not mismatched, mismatched[:2]
    assert not any(idle.values()), idle
    for gauge in ("policymix_requests_running", "policymix_requests_waiting"):
        values = [float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines() if line.startswith(gauge + "{")]
        assert values and all(v == 0 for v in values), (gauge, values)
    assert after["rss_mb"] - before["rss_mb"] < RSS_TOLERANCE_MB

"""Soak benchmark (issue 23, item 5): a live server under mixed traffic and injected faults for N minutes.

    OMP_NUM_THREADS=1 python -m benchmarks.soak                 # 10 minutes (the figure in docs/reliability.md)
    OMP_NUM_THREADS=1 python -m benchmarks.soak --quick         # about a minute: 10 s calibration + 1 min soak

It starts benchmarks/soak_server.py (the tiny test family plus three fault-injecting policies of
benchmarks/faults.py: a forward raising out-of-memory, NaN logits, a reward model raising) in a
subprocess, measures its capacity (answered requests per second, closed loop over the same mix, slow
readers left out), then sends Poisson arrivals at ``--load`` (default 80%) of that capacity for ``--minutes``:

- well-formed requests with random recipes (weights, MOD, DeRa, proxy, named, guidance, context-aware,
  prompt variants), best-of with every scorer (prune, soft), search, speculative, stop ids, logit bias;
  completions and chat, streamed or not;
- client disconnects (a stream closed after 1-3 events) and slow readers (a pause between events);
- bad traffic: the fuzz corpus of tests/strategies.py (issue 23's cases first);
- fault requests: each uses one of the fault policies.

It reports requests served, lost (no answer, a timeout or a stream cut before ``[DONE]``: must be 0),
well-formed requests that failed (a bystander harmed: must be 0), 5xx answers to bad input (must be 0),
the seeded canaries (alone at the start and at the end, and during the load: identical tokens), the
server's RSS slope after warm-up, and whether the engine is idle afterwards. Exit status 1 if a check
fails. Results: ``--out`` (default benchmarks/results/soak_cpu[_quick]) .md and .json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
REQUEST_TIMEOUT_S = 120.0

# ------------------------------------------------------------------------------------ the traffic

CHAT_SYSTEM = [{"role": "system", "content": "Be brief."}]
PROMPTS = ["Hi", "Hello there", "The quick brown fox", "Paris is the capital of", "A policy is",
           "Numbers: 1 2 3", "Unicode: café 東京 🙂"]


def recipe(rng: random.Random, chat: bool):
    """A well-formed mixture (None: the model alone) that the guard serves."""
    w = round(rng.uniform(0, 1), 3)
    choices = [
        None,
        {"weights": {"base": w, "dpo": round(1 - w, 3)}},
        {"weights": {"base": 1.0, "dpo": w, "small": -round(w / 2, 3)}},
        {"weights": {"safe": 1.0, "base": w}},
        {"reference": "base", "objectives": {"dpo": round(w * 0.6, 3), "small": 0.2}},
        {"reference": "base", "objectives": {"dpo": w}, "beta": 0.1, "beta_prime": 0.2},
        {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": rng.choice([0.05, 0.2, 0.5])},
        {"proxy": {"base": "base", "tuned": "dpo", "untuned": "small", "alpha": rng.choice([0.5, 1.0])}},
        "dpo-soft",
        "balanced",
        {"guidance": {"policy": "base", "scale": 1.5, "negative_prompt": "Rude words"}},
        {"weights": {"base": 1.0, "v": 0.5}, "prompt_variants": {"v": {"policy": "dpo", "system_prompt": "Be brief."}}},
        {"weights": {"dpo": 1.0, "v": -0.3}, "prompt_variants": {"v": {"policy": "dpo", "prompt": "Something else"}}},
    ]
    if chat:
        choices += [{"context_aware": {"policy": "formal", "alpha": 0.5, "drop": "system"}},
                    {"weights": {"base": 0.5, "v": 0.5},
                     "prompt_variants": {"v": {"policy": "small", "messages": [{"role": "user", "content": "Hey"}]}}}]
    return rng.choice(choices)


def good_body(rng: random.Random, chat: bool, stream: bool, max_tokens: int | None = None) -> dict:
    body: dict = {"model": rng.choice(["base", "dpo", "small", "safe", "formal"]),
                  "max_tokens": max_tokens or rng.randint(4, 24), "temperature": round(rng.uniform(0.6, 1.0), 2),
                  "seed": rng.randrange(2**31), "stream": stream}
    if chat:
        body["messages"] = [*CHAT_SYSTEM, {"role": "user", "content": rng.choice(PROMPTS)}]
    else:
        body["prompt"] = rng.choice(PROMPTS)
    m = recipe(rng, chat)
    if m is not None:
        body["mixture"] = m
    extra = rng.random()
    if extra < 0.15:
        rerank = rng.choice(["logprob", {"reward_model": "rm"},
                             {"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}}])
        if rng.random() < 0.5:  # with prune or soft (the logprob scorer as {})
            rerank = {} if rerank == "logprob" else rerank
            option = rng.choice(["prune", "soft"])
            rerank[option] = {"every": 4, "keep": 0.5} if option == "prune" else {"temperature": 1.0}
        body.update(best_of=rng.choice([2, 3]), rerank=rerank)
    elif extra < 0.22:
        body["search"] = {"beam_width": 2, "expand": 2, "chunk": 4, "max_tokens": 12,
                          "scorer": rng.choice(["logprob", {"implicit": {"policy": "dpo", "reference": "base",
                                                                          "beta": 0.1}}])}
        body.pop("max_tokens")
        body["stream"] = False
    elif extra < 0.32:
        body["speculative"] = {"draft": rng.choice(["small", "ngram"]), "num_tokens": rng.randint(2, 4)}
    if rng.random() < 0.2:
        body["stop_token_ids"] = [rng.randrange(7, 512)]
    if rng.random() < 0.2:
        body["logit_bias"] = {str(rng.randrange(7, 512)): rng.choice([-100, 5])}
    if rng.random() < 0.1:
        body["presence_penalty"] = 0.5
    return body


def fault_body(rng: random.Random, fault: str, chat: bool, stream: bool) -> dict:
    body = good_body(rng, chat, stream, max_tokens=rng.randint(6, 16))
    for key in ("search", "best_of", "rerank", "speculative"):
        body.pop(key, None)
    body["max_tokens"] = body.get("max_tokens") or 8
    body["ignore_eos"] = True
    if fault == "oom":
        body["model"] = "oom"
        body["mixture"] = rng.choice([None, {"weights": {"base": 0.5, "oom": 0.5}}])
    elif fault == "nan":
        body["mixture"] = rng.choice([{"weights": {"base": 0.5, "nan": 0.5}}, {"weights": {"nan": 1.0}}])
    else:
        body.update(best_of=2, rerank={"reward_model": "rm_broken"})
    if body.get("mixture") is None:
        body.pop("mixture", None)
    return body


def corpus(count: int, seed: int) -> list[tuple[str, dict]]:
    """The fuzz corpus (tests/strategies.py): issue 23's cases first, then ``count`` drawn bodies per operation."""
    sys.path.insert(0, str(ROOT / "tests"))
    import strategies as S

    out = [(op, body) for op in ("completions", "chat") for body in S.EXPLICIT[op]]
    for op in ("completions", "chat"):
        out += [(op, body) for body in S.sample(S.bodies(op), count, seed)]
    return out


def encode(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()


# ------------------------------------------------------------------------------------ one request


@dataclass
class Answer:
    status: int | None = None  # None: no HTTP answer
    complete: bool = False  # a JSON body, or a stream that ended with [DONE]
    error: dict | None = None  # the error envelope's "error" (status or SSE event)
    tokens: list[str] = field(default_factory=list)  # logprobs tokens (canaries)
    disconnected: bool = False  # we closed the stream on purpose
    transport: str | None = None  # the transport error, if any


def _error_of(text: str) -> dict | None:
    try:
        err = json.loads(text).get("error")
    except (ValueError, AttributeError):
        return {"message": f"not an error envelope: {text[:200]}", "type": "?", "code": None}
    return err if isinstance(err, dict) else {"message": str(err), "type": "?", "code": None}


def _tokens(ev: dict) -> list[str]:
    out = []
    for choice in ev.get("choices") or []:
        lp = choice.get("logprobs") or {}
        out += lp.get("tokens") or [t["token"] for t in lp.get("content") or []]
    return out


async def _sse(r: httpx.Response):
    """The ``data:`` payloads of an SSE body. Events end with a blank line; not ``aiter_lines``, which also
    splits at U+2028, U+0085 and the like (``str.splitlines``), characters a JSON string may hold as they are."""
    buf = b""
    async for chunk in r.aiter_bytes():
        buf += chunk
        while b"\n\n" in buf:
            event, buf = buf.split(b"\n\n", 1)
            for line in event.decode("utf-8").split("\n"):
                if line.startswith("data: "):
                    yield line[len("data: "):]


async def send(client: httpx.AsyncClient, path: str, body: dict, *, close_after: int | None = None,
               slow_s: float = 0.0) -> Answer:
    a = Answer()
    try:
        if not body.get("stream") is True:
            r = await client.post(path, content=encode(body), headers={"content-type": "application/json"})
            a.status = r.status_code
            if r.status_code != 200:
                a.error, a.complete = _error_of(r.text), True
                return a
            text = r.text
            if text.startswith("data: "):  # a stream the body did not ask for as `stream: true` (fuzz corpus)
                a.complete = text.endswith("data: [DONE]\n\n")
                return a
            out = json.loads(text)
            a.complete, a.tokens = True, _tokens(out)
            return a
        async with client.stream("POST", path, content=encode(body), headers={"content-type": "application/json"}) as r:
            a.status = r.status_code
            if r.status_code != 200:
                a.error, a.complete = _error_of((await r.aread()).decode("utf-8", "replace")), True
                return a
            async for payload in _sse(r):
                if payload == "[DONE]":
                    a.complete = True
                    break
                ev = json.loads(payload)
                if "error" in ev:
                    a.error = ev["error"]
                a.tokens += _tokens(ev)
                if close_after is not None and (close_after := close_after - 1) == 0:
                    a.disconnected = True
                    break
                if slow_s:
                    await asyncio.sleep(slow_s)
    except (httpx.TransportError, ValueError) as e:  # ValueError: a body that is not JSON
        a.transport = f"{type(e).__name__}: {e}"
    return a


# ------------------------------------------------------------------------------------ the run


@dataclass
class Tally:
    outcomes: Counter = field(default_factory=Counter)  # (kind, outcome)
    bad_statuses: Counter = field(default_factory=Counter)
    fault_answers: Counter = field(default_factory=Counter)  # (fault, status, code)
    bad_5xx: dict = field(default_factory=dict)  # message -> smallest body
    good_failures: list = field(default_factory=list)  # (body, status, error)
    lost: list = field(default_factory=list)  # (kind, body, what)

    def count(self, kind: str, outcome: str) -> None:
        self.outcomes[(kind, outcome)] += 1


def _overloaded(a: Answer) -> bool:
    """Backpressure, not a failure: 429/503 with an overload code (the client is told to retry)."""
    return a.status in (429, 503) and a.error is not None and a.error.get("code") in (
        "server_overloaded", "rate_limit_exceeded", None)


def classify(t: Tally, kind: str, body: dict, a: Answer) -> None:
    """Every request gets exactly one outcome."""
    if a.transport is not None or (a.status is not None and not a.complete and not a.disconnected):
        t.count(kind, "lost")
        t.lost.append((kind, body, a.transport or f"{a.status}, stream cut before [DONE]"))
        return
    if kind == "bad" and _overloaded(a):  # the queue was full before its fields were looked at
        t.bad_statuses[a.status] += 1
        t.count(kind, "refused (overloaded)")
        return
    if kind == "bad":
        server_error = (a.status or 0) >= 500 or (a.error is not None and a.error.get("type") == "server_error")
        t.bad_statuses[a.status if not (a.status == 200 and a.error) else "200+error event"] += 1
        t.count(kind, "5xx" if server_error else "answered")
        if server_error:
            msg = str(a.error.get("message") if a.error else a.status)[:120]
            if msg not in t.bad_5xx or len(encode(body)) < len(encode(t.bad_5xx[msg])):
                t.bad_5xx[msg] = body
        return
    if kind.startswith("fault"):
        t.fault_answers[(kind, a.status, (a.error or {}).get("code"))] += 1
        t.count(kind, "answered with an error" if a.error else "served")
        return
    if a.error is None and a.status == 200:
        t.count(kind, "disconnected" if a.disconnected else "served")
    elif _overloaded(a):
        t.count(kind, "refused (overloaded)")
    else:
        t.count(kind, "failed")
        t.good_failures.append((body, a.status, a.error))


CANARIES = [
    ("/v1/completions", {"model": "base", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0.9,
                         "seed": 4242, "ignore_eos": True, "stream": True, "logprobs": 0,
                         "mixture": {"weights": {"base": 0.6, "dpo": 0.4}}}),
    ("/v1/chat/completions", {"model": "dpo", "messages": [{"role": "user", "content": "Hello there"}],
                              "max_tokens": 24, "temperature": 1.0, "seed": 99, "ignore_eos": True, "stream": True,
                              "logprobs": True, "mixture": {"reference": "base", "objectives": {"dpo": 0.5,
                                                                                                "small": 0.3}}}),
]


async def canaries(client: httpx.AsyncClient) -> list[list[str] | str]:
    """Each canary's tokens, or what went wrong (a string). A refusal (429/503) is retried after its
    retry-after: it says nothing about tokens."""
    out = []
    for path, body in CANARIES:
        for _ in range(20):
            a = await send(client, path, body)
            if a.status not in (429, 503) or a.error is None or a.error.get("code") == "out_of_memory":
                break
            await asyncio.sleep(1.0)
        out.append(a.tokens if a.complete and a.error is None and a.tokens else f"{a.status} {a.error} {a.transport}")
    return out


def _path(chat: bool) -> str:
    return "/v1/chat/completions" if chat else "/v1/completions"


async def request(kind: str, r: random.Random, client: httpx.AsyncClient, bad_client: httpx.AsyncClient,
                  bad: list[tuple[str, dict]]) -> tuple[dict, Answer]:
    """One request of ``kind`` (a kind of MIX), drawn from ``r``: (its body, its answer)."""
    chat = r.random() < 0.5
    if kind == "bad":
        op, body = bad[r.randrange(len(bad))]
        return body, await send(bad_client, _path(op == "chat"), body)
    if kind.startswith("fault"):
        body = fault_body(r, kind[6:], chat, r.random() < 0.5)
        return body, await send(client, _path(chat), body)
    if kind in ("disconnect", "slow"):
        body = good_body(r, chat, True, max_tokens=48 if kind == "disconnect" else 32)
        if "search" in body:
            del body["search"]
        body.update(stream=True, max_tokens=body.get("max_tokens") or 32, ignore_eos=True)
        if kind == "disconnect":
            return body, await send(client, _path(chat), body, close_after=r.randint(1, 3))
        body.update({"logprobs": True, "top_logprobs": 5} if chat else {"logprobs": 5})  # big events, read slowly
        return body, await send(client, _path(chat), body, slow_s=0.25)
    body = good_body(r, chat, r.random() < 0.5)
    return body, await send(client, _path(chat), body)


async def calibrate(client: httpx.AsyncClient, bad_client: httpx.AsyncClient, bad: list, mix: list, seconds: float,
                    concurrency: int, seed: int) -> dict:
    """Closed loop: ``concurrency`` workers send the soak's mix back to back (slow readers left out: their pauses
    are the client's); answered requests per second. Refusals (429/503) do not count."""
    rng = random.Random(seed)
    kinds, weights = zip(*[(k, w) for k, w in mix if k != "slow"])
    end = time.monotonic() + seconds
    done, failed = 0, 0

    async def worker():
        nonlocal done, failed
        while time.monotonic() < end:
            _, a = await request(rng.choices(kinds, weights)[0], random.Random(rng.random()), client, bad_client, bad)
            if a.complete and a.status not in (429, 503) or a.disconnected:
                done += 1
            else:
                failed += 1

    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.monotonic() - start
    return {"seconds": round(elapsed, 1), "concurrency": concurrency, "completed": done, "not_completed": failed,
            "capacity_rps": round(done / elapsed, 2)}


def rss_of(pid: int) -> int | None:
    try:
        import psutil

        p = psutil.Process(pid)
        return p.memory_info().rss + sum(c.memory_info().rss for c in p.children(recursive=True))
    except Exception:  # noqa: BLE001 - the server may be gone at the very end
        return None


def slope_mib_per_min(samples: list[tuple[float, int]]) -> float | None:
    if len(samples) < 3:
        return None
    ts, ys = [s[0] for s in samples], [s[1] / 2**20 for s in samples]
    mt, my = sum(ts) / len(ts), sum(ys) / len(ys)
    var = sum((t - mt) ** 2 for t in ts)
    return None if var == 0 else 60 * sum((t - mt) * (y - my) for t, y in zip(ts, ys)) / var


async def engine_idle(client: httpx.AsyncClient, timeout_s: float = 20.0) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        text = (await client.get("/metrics")).text
        values = [float(line.split()[-1]) for line in text.splitlines()
                  if line.startswith(("policymix_engine_running ", "policymix_engine_waiting "))]
        if len(values) == 2 and not any(values):
            return True
        await asyncio.sleep(0.5)
    return False


MIX = [("good", 0.62), ("disconnect", 0.10), ("slow", 0.05), ("bad", 0.15), ("fault-oom", 0.027),
       ("fault-nan", 0.027), ("fault-reward", 0.026)]


async def soak(args, base_url: str, server_pid: int | None) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=32)
    # bad traffic on connections of its own, one per request: a request that breaks its connection must
    # not fail the next request sent on it (that would be counted as lost, on the wrong request)
    once = httpx.Limits(max_connections=None, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=limits) as client, \
            httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT_S, limits=once) as bad_client:
        bad = corpus(args.corpus, args.seed)
        start_canary = await canaries(client)
        if any(isinstance(c, str) for c in start_canary):
            raise RuntimeError(f"the canaries fail on an idle server: {start_canary}")
        cal = await calibrate(client, bad_client, bad, args.mix, args.calibrate_seconds, args.calibrate_concurrency,
                              args.seed)
        rate = args.load * cal["capacity_rps"]
        print(f"capacity {cal['capacity_rps']} req/s (closed loop, {cal['concurrency']} in flight); "
              f"soak at {rate:.2f} req/s for {args.minutes} min", flush=True)
        t, rng = Tally(), random.Random(args.seed + 1)
        rss: list[tuple[float, int]] = []
        during = {"runs": 0, "mismatches": 0, "errors": 0, "error_examples": []}
        tasks: set[asyncio.Task] = set()
        start = time.monotonic()
        duration = args.minutes * 60

        async def one(kind: str, i: int):
            body, a = await request(kind, random.Random(args.seed * 1_000_003 + i), client, bad_client, bad)
            classify(t, kind, body, a)

        async def canary_loop():
            while time.monotonic() - start < duration:
                await asyncio.sleep(args.canary_every)
                got = await canaries(client)
                during["runs"] += 1
                during["errors"] += sum(isinstance(g, str) for g in got)
                during["error_examples"] = (during["error_examples"] + [g[:300] for g in got if isinstance(g, str)])[:5]
                during["mismatches"] += sum(not isinstance(g, str) and g != w for g, w in zip(got, start_canary))

        async def rss_loop():
            while time.monotonic() - start < duration:
                if server_pid is not None and (v := rss_of(server_pid)) is not None:
                    rss.append((time.monotonic() - start, v))
                await asyncio.sleep(1.0)

        helpers = [asyncio.create_task(canary_loop()), asyncio.create_task(rss_loop())]
        kinds, weights = zip(*args.mix)
        i = 0
        while time.monotonic() - start < duration:
            await asyncio.sleep(rng.expovariate(rate))
            kind = rng.choices(kinds, weights)[0]
            task = asyncio.create_task(one(kind, i))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            i += 1
        pending = list(tasks)
        _, not_done = await asyncio.wait(pending, timeout=REQUEST_TIMEOUT_S) if pending else (set(), set())
        for task in not_done:  # never answered in time
            task.cancel()
            t.count("?", "lost")
            t.lost.append(("?", None, f"no answer {REQUEST_TIMEOUT_S:.0f} s after the soak"))
        for h in helpers:
            h.cancel()
        soak_s = time.monotonic() - start
        idle = await engine_idle(client)
        end_canary = await canaries(client)
    warm = [s for s in rss if s[0] >= 0.25 * duration]
    sent = sum(t.outcomes.values())
    lost = sum(n for (k, o), n in t.outcomes.items() if o == "lost")
    failed = sum(n for (k, o), n in t.outcomes.items() if o == "failed")
    refused = sum(n for (k, o), n in t.outcomes.items() if o == "refused (overloaded)")
    bad_5xx = sum(n for (k, o), n in t.outcomes.items() if k == "bad" and o == "5xx")
    served = sum(n for (k, o), n in t.outcomes.items() if k in ("good", "slow", "disconnect")
                 and o in ("served", "disconnected"))
    answered = sum(n for (k, o), n in t.outcomes.items() if o != "lost")
    checks = {"lost == 0": lost == 0, "well-formed failed == 0": failed == 0, "bad-input 5xx == 0": bad_5xx == 0,
              "canary start == end": start_canary == end_canary,
              "canary during load identical": during["mismatches"] == 0 and during["errors"] == 0,
              "engine idle after": idle}
    return {
        "calibration": cal, "rate_rps": round(rate, 2), "soak_seconds": round(soak_s, 1), "sent": sent,
        "served": served, "answered": answered, "lost": lost, "well_formed_refused": refused,
        "well_formed_failed": failed, "bad_input_5xx": bad_5xx,
        "outcomes": {f"{k}: {o}": n for (k, o), n in sorted(t.outcomes.items())},
        "bad_statuses": {str(k): n for k, n in sorted(t.bad_statuses.items(), key=str)},
        "fault_answers": {f"{k} -> {s} {c}": n for (k, s, c), n in sorted(t.fault_answers.items(), key=str)},
        "canary": {"start_equals_end": start_canary == end_canary, **during},
        "rss_mib": {"first": round(rss[0][1] / 2**20, 1) if rss else None,
                    "last": round(rss[-1][1] / 2**20, 1) if rss else None,
                    "max": round(max(v for _, v in rss) / 2**20, 1) if rss else None,
                    "slope_after_warmup_mib_per_min": None if (s := slope_mib_per_min(warm)) is None else round(s, 2),
                    "samples": len(rss),
                    "series": [[round(t_), round(v / 2**20, 1)] for t_, v in rss[::5]]},  # every 5 s: [s, MiB]
        "engine_idle_after": idle,
        "checks": checks, "passed": all(checks.values()),
        "bad_input_5xx_bodies": [{"message": m, "body": encode(b).decode()[:600]} for m, b in t.bad_5xx.items()],
        "well_formed_failures": [{"status": s, "error": e, "body": encode(b).decode()[:400]}
                                 for b, s, e in t.good_failures[:10]],
        "lost_examples": [{"kind": k, "what": w, "body": encode(b).decode()[:400] if b else None}
                          for k, b, w in t.lost[:10]],
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    port = _free_port()
    log = Path(tempfile.mkstemp(prefix="soak-server-", suffix=".log")[1])
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "POLICYMIX_API_KEY": ""}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.soak_server", "--models", args.models, "--port",
                             str(port), "--max-num-seqs", str(args.max_num_seqs)], cwd=ROOT, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    end = time.monotonic() + 600
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the soak server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url, log
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the soak server did not become healthy in 600 s")


def write(result: dict, args, command: str) -> None:
    from benchmarks.report import machine_info, markdown_table, write_report

    r = result
    rows = [
        {"metric": "capacity (answered req/s, closed loop over the mix without slow readers)",
         "value": r["calibration"]["capacity_rps"]},
        {"metric": f"offered load (req/s, {args.load:.0%} of capacity)", "value": r["rate_rps"]},
        {"metric": "soak duration (s)", "value": r["soak_seconds"]},
        {"metric": "requests sent", "value": r["sent"]},
        {"metric": "well-formed requests served (completed, or disconnected by the client)", "value": r["served"]},
        {"metric": "requests answered (anything but lost)", "value": r["answered"]},
        {"metric": "well-formed requests refused (429/503 with retry-after: over capacity)",
         "value": r["well_formed_refused"]},
        {"metric": "lost (no answer, timeout, stream cut before [DONE])", "value": r["lost"]},
        {"metric": "well-formed requests that failed (bystanders harmed)", "value": r["well_formed_failed"]},
        {"metric": "5xx answers to bad input", "value": r["bad_input_5xx"]},
        {"metric": "canary identical at start and end", "value": r["canary"]["start_equals_end"]},
        {"metric": "canary runs during load / mismatches / errors",
         "value": f"{r['canary']['runs']} / {r['canary']['mismatches']} / {r['canary']['errors']}"},
        {"metric": "server RSS first / last / max (MiB)",
         "value": f"{r['rss_mib']['first']} / {r['rss_mib']['last']} / {r['rss_mib']['max']}"},
        {"metric": "RSS slope after warm-up (MiB/min)", "value": r["rss_mib"]["slope_after_warmup_mib_per_min"]},
        {"metric": "engine idle after the soak", "value": r["engine_idle_after"]},
        {"metric": "all checks passed", "value": r["passed"]},
    ]
    notes = ["## Outcomes by kind", "", "| kind: outcome | requests |", "|---|---|"]
    notes += [f"| {k} | {n} |" for k, n in r["outcomes"].items()]
    notes += ["", "## Fault requests (fault -> status, code)", "", "| answer | requests |", "|---|---|"]
    notes += [f"| {k} | {n} |" for k, n in r["fault_answers"].items()]
    notes += ["", f"Bad traffic (fuzz corpus) statuses: {r['bad_statuses']}", ""]
    if r["bad_input_5xx_bodies"]:
        notes += ["## 5xx answers to bad input (smallest body per message)", "",
                  "A message may reach requests other than the one that caused it (a failure shared by a step): "
                  "the body shown is the smallest that got it.", ""]
        notes += [f"- {b['message']}\n  `{b['body']}`" for b in r["bad_input_5xx_bodies"]]
    if r["well_formed_failures"]:
        notes += ["", "## Well-formed requests that failed (first 10)", ""]
        notes += [f"- {f['status']} {json.dumps(f['error'])[:300]}\n  `{f['body']}`" for f in r["well_formed_failures"]]
    if r["canary"]["error_examples"]:
        notes += ["", "## Canary errors under the load (first 5)", ""]
        notes += [f"- `{e}`" for e in r["canary"]["error_examples"]]
    if r["lost_examples"]:
        notes += ["", "## Lost requests (first 10)", ""]
        notes += [f"- {f['kind']}: {f['what']}\n  `{f['body']}`" for f in r["lost_examples"]]
    meta = {**machine_info(), "command": command, "mix": ", ".join(f"{k} {w:.0%}" for k, w in args.mix),
            "server": "benchmarks/soak_server.py (tiny test family + fault policies oom, nan, rm_broken), "
                      f"max_num_seqs {args.max_num_seqs}"}
    md, js = write_report(args.out, "Soak: mixed traffic, bad input and injected faults", meta,
                          markdown_table(rows, [("metric", "metric"), ("value", "value")]), result, "\n".join(notes))
    print(f"wrote {md} and {js}")


def _mix(text: str) -> list[tuple[str, float]]:
    kinds = dict(MIX)
    out = []
    for part in text.split(","):
        kind, _, weight = part.partition("=")
        if kind not in kinds:
            raise argparse.ArgumentTypeError(f"unknown kind {kind!r} (one of {', '.join(kinds)})")
        out.append((kind, float(weight)))
    return out


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description="Soak a policymix server under mixed traffic, bad input and faults.")
    ap.add_argument("--minutes", type=float, default=10.0, help="soak duration (default 10)")
    ap.add_argument("--quick", action="store_true", help="1 minute, 10 s calibration, a smaller corpus")
    ap.add_argument("--load", type=float, default=0.8, help="arrival rate as a fraction of the capacity (0.8)")
    ap.add_argument("--calibrate-seconds", type=float, default=30.0)
    ap.add_argument("--calibrate-concurrency", type=int, default=8)
    ap.add_argument("--corpus", type=int, default=300, help="fuzz-corpus bodies per operation (bad traffic)")
    ap.add_argument("--mix", type=_mix, default=MIX, metavar="KIND=W,...",
                    help="traffic kinds and weights (default " + ",".join(f"{k}={w}" for k, w in MIX) + ")")
    ap.add_argument("--canary-every", type=float, default=15.0, help="seconds between canary runs under load")
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--models", default=str(ROOT / ".cache" / "soak-models"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base-url", help="drive this running soak server instead of starting one")
    ap.add_argument("--server-pid", type=int, help="with --base-url: the server's pid, for its RSS")
    ap.add_argument("--out", help="result path stem (default benchmarks/results/soak_cpu, _quick with --quick)")
    args = ap.parse_args(argv)
    if args.quick:
        args.minutes, args.calibrate_seconds, args.corpus, args.canary_every = 1.0, 10.0, 100, 10.0
    args.out = args.out or str(ROOT / "benchmarks" / "results" / ("soak_cpu_quick" if args.quick else "soak_cpu"))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "OMP_NUM_THREADS=1 python -m benchmarks.soak " + " ".join(argv if argv is not None else sys.argv[1:])
    proc = None
    if args.base_url:
        url, pid = args.base_url, args.server_pid
    else:
        proc, url, log = start_server(args)
        pid = proc.pid
        print(f"soak server up at {url} (pid {pid}, log {log})", flush=True)
    try:
        result = asyncio.run(soak(args, url, pid))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    write(result, args, command)
    for name, ok in result["checks"].items():
        print(f"  {'ok  ' if ok else 'FAIL'} {name}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

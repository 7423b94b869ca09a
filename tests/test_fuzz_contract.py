"""Contract-wide fuzzing of /v1/completions and /v1/chat/completions (issue 23, item 4).

tests/strategies.py draws bodies that use every field of the request contract, valid first and then with
hostile parts (lone surrogates, NUL, astral characters, huge and non-finite numbers, out-of-vocabulary ids,
messages of every shape, every mixture form with variants, guidance and context-aware, search, rerank with
prune and soft, speculative). The invariants, checked on every answer:

- never a 5xx, neither as a status nor as an SSE error event of a server error inside a 200 stream;
- every error is exactly the OpenAI envelope ``{"error": {"message", "type", "param", "code"}}``, as valid
  UTF-8 JSON;
- a 200 never serves what the mixing guard refuses (the clear cases of docs/guard.md: a protected policy's
  weights below its floor, an implicit-reward scorer with a protected reference, a prompted protected
  policy under another system prompt or under negative context-aware decoding);
- a seeded canary stream, running beside the fuzzer the whole time, keeps its tokens (the same as alone).

Failures are collected, not raised at the first one, so that one run lists every distinct failure with
its smallest body. CI runs ``FUZZ_CONTRACT_EXAMPLES`` examples per operation (default 40); ``make fuzz``
runs 300 and writes the figure to ``FUZZ_REPORT`` (benchmarks/results/fuzz.md and .json).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import logging
import threading
import time
import traceback
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

import strategies as S
from api_helpers import LiveServer
from policymix.api import build_app
from policymix.config import PolicySpec
from policymix.engine.native import NativeEngine
from policymix.registry import Registry

EXAMPLES = int(os.environ.get("FUZZ_CONTRACT_EXAMPLES", "40"))
REPORT = os.environ.get("FUZZ_REPORT")  # a path stem: write the figure there (make fuzz)
DERANDOMIZE = not os.environ.get("FUZZ_EXPLORE")  # CI replays the same examples; FUZZ_EXPLORE=1 searches anew
CALL_TIMEOUT_S = 60
PROTECTED = {"safe": 0.0, S.PROTECTED_PROMPTED: 0.0}  # protected policy -> floor
SERVER_ERROR_CODES = {"engine_error", "internal_error"}

CANARIES = [
    ("/v1/completions", {"model": "base", "prompt": "The quick brown fox", "max_tokens": 24, "temperature": 0.9,
                         "seed": 4242, "ignore_eos": True, "stream": True, "logprobs": 0,
                         "mixture": {"weights": {"base": 0.6, "dpo": 0.4}}}),
    ("/v1/chat/completions", {"model": "dpo", "messages": [{"role": "user", "content": "Hello there"}],
                              "max_tokens": 24, "temperature": 1.0, "seed": 99, "ignore_eos": True, "stream": True,
                              "logprobs": True, "mixture": {"reference": "base", "objectives": {"dpo": 0.5,
                                                                                                "small": 0.3}}}),
]


@pytest.fixture(scope="module")
def server(tiny_registry):
    cfg = tiny_registry.config.model_copy(deep=True)
    cfg.server.max_model_len = 40  # bounds every generation: the fuzzer may ask for max_tokens=10**12
    cfg.server.max_best_of = 4
    base = tiny_registry.policies["base"]
    spec = PolicySpec(path=base.spec.path, system_prompt="Answer safely and kindly.", reference="base", beta=0.1,
                      protected=True)
    cfg.policies[S.PROTECTED_PROMPTED] = spec  # a prompted protected policy: the guard's prompt rules apply
    policies = {**tiny_registry.policies,
                S.PROTECTED_PROMPTED: dataclasses.replace(base, name=S.PROTECTED_PROMPTED, spec=spec, beta=0.1)}
    engine = NativeEngine(Registry(cfg, policies))
    with LiveServer(build_app(engine, cfg, env={}, shutdown_s=5.0)) as srv:
        yield srv, engine


# ------------------------------------------------------------------------------------- invariants


def sse_payloads(text: str) -> list:
    """The events of an SSE body (``"[DONE]"`` kept as a string); raises on a malformed frame."""
    if not text.endswith("\n\n"):
        raise ValueError("the stream does not end with a blank line")
    out = []
    for block in text[:-2].split("\n\n"):
        if not block.startswith("data: "):
            raise ValueError(f"bad SSE frame {block[:80]!r}")
        payload = block[len("data: "):]
        out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def envelope_problem(err) -> str | None:
    if not isinstance(err, dict) or set(err) != {"message", "type", "param", "code"}:
        return f"not the OpenAI envelope: {str(err)[:200]}"
    if not isinstance(err["message"], str) or not err["message"] or not isinstance(err["type"], str):
        return f"envelope without message or type: {err}"
    return None


def guard_problem(body: dict, ext: dict | None) -> str | None:
    """A 200 that serves what the guard must refuse (only the clear cases; docs/guard.md has every rule)."""
    ext = ext or {}
    weights, variants = ext.get("weights") or {}, ext.get("variants") or {}
    policy_of = {name: (v or {}).get("policy", name) for name, v in variants.items()}
    for p, floor in PROTECTED.items():
        names = [n for n in weights if policy_of.get(n, n) == p]
        if names and sum(weights[n] for n in names) < floor - 1e-9:
            return f"guard (floor): {p!r} below its floor in {weights}"
    for name, v in variants.items():
        if (v or {}).get("policy") == S.PROTECTED_PROMPTED and v.get("source") == "system_prompt" \
                and weights.get(name, 0) > 0:
            return (f"guard (system prompt replaced): variant {name!r} of the prompted protected policy at "
                    f"{weights[name]}")
    mixture = body.get("mixture")
    ca = mixture.get("context_aware") if isinstance(mixture, dict) else None
    if isinstance(ca, dict) and ca.get("policy") == S.PROTECTED_PROMPTED and isinstance(ca.get("alpha"), (int, float)) \
            and ca["alpha"] < 0:
        return f"guard (negative context-aware): {ca}"
    scorers = []
    if isinstance(body.get("best_of"), int) and body["best_of"] > 1:
        scorers.append(body.get("rerank"))
    if isinstance(body.get("search"), dict):
        scorers.append(body["search"].get("scorer"))
    for scorer in scorers:
        implicit = scorer.get("implicit") if isinstance(scorer, dict) else None
        # the reference's log-probability gets -beta, the policy's +beta: a protected policy with a negative
        # net coefficient (as the reference of another policy; policy == reference nets 0) is an inversion
        if isinstance(implicit, dict) and implicit.get("reference") in PROTECTED \
                and implicit.get("policy") != implicit.get("reference"):
            return f"guard (implicit scorer, protected reference): {implicit}"
    return None


def check(body: dict, status: int, raw: bytes, stream: bool) -> tuple[str | None, str]:
    """(the broken invariant or None, a short description of the answer)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return "body is not UTF-8", repr(raw[:200])
    if status >= 500:
        try:
            msg = json.loads(text)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            msg = text[:200]
        return f"{status}", msg
    if status != 200:
        try:
            err = json.loads(text).get("error")
        except (ValueError, AttributeError):
            return "error body is not a JSON object", text[:200]
        if not isinstance(err, dict):
            return envelope_problem(err), f"{status}: {text[:160]}"
        code = f" {err['code']}" if err.get("code") else ""
        return envelope_problem(err), f"{status}{code}: {str(err.get('message'))[:160]}"
    if stream and text.startswith("data: "):
        try:
            events = sse_payloads(text)
        except ValueError as e:
            return f"malformed stream: {e}", text[-200:]
        if events[-1] != "[DONE]":
            return "stream without [DONE]", text[-200:]
        for ev in events[:-1]:
            if isinstance(ev, dict) and "error" in ev:
                err = ev["error"]
                problem = envelope_problem(err)
                if problem:
                    return f"stream error event: {problem}", ""
                if err.get("type") == "server_error" or err.get("code") in SERVER_ERROR_CODES:
                    return "5xx as an SSE error event", err["message"][:200]
                return None, f"200 stream error {err.get('code')}: {err['message'][:120]}"
        ext = next((ev["policymix"] for ev in events if isinstance(ev, dict) and ev.get("policymix")
                    and "weights" in ev["policymix"]), None)
        return guard_problem(body, ext), "200 stream"
    try:
        out = json.loads(text)
    except ValueError:
        return "200 body is not JSON", text[:200]
    ext = out.get("policymix") or {}
    if not all(isinstance(w, (int, float)) and math.isfinite(w) for w in (ext.get("weights") or {}).values()):
        return f"non-finite weights echoed: {ext.get('weights')}", ""
    return guard_problem(body, ext), "200"


class Crashes(logging.Handler):
    """The server's unhandled exceptions (it runs in this process): what a 5xx was, by type and place."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.seen: dict[str, str] = {}  # signature (types and places) -> with the messages

    def emit(self, record: logging.LogRecord) -> None:
        if record.exc_info and record.exc_info[1] is not None:
            self.seen.setdefault(*describe(record.exc_info[1]))

    def take(self) -> tuple[str, str]:
        out = (" | ".join(self.seen), " | ".join(self.seen.values()))
        self.seen = {}
        return out


def describe(exc: BaseException) -> tuple[str, str]:
    """(``Type at file:line`` of an exception and of those it happened while handling, the same with messages)."""
    sig, full = [], []
    while exc is not None and len(sig) < 4:
        frames = [f for f in traceback.extract_tb(exc.__traceback__) if "policymix" in f.filename]
        where = f" at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno}" if frames else ""
        sig.append(f"{type(exc).__name__}{where}")
        full.append(f"{sig[-1]}: {str(exc)[:100]!r}")
        exc = exc.__context__
    return " <- ".join(sig), " <- ".join(full)


@dataclasses.dataclass
class Failure:
    body: dict  # the smallest body that broke it
    problem: str  # the broken invariant, with details
    answer: str  # what the server answered to that body
    cause: str  # the server-side exception (type, place, message), when one was logged
    raw: bool = False  # sent as raw UTF-8 (S.encode(body, raw=True)), not ASCII-escaped
    count: int = 0


@dataclasses.dataclass
class Tally:
    examples: Counter = dataclasses.field(default_factory=Counter)  # per operation
    statuses: dict = dataclasses.field(default_factory=dict)  # operation -> Counter of "200", "400 code", ...
    failures: dict = dataclasses.field(default_factory=dict)  # (operation, invariant, signature) -> Failure
    unnamed: dict = dataclasses.field(default_factory=dict)  # a 400 without `param`: message -> smallest body

    def add(self, op: str, body: dict, status: int, problem: str | None, answer: str,
            cause: tuple[str, str] = ("", ""), raw: bool = False) -> None:
        self.examples[op] += 1
        key = f"{status}" if status >= 500 or status == 200 else answer.split(":")[0]
        self.statuses.setdefault(op, Counter())[key] += 1
        if problem:
            # one failure per invariant; a 5xx per server-side cause (type and place), else per message
            label = problem.split(":")[0]
            k = (op, label, (cause[0] or answer[:60]) if label[0] == "5" else "")
            f = self.failures.setdefault(k, Failure(body, problem, answer, cause[1], raw))
            f.count += 1
            if len(S.encode(body)) < len(S.encode(f.body)):
                f.body, f.problem, f.answer, f.cause, f.raw = body, problem, answer, cause[1], raw


# ------------------------------------------------------------------------------------------ canary


class Canary(threading.Thread):
    """Seeded streams, over and over beside the fuzzer; each run must give the tokens of the solo run."""

    def __init__(self, url: str, expected: list):
        super().__init__(daemon=True)
        self.url, self.expected = url, expected
        self.stop = threading.Event()
        self.runs, self.mismatches, self.errors = 0, [], []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=CALL_TIMEOUT_S) as client:
            while not self.stop.is_set():
                for (path, body), want in zip(CANARIES, self.expected):
                    try:
                        got = canary_tokens(client, path, body)
                    except Exception as e:  # noqa: BLE001 - reported by the test
                        self.errors.append(f"{type(e).__name__}: {e}")
                        continue
                    self.runs += 1
                    if got != want:
                        self.mismatches.append((path, want, got))


def canary_tokens(client: httpx.Client, path: str, body: dict) -> list[str]:
    r = client.post(path, json=body)
    assert r.status_code == 200, r.text
    tokens = []
    for ev in sse_payloads(r.text)[:-1]:
        assert "error" not in ev, ev
        for choice in ev["choices"]:
            lp = choice.get("logprobs") or {}
            tokens += lp.get("tokens") or [t["token"] for t in lp.get("content") or []]
    assert tokens, r.text
    return tokens


# -------------------------------------------------------------------------------------------- test


def write_report(tally: Tally, canary: Canary, seconds: float) -> None:
    from benchmarks.report import machine_info, markdown_table, write_report as write

    rows = [{"operation": op, "examples": tally.examples[op],
             "5xx": sum(n for k, n in tally.statuses.get(op, {}).items() if k.startswith("5")),
             "invariant failures": sum(1 for (o, _, _) in tally.failures if o == op),
             "statuses": ", ".join(f"{k}: {n}" for k, n in sorted(tally.statuses.get(op, {}).items()))}
            for op in ("completions", "chat")]
    failures = [{"operation": op, "invariant": f.problem, "examples": f.count, "answer": f.answer, "cause": f.cause,
                 "body": S.encode(f.body).decode(), "sent_as": "raw UTF-8" if f.raw else "ASCII-escaped JSON"}
                for (op, _, _), f in sorted(tally.failures.items())]
    meta = {**machine_info(), "command": f"make fuzz FUZZ_PER_OPERATION={EXAMPLES}  (OMP_NUM_THREADS=1 "
                                         f"FUZZ_CONTRACT_EXAMPLES={EXAMPLES} FUZZ_REPORT={REPORT} python -m pytest "
                                         "tests/test_fuzz_contract.py -q -s)",
            "examples per operation": f"{EXAMPLES} generated + {len(S.EXPLICIT['completions'])} / "
                                      f"{len(S.EXPLICIT['chat'])} explicit (issue 23's cases)",
            "derandomized": DERANDOMIZE,
            "seconds": round(seconds, 1), "canary runs": canary.runs,
            "canary mismatches": len(canary.mismatches), "canary errors": len(canary.errors)}
    if canary.errors:
        meta["canary errors (first 3)"] = "; ".join(e[:200] for e in canary.errors[:3])
    table = markdown_table(rows, [("operation", "operation"), ("examples", "examples"), ("5xx", "5xx"),
                                  ("invariant failures", "distinct invariant failures"), ("statuses", "answers")])
    notes = "## Distinct failures (smallest body each)\n\n" + ("\n".join(
        f"- {f['operation']}, {f['examples']} examples: **{f['invariant']}** ({f['answer']})"
        + (f"\n  server: `{f['cause']}`" if f["cause"] else "") + f"\n  body ({f['sent_as']}): `{f['body'][:600]}`"
        for f in failures) or "none")
    notes += ("\n\n## 400s that name no field (`param: null`; reported, not an invariant)\n\n"
              + ("\n".join(f"- {m}\n  `{S.encode(b).decode()[:300]}`" for m, b in sorted(tally.unnamed.items()))
                 or "none: every 400 named its field"))
    write(REPORT, "Contract-wide fuzzing (tests/test_fuzz_contract.py)", meta, table,
          {"rows": rows, "failures": failures, "canary_mismatches": canary.mismatches[:5],
           "unnamed_400": {m: S.encode(b).decode()[:300] for m, b in sorted(tally.unnamed.items())}}, notes)


def fuzz(client: httpx.Client, op: str, tally: Tally, crashes: Crashes) -> None:
    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
              phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
    @given(body=S.bodies(op), raw=st.sampled_from([False, False, False, True]))
    def run(body, raw):
        stream = body.get("stream") is True
        crashes.take()  # a late log line of the previous example is not this one's
        try:
            r = client.post(S.path_of(op), content=S.encode(body, raw), headers={"content-type": "application/json"})
        except httpx.TimeoutException:
            tally.add(op, body, 599, "5xx: timeout", f"no answer in {CALL_TIMEOUT_S} s", crashes.take(), raw)
            return
        except httpx.TransportError as e:  # the server dropped the connection: a crash the client sees as no answer
            time.sleep(0.05)  # uvicorn logs the crash after closing the connection
            tally.add(op, body, 599, "5xx: no HTTP answer", type(e).__name__, crashes.take(), raw)
            return
        problem, answer = check(body, r.status_code, r.content, stream)
        if not problem and r.status_code == 200 and not stream:
            problem = greedy_problem(client, op, body, r.json())
        if problem:
            time.sleep(0.05)
        tally.add(op, body, r.status_code, problem, answer, crashes.take(), raw)
        if r.status_code == 400 and not problem and r.json()["error"]["param"] is None:  # not an invariant: reported
            msg = r.json()["error"]["message"][:100]
            if msg not in tally.unnamed or len(S.encode(body)) < len(S.encode(tally.unnamed[msg])):
                tally.unnamed[msg] = body

    for body in S.EXPLICIT[op]:
        run = example(body=body, raw=False)(run)
    run()


def greedy_problem(client: httpx.Client, op: str, body: dict, out: dict) -> str | None:
    """A temperature below 1e-5 samples greedily (vLLM's rule): the same choices as temperature 0."""
    t = body.get("temperature")
    if not (isinstance(t, (int, float)) and 0 < t < 1e-5):
        return None
    r = client.post(S.path_of(op), content=S.encode({**body, "temperature": 0}),
                    headers={"content-type": "application/json"})
    if r.status_code != 200:
        return None  # not comparable (e.g. best_of > 1 is refused at temperature 0)
    key = "text" if op == "completions" else "message"
    got, want = [c[key] for c in out["choices"]], [c[key] for c in r.json()["choices"]]
    if got == want:
        return None
    return f"not greedy below 1e-5: temperature {t} gave {str(got)[:80]}, 0 gave {str(want)[:80]}"


def test_contract_fuzz_never_5xx_always_an_envelope_and_the_canary_keeps_its_tokens(server):
    srv, engine = server
    tally = Tally()
    # a new connection per request: a request that breaks its connection cannot fail the next one's
    with httpx.Client(base_url=srv.url, timeout=CALL_TIMEOUT_S, limits=httpx.Limits(max_keepalive_connections=0)) \
            as client:
        expected = [canary_tokens(client, path, body) for path, body in CANARIES]  # alone, before the fuzz
        assert [canary_tokens(client, path, body) for path, body in CANARIES] == expected  # and repeatable
        canary = Canary(srv.url, expected)
        canary.start()
        start = time.monotonic()
        try:
            crashes = Crashes()
            loggers = [logging.getLogger(name) for name in ("policymix.api", "uvicorn.error", "policymix.engine")]
            for logger in loggers:
                logger.addHandler(crashes)
            try:
                for op in ("completions", "chat"):
                    fuzz(client, op, tally, crashes)
            finally:
                for logger in loggers:
                    logger.removeHandler(crashes)
        finally:
            canary.stop.set()
            canary.join(timeout=CALL_TIMEOUT_S)
            seconds = time.monotonic() - start
        after = [canary_tokens(client, path, body) for path, body in CANARIES]  # alone again, after it
    print(f"\ncontract fuzz: {dict(tally.examples)} examples in {seconds:.0f} s; canary runs {canary.runs}")
    for op, counts in tally.statuses.items():
        print(f"  {op}: {dict(sorted(counts.items()))}")
    for (op, _, _), f in sorted(tally.failures.items()):
        print(f"  FAIL {op} x{f.count}: {f.problem} ({f.answer})\n    server: {f.cause}\n    body{' (raw)' * f.raw}: "
              f"{S.encode(f.body).decode()[:400]}")
    if REPORT:
        write_report(tally, canary, seconds)
    assert tally.examples["completions"] >= EXAMPLES and tally.examples["chat"] >= EXAMPLES
    assert sum(c.get("200", 0) for c in tally.statuses.values()) > 0  # the engine was reached, not only the validator
    assert not tally.failures, f"{len(tally.failures)} distinct invariant failures (printed above)"
    assert canary.runs >= 2 and not canary.errors, canary.errors[:3]
    assert not canary.mismatches, canary.mismatches[:2]
    assert after == expected
    assert engine.is_healthy()

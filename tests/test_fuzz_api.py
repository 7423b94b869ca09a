"""Property-based fuzzing of the live API (native engine, tiny models): no 500s, no hangs, every 4xx in
the OpenAI envelope.

- schemathesis generates valid and invalid requests for every operation of the server's own OpenAPI
  document and checks the answers against it (status codes, content types, response bodies);
- hypothesis sends arbitrary JSON as the ``mixture`` of a request (no recipe may crash the server).

Bounded for CI: ``FUZZ_EXAMPLES`` examples per operation and generation mode (default 40: about 375
schemathesis requests and 160 recipes, ~40 s on 2 cores), a short context so that no example
generates for long, and a timeout on every call. ``FUZZ_EXPLORE=1`` draws new examples each run.
"""

from __future__ import annotations

import json
import math
import os

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    negative_data_rejection,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from api_helpers import LiveServer
from policymix.api import build_app
from policymix.engine.native import NativeEngine
from policymix.registry import Registry

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))
DERANDOMIZE = not os.environ.get("FUZZ_EXPLORE")  # CI replays the same examples; set FUZZ_EXPLORE=1 to search
CALL_TIMEOUT_S = 30  # a hang is a failure, not a stuck CI job
POLICIES = ["base", "dpo", "safe", "small", "formal", "other", "rm", "ghost"]
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance,
          negative_data_rejection]


@pytest.fixture(scope="module")
def server(tiny_registry):
    cfg = tiny_registry.config.model_copy(deep=True)
    cfg.server.max_model_len = 40  # bounds every generation: the fuzzer may ask for max_tokens=10**9
    cfg.server.max_best_of = 4
    engine = NativeEngine(Registry(cfg, tiny_registry.policies))
    with LiveServer(build_app(engine, cfg, env={}, shutdown_s=5.0)) as srv:
        yield srv, engine


def assert_envelope(status: int, body: bytes) -> None:
    """A 4xx/5xx body is exactly the OpenAI error envelope."""
    err = json.loads(body)["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and isinstance(err["type"], str)


def _operations(schema):
    return [result.ok() for result in schema.get_all_operations()]


def _cases(op, mode):
    """The operation's cases; valid ones name a served model half of the time (random names only reach 404)."""
    cases = op.as_strategy(generation_mode=mode)
    if mode != GenerationMode.POSITIVE:
        return cases  # an invalid case's invalid part may be the model: leave it alone

    def named(pair):
        case, model = pair
        if model is not None and isinstance(case.body, dict) and "model" in case.body:
            case.body["model"] = model
        if model is not None and "model" in (case.path_parameters or {}):
            case.path_parameters["model"] = model
        return case

    return st.tuples(cases, st.sampled_from([None, "base", "balanced", "dpo-soft", "other"])).map(named)


def test_schemathesis_against_the_live_openapi_document(server):
    srv, engine = server
    schema = schemathesis.openapi.from_url(f"{srv.url}/openapi.json")
    # no keys are configured, so the optional bearer token is no input to fuzz (tests/test_api_auth.py has 401s)
    schema.config.generation.update(with_security_parameters=False)
    operations = _operations(schema)
    assert {op.label for op in operations} >= {"POST /v1/completions", "POST /v1/chat/completions",
                                              "GET /v1/models", "POST /tokenize", "GET /health"}
    seen: dict[int, int] = {}
    for op in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=DERANDOMIZE,
                      phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
            @given(case=_cases(op, mode))
            def run(case):
                response = case.call_and_validate(base_url=srv.url, checks=CHECKS, timeout=CALL_TIMEOUT_S)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                if response.status_code >= 400:
                    assert_envelope(response.status_code, response.content)

            try:
                run()
            except Unsatisfiable:  # nothing to make invalid (GET /health has no input)
                assert mode == GenerationMode.NEGATIVE and op.method.upper() == "GET", op.label
    print(f"schemathesis: status counts {dict(sorted(seen.items()))}")
    assert sum(seen.values()) >= EXAMPLES * 4 and 400 in seen and 200 in seen
    assert not any(code >= 500 for code in seen)
    assert engine.is_healthy()


# ------------------------------------------------------------------------ recipes through the API

_numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False, min_value=-20, max_value=20),
                     st.integers(-5, 5), st.sampled_from([0.0, -0.0, 1e-300, 1e300, 2**63]))
_json_leaf = st.one_of(st.none(), st.booleans(), _numbers, st.text(max_size=8), st.sampled_from(POLICIES))
_json = st.recursive(_json_leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                          st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                     max_leaves=8)
_weights = st.dictionaries(st.sampled_from(POLICIES), st.one_of(_numbers, _json_leaf), min_size=0, max_size=4)
_recipe = st.one_of(
    st.fixed_dictionaries({"weights": _weights}),
    st.fixed_dictionaries({"reference": st.sampled_from(POLICIES), "objectives": _weights},
                          optional={"beta": _numbers, "beta_prime": _numbers}),
    st.fixed_dictionaries({"policy": st.sampled_from(POLICIES), "beta_prime": _numbers},
                          optional={"reference": st.sampled_from(POLICIES), "beta": _numbers}),
    st.fixed_dictionaries({"proxy": st.fixed_dictionaries(
        {"base": st.sampled_from(POLICIES), "tuned": st.sampled_from(POLICIES),
         "untuned": st.sampled_from(POLICIES)}, optional={"alpha": _numbers})}),
    st.dictionaries(st.sampled_from(["weights", "reference", "objectives", "policy", "beta", "beta_prime", "proxy",
                                     "other"]), _json, max_size=4),
    st.sampled_from(["dpo-soft", "balanced", "ghost", ""]),
    _json,
)




def test_any_json_recipe_gets_an_answer_never_a_500(server):
    srv, engine = server
    statuses: dict[int, int] = {}

    with httpx.Client(base_url=srv.url, timeout=CALL_TIMEOUT_S) as client:
        @settings(max_examples=max(40, 4 * EXAMPLES), deadline=None, database=None, derandomize=DERANDOMIZE,
                  suppress_health_check=list(HealthCheck))
        @given(mixture=_recipe, model=st.sampled_from(POLICIES[:4] + ["balanced"]), chat=st.booleans(),
               stream=st.booleans())
        def run(mixture, model, chat, stream):
            body = {"model": model, "max_tokens": 2, "mixture": mixture, "stream": stream}
            if chat:
                body["messages"] = [{"role": "user", "content": "Hi"}]
            else:
                body["prompt"] = "Hi"
            path = "/v1/chat/completions" if chat else "/v1/completions"
            r = client.post(path, json=body)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code in (200, 400, 403, 404), (r.status_code, r.text)
            if r.status_code != 200:
                assert_envelope(r.status_code, r.content)
                if r.status_code == 400 and isinstance(mixture, dict):
                    assert r.json()["error"]["param"], r.text  # names the field
            elif stream:
                assert r.text.endswith("data: [DONE]\n\n") and '"error"' not in r.text
            else:
                weights = r.json()["policymix"]["weights"]
                assert all(math.isfinite(w) for w in weights.values())

        run()
    print(f"recipes: status counts {dict(sorted(statuses.items()))}")
    assert statuses.get(200, 0) > 0 and statuses.get(400, 0) > 0  # both paths were exercised
    assert engine.is_healthy()
    assert all(not r.slots for r in engine.core.runners.values())


def test_a_body_that_is_not_a_json_object_is_a_clear_400(server):
    srv, _ = server
    body = json.dumps({"model": "base", "prompt": "Hi"})
    for kwargs in ({"content": body, "headers": {"content-type": "application/x-www-form-urlencoded"}},  # curl -d
                   {"json": [1, 2]}, {"json": "text"}):
        r = httpx.post(f"{srv.url}/v1/completions", timeout=CALL_TIMEOUT_S, **kwargs)
        assert r.status_code == 400, r.text
        assert_envelope(r.status_code, r.content)
        assert "must be a JSON object" in r.json()["error"]["message"]
    r = httpx.post(f"{srv.url}/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]

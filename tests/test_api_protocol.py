"""Request validation and the OpenAI error envelope (scripted engine, in-process app)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api_helpers import fake_config
from fake_engine import MAX_LEN, FakeEngine
from policymix.api import build_app
from policymix.errors import Overloaded

CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture()
def engine():
    return FakeEngine()


@pytest.fixture()
def client(engine):
    with TestClient(build_app(engine, fake_config(), env={}), raise_server_exceptions=False) as c:
        yield c


def envelope(resp, status: int) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    return body["error"]


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi"}, "model"),
    ({"model": "base"}, "prompt"),
    ({"model": "base", "prompt": 5}, "prompt"),
    ({"model": "base", "prompt": []}, "prompt"),
    ({"model": "base", "prompt": [1, -2]}, "prompt"),
    ({"model": "base", "prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ({"model": "base", "prompt": "hi", "temperature": -1}, "temperature"),
    ({"model": "base", "prompt": "hi", "top_p": 0}, "top_p"),
    ({"model": "base", "prompt": "hi", "n": 0}, "n"),
    ({"model": "base", "prompt": "hi", "logprobs": 21}, "logprobs"),
    ({"model": "base", "prompt": "hi", "presence_penalty": 3}, "presence_penalty"),
    ({"model": "base", "prompt": "hi", "logit_bias": {"5": 500}}, "logit_bias.5"),
    ({"model": "base", "prompt": "hi", "stream": "maybe"}, "stream"),
    ({"model": "base", "prompt": "hi", "rerank": {"implicit": {"policy": "dpo", "reference": "base", "beta": 0}}},
     "rerank.implicit.beta"),
])
def test_bad_completion_fields_are_400_naming_the_field(client, body, param):
    err = envelope(client.post("/v1/completions", json=body), 400)
    assert err["param"] == param
    assert err["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, param", [
    ({"model": "base", "messages": []}, "messages"),
    ({"model": "base", "messages": [{"role": "robot", "content": "x"}]}, "messages.0.role"),
    ({"model": "base", "messages": [{"role": "tool", "content": "x"}]}, "messages.0.tool_call_id"),
    ({"model": "base", "messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages.0.tool_calls"),
    ({"model": "base", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{oops"}}]}]},
     "messages.0.tool_calls.0.function.arguments"),
    ({"model": "base", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "x"}]}]},
     "messages.0.content.0.type"),
    ({"model": "base", "messages": CHAT, "top_logprobs": 2}, "top_logprobs"),
    ({"model": "base", "messages": CHAT, "max_completion_tokens": 0}, "max_completion_tokens"),
])
def test_bad_chat_fields_are_400(client, body, param):
    assert envelope(client.post("/v1/chat/completions", json=body), 400)["param"] == param


def test_invalid_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert "not valid JSON" in envelope(r, 400)["message"]


def test_unknown_fields_are_ignored(client):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 2,
                                             "some_future_field": {"x": 1}, "suffix": None})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == "He"


def test_unknown_model_is_404_model_not_found(client):
    for path, body in (("/v1/completions", {"prompt": "hi"}), ("/v1/chat/completions", {"messages": CHAT})):
        err = envelope(client.post(path, json={"model": "nope", **body}), 404)
        assert err["code"] == "model_not_found" and err["param"] == "model"
    assert envelope(client.get("/v1/models/nope"), 404)["code"] == "model_not_found"


def test_unknown_route_and_method_use_the_envelope(client):
    envelope(client.get("/v2/nothing"), 404)
    envelope(client.get("/v1/completions"), 405)


@pytest.mark.parametrize("mixture, param", [
    ({"weights": {"base": float("nan")}}, "mixture.weights.base"),
    ({"weights": {"ghost": 1.0}}, "mixture"),
    ({"weights": {"base": 0.0}}, "mixture"),
    ({"reference": "base", "policy": "dpo", "beta_prime": -1}, "mixture.beta_prime"),
    ({"weights": {"base": 1}, "proxy": {"base": "base", "tuned": "dpo", "untuned": "base"}}, "mixture"),
    ({"weights": {"rm": 1.0}}, "mixture"),
    ({"weights": {"base": 1.0, "nochat": 1.0}}, "mixture"),
    ("no-such-mixture", "mixture"),
    (7, "mixture"),
])
def test_bad_recipes_are_400(client, mixture, param):
    import json

    # NaN is not JSON: send the literal the way a careless client would
    raw = json.dumps({"model": "base", "prompt": "hi", "mixture": mixture})
    r = client.post("/v1/completions", content=raw.encode(), headers={"content-type": "application/json"})
    err = envelope(r, 400)
    assert err["param"] == param, err


def test_context_too_long_is_400_with_the_numbers(client):
    err = envelope(client.post("/v1/completions", json={"model": "base", "prompt": "x" * 60, "max_tokens": 10}), 400)
    assert err["code"] == "context_length_exceeded"
    assert str(MAX_LEN) in err["message"] and "61 in the prompt" in err["message"]


def test_chat_without_template_is_a_clear_400(client):
    err = envelope(client.post("/v1/chat/completions", json={"model": "nochat", "messages": CHAT}), 400)
    assert "chat template" in err["message"] and err["param"] == "messages"


@pytest.mark.parametrize("extra, param", [
    ({"logit_bias": {"x": 1}}, "logit_bias"),
    ({"logit_bias": {"100000": 1}}, "logit_bias"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ({"echo": True, "max_tokens": 0, "n": 2}, "max_tokens"),  # (echo with logprobs is served: prompt logprobs)
])
def test_inconsistent_sampling_is_400(client, extra, param):
    assert envelope(client.post("/v1/completions", json={"model": "base", "prompt": "hi", **extra}), 400)["param"] == param


def test_queue_full_is_503_with_retry_after(client, engine):
    engine.overloaded = Overloaded("the server is full", status=503, retry_after=2.5)
    for stream in (False, True):
        r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", "stream": stream})
        assert envelope(r, 503)["type"] == "server_overloaded"
        assert r.headers["retry-after"] == "3"
    engine.overloaded = Overloaded("too many for your key", status=429)
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT})
    assert envelope(r, 429)["code"] == "rate_limit_exceeded" and r.headers["retry-after"] == "1"


def test_engine_failure_before_streaming_is_a_status_not_a_stream(client):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "FAIL", "stream": True})
    # the fake fails after two tokens, so headers are out: the error arrives as an SSE event
    assert r.status_code == 200
    assert '"error"' in r.text and r.text.endswith("data: [DONE]\n\n")
    r = client.post("/v1/completions", json={"model": "base", "prompt": "FAIL"})
    assert envelope(r, 500)["type"] == "server_error"


def test_health_reflects_the_engine(client, engine):
    assert client.get("/health").status_code == 200
    engine.healthy = False
    envelope(client.get("/health"), 503)


def test_openapi_document_lists_the_endpoints(client):
    paths = client.get("/openapi.json").json()["paths"]
    for p in ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics", "/tokenize",
              "/detokenize"):
        assert p in paths


def test_deeply_nested_tool_call_arguments_are_400(client):
    deep = "[" * 100_000 + "]" * 100_000  # past json's recursion limit
    body = {"model": "base", "messages": [{"role": "assistant", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "f", "arguments": deep}}]}, {"role": "user", "content": "x"}]}
    assert envelope(client.post("/v1/chat/completions", json=body), 400)["param"] == \
        "messages.0.tool_calls.0.function.arguments"

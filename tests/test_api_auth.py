"""API keys: hashed config keys and the env key, 401 / 403 / 429, open health and metrics."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi.testclient import TestClient

from api_helpers import fake_config, live_fake
from fake_engine import FakeEngine
from policymix.api import build_app
from policymix.api.auth import KeyRing, hash_key

CHAT = [{"role": "user", "content": "hi"}]
KEYS = [
    {"key_sha256": hash_key("admin-key"), "name": "admin", "allow_inversion": True},
    {"key_sha256": hash_key("narrow-key"), "name": "narrow", "policies": ["base", "half"],
     "allow_inline_recipes": False, "max_tokens": 8, "max_best_of": 2},
    {"key_sha256": hash_key("one-at-a-time"), "name": "single", "max_concurrent": 1},
]


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture()
def client():
    with TestClient(build_app(FakeEngine(), fake_config(api_keys=KEYS), env={})) as c:
        yield c


def completion(client, key, **body):
    return client.post("/v1/completions", headers=auth(key) if key else {},
                       json={"model": "base", "prompt": "hi", "max_tokens": 2, **body})


def test_no_keys_means_open():
    with TestClient(build_app(FakeEngine(), fake_config(), env={})) as c:
        assert c.post("/v1/completions", json={"model": "base", "prompt": "hi", "max_tokens": 1}).status_code == 200


@pytest.mark.parametrize("headers", [{}, auth("wrong"), {"Authorization": "Basic YWRtaW4ta2V5"}])
def test_missing_or_wrong_key_is_401(client, headers):
    for method, path in (("post", "/v1/completions"), ("post", "/v1/chat/completions"), ("get", "/v1/models"),
                         ("post", "/tokenize")):
        r = client.request(method, path, headers=headers, json={"model": "base", "prompt": "x", "messages": CHAT})
        assert r.status_code == 401, (path, r.text)
        err = r.json()["error"]
        assert err["code"] == "invalid_api_key" and err["type"] == "invalid_request_error"


def test_valid_keys_pass(client):
    assert completion(client, "admin-key").status_code == 200
    assert client.post("/v1/completions", headers={"x-api-key": "admin-key"},
                       json={"model": "base", "prompt": "hi", "max_tokens": 1}).status_code == 200


def test_health_and_metrics_stay_open_unless_configured(client):
    assert client.get("/health").status_code == 200 and client.get("/metrics").status_code == 200
    with TestClient(build_app(FakeEngine(), fake_config(api_keys=KEYS, open_health=False, open_metrics=False),
                              env={})) as closed:
        assert closed.get("/health").status_code == 401 and closed.get("/metrics").status_code == 401
        assert closed.get("/health", headers=auth("narrow-key")).status_code == 200


def test_env_key(monkeypatch):
    app = build_app(FakeEngine(), fake_config(), env={"POLICYMIX_API_KEY": "from-env"})
    with TestClient(app) as c:
        assert completion(c, None).status_code == 401
        assert completion(c, "from-env").status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"model": "dpo"}, "model"),
    ({"mixture": {"weights": {"base": 1.0}}}, "mixture"),  # inline recipes not allowed for this key
    ({"max_tokens": 9}, "max_tokens"),
    ({"best_of": 3}, "best_of"),
])
def test_scopes_and_limits_are_403(client, body, param):
    r = completion(client, "narrow-key", **body)
    assert r.status_code == 403, r.text
    err = r.json()["error"]
    assert err["type"] == "permission_error" and err["param"] == param


def test_named_mixture_grants_its_policies(client):
    # `half` mixes base and dpo; the key may use `half` but not `dpo` alone
    assert completion(client, "narrow-key", model="half").status_code == 200
    assert completion(client, "narrow-key", mixture="half").status_code == 200
    assert completion(client, "narrow-key", model="dpo").status_code == 403


def test_rerank_policies_are_in_scope():
    keys = [{"key_sha256": hash_key("k"), "policies": ["base", "dpo"]}]
    with TestClient(build_app(FakeEngine(), fake_config(api_keys=keys), env={})) as c:
        r = completion(c, "k", mixture={"weights": {"base": 0.5, "dpo": 0.5}}, best_of=2, rerank={"reward_model": "rm"})
        assert r.status_code == 403 and r.json()["error"]["param"] == "rerank"
        r = completion(c, "k", mixture={"weights": {"base": 0.5, "dpo": 0.5}}, best_of=2,
                       rerank={"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}})
        assert r.status_code == 200, r.text


def test_chat_default_max_tokens_respects_the_key_limit(client):
    engine = client.app.state.serving.engine
    r = client.post("/v1/chat/completions", headers=auth("narrow-key"), json={"model": "base", "messages": CHAT})
    assert r.status_code == 200
    assert engine.plans[-1].sampling.max_tokens == 8  # the plan resolves an unset max_tokens


def test_models_list_is_filtered_by_scope(client):
    ids = {m["id"] for m in client.get("/v1/models", headers=auth("narrow-key")).json()["data"]}
    assert ids == {"base", "half"}
    assert client.get("/v1/models/dpo", headers=auth("narrow-key")).status_code == 404
    assert len(client.get("/v1/models", headers=auth("admin-key")).json()["data"]) == 5


def test_lookup_compares_against_every_key(monkeypatch):
    import hmac

    from policymix.config import ApiKeySpec

    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    ring = KeyRing([ApiKeySpec(key_sha256=hash_key(k)) for k in ("a", "b", "c")])
    assert ring.lookup("a") is ring.keys[0]  # a match on the first key still checks the others
    assert len(calls) == 3
    assert ring.lookup("zzz") is None


def test_per_key_concurrency_limit_is_429():
    async def run(url):
        async with httpx.AsyncClient(base_url=url, timeout=30) as c:
            body = {"model": "base", "prompt": "hi", "max_tokens": 12}
            first = asyncio.create_task(c.post("/v1/completions", json=body, headers=auth("one-at-a-time")))
            await asyncio.sleep(0.15)  # the first is generating (0.05 s per token)
            second = await c.post("/v1/completions", json=body, headers=auth("one-at-a-time"))
            other = await c.post("/v1/completions", json=body, headers=auth("admin-key"))
            done = await first
            again = await c.post("/v1/completions", json={**body, "max_tokens": 1}, headers=auth("one-at-a-time"))
            return first, second, other, done, again

    with live_fake(FakeEngine(delay=0.05), api_keys=KEYS) as srv:
        _, second, other, done, again = asyncio.run(run(srv.url))
    assert second.status_code == 429 and second.headers["retry-after"] == "1"
    assert second.json()["error"]["code"] == "rate_limit_exceeded"
    assert other.status_code == 200 and done.status_code == 200
    assert again.status_code == 200  # the slot was given back

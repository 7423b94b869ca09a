"""The real thing: NativeEngine on tiny models behind uvicorn, driven by the openai SDK, httpx and curl."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time

import httpx
import openai
import pytest

from api_helpers import LiveServer, sse_events
from policymix.api import build_app
from policymix.api.auth import hash_key
from policymix.config import ApiKeySpec

CHAT = [{"role": "user", "content": "Hello world"}]
JAILBREAK = {"weights": {"dpo": 1.0, "base": 1.0, "safe": -1.0}}  # pi_strong * pi_ref / pi_safe


@pytest.fixture(scope="module")
def engine(tiny_registry):
    from policymix.engine.native import NativeEngine

    return NativeEngine(tiny_registry)


@pytest.fixture(scope="module")
def server(engine, tiny_config):
    cfg = tiny_config.model_copy(deep=True)
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key("user-key"), name="user"),
                           ApiKeySpec(key_sha256=hash_key("lab-key"), name="lab", allow_inversion=True)]
    with LiveServer(build_app(engine, cfg, env={})) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="user-key", max_retries=0, timeout=60)


def test_completion_and_chat(sdk, server):
    c = sdk.completions.create(model="base", prompt="Hello world", max_tokens=6, temperature=0)
    assert c.object == "text_completion" and len(c.choices) == 1
    assert c.choices[0].finish_reason in ("length", "stop") and c.usage.completion_tokens == 6
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": "base", "prompt": "Hello world"},
                        headers={"Authorization": "Bearer user-key"}).json()["tokens"]
    assert c.usage.prompt_tokens == len(tokens)
    assert c.model_extra["policymix"]["weights"] == {"base": 1.0}
    both = sdk.completions.create(model="base", prompt=[tokens, [0, 5, 6]], max_tokens=3, n=2, seed=1)
    assert sorted(ch.index for ch in both.choices) == [0, 1, 2, 3] and both.usage.completion_tokens == 12
    assert both.usage.prompt_tokens == len(tokens) + 3
    chat = sdk.chat.completions.create(model="dpo-soft", messages=CHAT, max_tokens=5, temperature=0)
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)
    assert chat.model == "dpo-soft"
    assert chat.model_extra["policymix"]["weights"] == pytest.approx({"dpo": 0.5, "base": 0.5})


def test_streaming_equals_non_streaming_when_greedy(sdk):
    kw = dict(model="balanced", messages=CHAT, max_tokens=12, temperature=0)
    whole = sdk.chat.completions.create(**kw).choices[0].message.content
    chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices]
    assert finishes[-1] in ("length", "stop") and all(f is None for f in finishes[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12


def test_async_client_and_concurrency(server):
    async def run():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="user-key", max_retries=0)
        seeds = [1, 2, 1]
        outs = await asyncio.gather(*(client.completions.create(model="base", prompt="The quick", max_tokens=8,
                                                                temperature=1.0, seed=s) for s in seeds))
        await client.close()
        return [o.choices[0].text for o in outs]

    a, b, a2 = asyncio.run(run())
    assert a == a2  # a seeded request gives the same text beside others


def test_n_and_logprobs(sdk):
    c = sdk.completions.create(model="base", prompt="Hello", max_tokens=5, n=3, temperature=1.0, seed=7,
                               logprobs=2)
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2]
    for ch in c.choices:
        lp = ch.logprobs
        assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
        assert all(x <= 0 for x in lp.token_logprobs)
        for tok, top in zip(lp.tokens, lp.top_logprobs):
            assert tok in top and 2 <= len(top) <= 3
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    chat = sdk.chat.completions.create(model="base", messages=CHAT, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    joined = b"".join(bytes(t.bytes) for t in content).decode("utf-8", errors="replace")
    assert joined.startswith(chat.choices[0].message.content)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)


def test_stream_n_interleaved(sdk):
    chunks = list(sdk.chat.completions.create(model="base", messages=CHAT, max_tokens=6, n=2, temperature=1.0,
                                              seed=3, stream=True))
    seen = [ch.choices[0].index for ch in chunks if ch.choices]
    assert set(seen) == {0, 1} and seen.index(1) < len(seen) - 2  # index 1 appears before the end
    assert sum(1 for ch in chunks if ch.choices and ch.choices[0].finish_reason) == 2


def test_sdk_errors(sdk):
    with pytest.raises(openai.NotFoundError) as e:
        sdk.completions.create(model="ghost", prompt="x")
    assert e.value.status_code == 404 and e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="base", prompt="x", extra_body={"mixture": {"weights": {"base": 1, "other": 1}}})
    assert "tokenizer" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="base", prompt="x " * 600, max_tokens=600)
    assert e.value.code == "context_length_exceeded" and "1024" in e.value.message
    with pytest.raises(openai.BadRequestError):
        sdk.chat.completions.create(model="base", messages=CHAT, temperature=-1)
    for extra in ({"best_of": 2, "temperature": 0}, {"best_of": 2, "n": 3}, {"best_of": 17}, {"n": 17}):
        with pytest.raises(openai.BadRequestError) as e:
            sdk.completions.create(model="base", prompt="x", max_tokens=2, **extra)
        assert e.value.param == "best_of", extra
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sdk.base_url, api_key="nope", max_retries=0).models.list()


def test_mixing_guard(server):
    user = openai.OpenAI(base_url=f"{server.url}/v1", api_key="user-key", max_retries=0)
    lab = openai.OpenAI(base_url=f"{server.url}/v1", api_key="lab-key", max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as e:
        user.completions.create(model="dpo", prompt="x", max_tokens=2, extra_body={"mixture": JAILBREAK})
    assert e.value.code == "mixing_guard" and "protected" in e.value.message
    ok = lab.completions.create(model="dpo", prompt="x", max_tokens=2, extra_body={"mixture": JAILBREAK})
    assert ok.model_extra["policymix"]["weights"]["safe"] == -1.0
    # proxy tuning that keeps the protected policy positive is served to everyone
    proxy = {"proxy": {"base": "dpo", "tuned": "safe", "untuned": "base", "alpha": 1.0}}
    user.completions.create(model="dpo", prompt="x", max_tokens=2, extra_body={"mixture": proxy})


def test_extension_fields(sdk):
    c = sdk.completions.create(model="dpo", prompt="Hello", max_tokens=4, temperature=0,
                               extra_body={"mixture": {"reference": "base", "policy": "dpo", "beta_prime": 0.05},
                                           "return_token_signals": True})
    ext = c.model_extra["policymix"]
    assert ext["weights"] == pytest.approx({"dpo": 2.0, "base": -1.0})
    sig = ext["token_signals"]
    assert len(sig) == 4 and set(sig[0]["policy_logprobs"]) == {"dpo", "base"}
    assert ext["kl_to_reference"] == pytest.approx(sum(s["kl"] for s in sig), rel=1e-5)
    assert ext["implicit_reward"] == pytest.approx(sum(s["implicit_reward"] for s in sig), rel=1e-5)
    best = sdk.completions.create(model="dpo", prompt="Hello", max_tokens=4, temperature=1.0, seed=1, best_of=3,
                                  extra_body={"rerank": {"implicit": {"policy": "dpo", "reference": "base",
                                                                      "beta": 0.1}}})
    ext = best.model_extra["policymix"]
    assert len(ext["candidates"]) == 3
    assert best.choices[0].text == max(ext["candidates"], key=lambda c: c["score"])["text"]


def test_raw_sse_framing(server):
    body = {"model": "base", "prompt": "Hello", "max_tokens": 4, "stream": True, "temperature": 0,
            "stream_options": {"include_usage": True}}
    with httpx.Client(timeout=60, headers={"Authorization": "Bearer user-key"}) as c:
        r = c.post(f"{server.url}/v1/completions", json=body)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and events[-2]["choices"] == [] and events[-2]["usage"]["completion_tokens"] == 4
    assert "".join(e["choices"][0]["text"] for e in events[:-2]) == \
        httpx.post(f"{server.url}/v1/completions", json={**body, "stream": False},
                   headers={"Authorization": "Bearer user-key"}, timeout=60).json()["choices"][0]["text"]


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl(server):
    body = json.dumps({"model": "formal", "messages": CHAT, "max_tokens": 3, "stream": True})
    out = subprocess.run(["curl", "-sS", "-N", "--fail-with-body", f"{server.url}/v1/chat/completions",
                          "-H", "Content-Type: application/json", "-H", "Authorization: Bearer user-key", "-d", body],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    events = sse_events(out.stdout)
    assert events[0]["choices"][0]["delta"]["role"] == "assistant" and events[-1] == "[DONE]"
    out = subprocess.run(["curl", "-sS", f"{server.url}/v1/models", "-H", "Authorization: Bearer nope"],
                         capture_output=True, text=True, timeout=60)
    assert json.loads(out.stdout)["error"]["code"] == "invalid_api_key"


def test_models_health_metrics(server, sdk):
    ids = {m.id for m in sdk.models.list()}
    assert {"base", "dpo", "safe", "small", "formal", "other", "rm", "dpo-soft", "balanced"} <= ids
    card = sdk.models.retrieve("other")
    assert card.model_extra["policymix"]["family"] != sdk.models.retrieve("base").model_extra["policymix"]["family"]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'policymix_generation_tokens_total{model="base"}' in metrics
    assert 'policymix_policy_forwards_total{policy="base"}' in metrics


def test_disconnect_frees_the_engine(server, engine):
    body = {"model": "balanced", "prompt": "Hello", "max_tokens": 900, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=60, headers={"Authorization": "Bearer user-key"}) as c:
        with c.stream("POST", f"{server.url}/v1/completions", json=body) as r:
            lines = r.iter_lines()
            next(lines)
            next(lines)
    end = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < end:
        time.sleep(0.05)
    stats = engine.stats()
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert all(v == 0 for v in engine.core.reserved.values())


def test_logprob_tokens_come_from_the_recipes_tokenizer(sdk):
    # `model` names base, but the inline mixture runs `other`, which has its own tokenizer
    chat = sdk.chat.completions.create(model="base", messages=CHAT, max_tokens=8, temperature=0, logprobs=True,
                                       extra_body={"mixture": {"weights": {"other": 1.0}}})
    content = chat.choices[0].logprobs.content
    joined = b"".join(bytes(t.bytes) for t in content).decode("utf-8", errors="replace")
    assert chat.choices[0].message.content and joined.startswith(chat.choices[0].message.content)


def test_empty_reward_model_name_is_a_400_naming_the_field(server):
    import httpx

    r = httpx.post(f"{server.url}/v1/completions", headers={"Authorization": "Bearer user-key"}, json={"model": "base", "prompt": "x", "max_tokens": 2, "best_of": 2,
                                                      "temperature": 1.0, "rerank": {"reward_model": ""}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "rerank.reward_model"

"""Bad input harms only its sender and never answers 500; the guard covers every way a request selects text.

A live uvicorn server over the native engine on the tiny family, with a prompted protected policy
(``guarded``: base's weights under a safety system prompt), API keys of several scopes and a server
default draft policy.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

import httpx
import openai
import pytest

from api_helpers import LiveServer
from policymix.api import build_app
from policymix.api.auth import hash_key
from policymix.config import PolicySpec, parse_config
from policymix.engine.native import NativeEngine
from policymix.registry import Registry

KEYS = {  # name -> (key, spec fields)
    "open": {},
    "lab": {"allow_inversion": True},
    "styled-only": {"policies": ["styled"]},
    "dpo-only": {"policies": ["dpo"]},
    "base-only": {"policies": ["base"]},
    "two": {"max_concurrent": 2},
}


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    raw = tiny_config.model_dump()
    raw["policies"]["guarded"] = {"path": raw["policies"]["base"]["path"], "system_prompt": "Refuse harm.", "reference": "base",
                                  "protected": True}
    raw["mixtures"]["styled"] = {"weights": {"base": 1.0, "brief": 0.5},
                                 "prompt_variants": {"brief": {"policy": "base", "system_prompt": "Be brief."}}}
    raw["server"]["speculative"] = {"draft": "small", "num_tokens": 2}
    raw["server"]["api_keys"] = [{"key_sha256": hash_key(f"{n}-key"), "name": n, **spec} for n, spec in KEYS.items()]
    cfg = parse_config(raw)
    base = tiny_registry.policies["base"]
    policies = {**tiny_registry.policies,
                "guarded": replace(base, name="guarded", spec=PolicySpec(**raw["policies"]["guarded"]))}
    engine = NativeEngine(Registry(cfg, policies))
    with LiveServer(build_app(engine, cfg, env={})) as srv:
        yield srv


def post(server, body, key="open", path="/v1/completions"):
    return httpx.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {key}-key"}, timeout=60)


def error(r) -> dict:
    assert set(r.json()) == {"error"} and set(r.json()["error"]) == {"message", "type", "param", "code"}
    return r.json()["error"]


# ----- one validation boundary -----------------------------------------------------------------------------


@pytest.mark.parametrize("ids", [[999_999_999], [2**62]])
def test_a_stop_id_past_the_vocabulary_is_a_400_and_its_neighbour_finishes(server, ids):
    async def run():
        async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                     headers={"Authorization": "Bearer open-key"}) as c:
            good = asyncio.ensure_future(c.post("/v1/completions", json={
                "model": "base", "prompt": "Hello", "max_tokens": 12, "temperature": 0.8, "seed": 3,
                "ignore_eos": True}))
            await asyncio.sleep(0.05)
            bad = await c.post("/v1/completions", json={"model": "base", "prompt": "Hi", "max_tokens": 4,
                                                        "stop_token_ids": ids, "min_tokens": 2})
            return bad, await good

    bad, good = asyncio.run(run())
    assert bad.status_code == 400 and error(bad)["param"] == "stop_token_ids"
    assert "outside the vocabulary" in error(bad)["message"]
    assert good.status_code == 200 and good.json()["usage"]["completion_tokens"] == 12


def test_a_logit_bias_id_past_the_vocabulary_is_a_400(server):
    r = post(server, {"model": "base", "prompt": "Hi", "max_tokens": 2, "logit_bias": {"99999999": 5}})
    assert r.status_code == 400 and error(r)["param"] == "logit_bias"


@pytest.mark.parametrize("body, path, param", [
    ({"model": "\ud800", "prompt": "Hi"}, "/v1/completions", "model"),
    ({"model": "base", "prompt": "Hi \ud800 there"}, "/v1/completions", "prompt"),
    ({"model": "base", "prompt": ["ok", "\udfff"]}, "/v1/completions", "prompt.1"),
    ({"model": "base", "messages": [{"role": "user", "content": "a\ud83d"}]}, "/v1/chat/completions",
     "messages.0.content"),
    ({"model": "base", "prompt": "Hi", "mixture": {"weights": {"base\ud800": 1}}}, "/v1/completions", "mixture.weights"),
    ({"model": "base", "prompt": "Hi", "stop": ["\udc00"]}, "/v1/completions", "stop.0"),
    ({"model": "base", "prompt": "Hi", "anything_extra": {"deep": ["\ud800"]}}, "/v1/completions",
     "anything_extra.deep.0"),
    ({"prompt": "Hi \ud800"}, "/tokenize", "prompt"),
])
def test_a_lone_surrogate_anywhere_is_a_400_naming_the_field(server, body, path, param):
    raw = json.dumps(body)  # ensure_ascii: the surrogate travels as the JSON escape "\ud800", valid JSON
    assert "\\ud" in raw
    r = httpx.post(f"{server.url}{path}", content=raw, timeout=30,
                   headers={"content-type": "application/json", "Authorization": "Bearer open-key"})
    assert r.status_code == 400, r.text
    err = error(r)
    assert err["param"] == param and "lone UTF-16 surrogate" in err["message"]
    r.content.decode("utf-8")  # the answer itself is valid UTF-8 (it never echoes the surrogate)


def test_astral_characters_and_nul_are_ordinary_text(server):
    r = post(server, {"model": "base", "prompt": "emoji \U0001F600 and nul \x00 here", "max_tokens": 3,
                      "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


@pytest.mark.parametrize("messages, status, param", [
    ([{"role": "system"}], 200, None),  # as at the top level: content may be absent
    ([{"role": "narrator", "content": "x"}], 400, "mixture.prompt_variants.v.messages.0.role"),
    ([{"content": "no role"}], 400, "mixture.prompt_variants.v.messages.0.role"),
    ([{"role": "user", "content": [{"type": "image_url"}]}], 400, "mixture.prompt_variants.v.messages.0.content"),
])
def test_variant_messages_follow_the_rules_of_top_level_messages(server, messages, status, param):
    r = post(server, {"model": "formal", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "temperature": 0, "mixture": {"weights": {"formal": 1.0, "v": 0.5},
                                                    "prompt_variants": {"v": {"policy": "formal",
                                                                              "messages": messages}}}},
             path="/v1/chat/completions")
    assert r.status_code == status, r.text
    if status != 200:
        assert error(r)["param"] == param


def test_guidance_negative_messages_are_typed_too(server):
    r = post(server, {"model": "base", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                      "mixture": {"guidance": {"policy": "base", "scale": 1.5,
                                               "negative_prompt": [{"role": "user", "content": 5}]}}},
             path="/v1/chat/completions")
    assert r.status_code == 400 and error(r)["param"].startswith("mixture.guidance.negative_prompt")


def test_a_temperature_below_epsilon_samples_greedily(server):
    greedy = post(server, {"model": "dpo", "prompt": "Hello", "max_tokens": 10, "temperature": 0, "ignore_eos": True})
    tiny = post(server, {"model": "dpo", "prompt": "Hello", "max_tokens": 10, "temperature": 1e-40,
                         "ignore_eos": True})
    assert greedy.status_code == tiny.status_code == 200
    assert tiny.json()["choices"][0]["text"] == greedy.json()["choices"][0]["text"]


# ----- the guard on every way a request selects text ----------------------------------------------------------


@pytest.mark.parametrize("extra, param", [
    ({"best_of": 4, "temperature": 1.0, "rerank": {"implicit": {"policy": "base", "reference": "safe", "beta": 1}}},
     "rerank.implicit"),
    ({"best_of": 4, "temperature": 1.0,
      "rerank": {"implicit": {"policy": "base", "reference": "safe", "beta": 1}, "prune": {"every": 2, "keep": 0.5}}},
     "rerank.implicit"),
    ({"temperature": 1.0, "search": {"beam_width": 2, "expand": 2, "chunk": 2,
                                     "scorer": {"implicit": {"policy": "base", "reference": "safe", "beta": 1}}}},
     "search.scorer.implicit"),
])
def test_an_implicit_reward_against_a_protected_policy_is_an_inversion(server, extra, param):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 4, **extra}
    r = post(server, body)
    assert r.status_code == 403 and error(r)["param"] == param and "protected floor" in error(r)["message"]
    assert post(server, body, key="lab").status_code == 200  # a key allowed to invert passes
    # the protected policy on the policy side adds its reward: not an inversion
    flipped = json.loads(json.dumps(body).replace('"policy": "base", "reference": "safe"',
                                                  '"policy": "safe", "reference": "base"'))
    assert post(server, flipped).status_code == 200


@pytest.mark.parametrize("mixture, status", [
    ({"weights": {"guarded": 1.0, "v": 1.0}, "prompt_variants": {"v": {"policy": "guarded", "system_prompt": "Obey."}}},
     403),
    ({"weights": {"v": 1.0}, "prompt_variants": {"v": {"policy": "guarded", "system_prompt": "Obey."}}}, 403),
    ({"context_aware": {"policy": "guarded", "alpha": -0.5, "drop": "system"}}, 403),
    ({"context_aware": {"policy": "guarded", "alpha": 0.5, "drop": "system"}}, 200),  # amplifies the prompt
    ({"guidance": {"policy": "guarded", "scale": 1.5, "negative_prompt": "Be rude."}}, 200),  # keeps its prompt
    ({"guidance": {"policy": "guarded", "scale": 1.5}}, 200),  # subtracts the unconditional: amplifies
    ({"weights": {"guarded": 1.0, "v": -0.5}, "prompt_variants": {"v": {"policy": "guarded", "system_prompt": "x"}}},
     200),
    ({"weights": {"guarded": 1.0, "v": 0.5}, "prompt_variants": {"v": {"policy": "guarded", "messages": [
        {"role": "user", "content": "Another question"}]}}}, 200),  # a messages variant keeps the system prompt
])
def test_a_variant_that_drops_a_protective_system_prompt_is_an_inversion(server, mixture, status):
    body = {"model": "guarded", "messages": [{"role": "system", "content": "Context."},
                                             {"role": "user", "content": "Hi"}],
            "max_tokens": 2, "temperature": 0, "mixture": mixture}
    r = post(server, body, path="/v1/chat/completions")
    assert r.status_code == status, r.text
    if status == 403:
        assert "protected" in error(r)["message"] and error(r)["code"] == "mixing_guard"
        assert post(server, body, key="lab", path="/v1/chat/completions").status_code == 200


# ----- keys --------------------------------------------------------------------------------------------------


def test_a_named_mixture_with_prompt_variants_is_served_to_a_key_scoped_to_it(server):
    r = post(server, {"model": "styled", "prompt": "Hi", "max_tokens": 3, "temperature": 0}, key="styled-only")
    assert r.status_code == 200, r.text


def test_the_server_default_draft_never_refuses_a_key_outside_its_scope(server):
    r = post(server, {"model": "base", "prompt": "Hi", "max_tokens": 3, "temperature": 0}, key="base-only")
    assert r.status_code == 200, r.text
    # the request's own draft policy must be in scope, and the refusal names that field
    r = post(server, {"model": "base", "prompt": "Hi", "max_tokens": 3, "temperature": 0,
                      "speculative": {"draft": "small"}}, key="base-only")
    assert r.status_code == 403 and error(r)["param"] == "speculative.draft"


def test_a_scope_refusal_names_the_field_that_brought_the_policy_in(server):
    r = post(server, {"model": "dpo", "prompt": "Hi", "max_tokens": 2, "return_token_signals": True}, key="dpo-only")
    assert r.status_code == 403 and error(r)["param"] == "return_token_signals"
    r = post(server, {"model": "dpo", "prompt": "Hi", "max_tokens": 2, "best_of": 2, "temperature": 1,
                      "rerank": {"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}}}, key="dpo-only")
    assert r.status_code == 403 and error(r)["param"] == "rerank"


def test_a_batched_completion_holds_one_concurrency_slot_per_prompt(server):
    sdk = openai.OpenAI(base_url=f"{server.url}/v1", api_key="two-key", max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model="base", prompt=["a", "b", "c"], max_tokens=2)
    assert err.value.body["param"] == "prompt"

    with httpx.Client(base_url=server.url, timeout=60, headers={"Authorization": "Bearer two-key"}) as c:
        with c.stream("POST", "/v1/completions", json={"model": "base", "prompt": ["a", "b"], "max_tokens": 30,
                                                       "ignore_eos": True, "stream": True}) as batch:
            assert batch.status_code == 200
            lines = batch.iter_lines()
            next(lines)  # the batch is running: it holds both of the key's slots
            third = c.post("/v1/completions", json={"model": "base", "prompt": "c", "max_tokens": 2})
            rest = "".join(lines)
    assert third.status_code == 429 and third.headers["retry-after"] == "1"
    assert rest.endswith("[DONE]")
    assert post(server, {"model": "base", "prompt": "c", "max_tokens": 2}, key="two").status_code == 200  # freed


def test_a_batch_that_can_never_fit_is_a_400_not_a_503(server):
    r = post(server, {"model": "base", "prompt": [[5]] * 97, "max_tokens": 1})  # max_queue 64 + 32 sequences
    assert r.status_code == 400 and error(r)["param"] == "prompt" and "never fit" in error(r)["message"]
    assert post(server, {"model": "base", "prompt": [[5]] * 8, "max_tokens": 1}).status_code == 200


def test_sse_events_escape_what_line_splitters_take_for_line_ends():
    from pydantic import BaseModel

    from policymix.api.serving import _data

    class Chunk(BaseModel):
        text: str

    text = "a\u2028b\u2029c\x85d"
    event = _data(Chunk(text=text))
    assert len(event.splitlines()) == 2 and event.endswith("\n\n")  # one data line, then the blank line
    assert json.loads(event[len("data: "):])["text"] == text

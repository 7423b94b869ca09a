"""Response shapes and SSE framing over the scripted engine (every byte is predictable)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from api_helpers import fake_config, sse_events
from fake_engine import SCRIPT, FakeEngine, token_logprob
from policymix.api import build_app

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": [{"type": "text", "text": "hi"}]}]


@pytest.fixture()
def engine():
    return FakeEngine()


@pytest.fixture()
def client(engine):
    with TestClient(build_app(engine, fake_config(), env={})) as c:
        yield c


def complete(client, **body):
    r = client.post("/v1/completions", json={"model": "base", "prompt": "hi", **body})
    assert r.status_code == 200, r.text
    return r.json()


def chat(client, **body):
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_lifespan_starts_and_stops_the_engine(engine):
    with TestClient(build_app(engine, fake_config(), env={})):
        assert engine.started and not engine.stopped
    assert engine.stopped


def test_completion_body(client, engine):
    body = complete(client, max_tokens=5, temperature=0.5, seed=3, stop=["zz"], top_k=4, min_p=0.1,
                    repetition_penalty=1.2, ignore_eos=True, stop_token_ids=[7], skip_special_tokens=False)
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-") and body["model"] == "base"
    (choice,) = body["choices"]
    assert choice["text"] == SCRIPT[:5] and choice["finish_reason"] == "length" and choice["logprobs"] is None
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    assert body["policymix"]["weights"] == {"base": 1.0} and body["policymix"]["mixture"] is None
    sp = engine.requests[0].sampling  # the request fields reached the engine unchanged
    assert (sp.max_tokens, sp.temperature, sp.seed, sp.stop, sp.top_k, sp.min_p) == (5, 0.5, 3, ["zz"], 4, 0.1)
    assert (sp.repetition_penalty, sp.ignore_eos, sp.stop_token_ids, sp.skip_special_tokens) == (1.2, True, [7], False)
    assert engine.requests[0].deadline > engine.requests[0].arrival_time


def test_defaults(client, engine):
    complete(client)
    sp = engine.requests[0].sampling
    assert (sp.max_tokens, sp.temperature, sp.top_p, sp.n, sp.best_of, sp.logprobs) == (16, 1.0, 1.0, 1, None, None)
    chat(client)  # chat without max_tokens: what the context leaves (64 - prompt)
    req, plan = engine.requests[1], engine.plans[1]
    assert req.sampling.max_tokens is None and plan.sampling.max_tokens == 64 - plan.prompt_len
    assert req.prompt.messages == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]


def test_completion_logprobs_shape(client):
    lp = complete(client, max_tokens=4, logprobs=2)["choices"][0]["logprobs"]
    assert lp["tokens"] == list(SCRIPT[:4])
    assert lp["token_logprobs"] == [token_logprob(i) for i in range(4)]
    assert lp["text_offset"] == [0, 1, 2, 3]
    assert lp["top_logprobs"][0] == {"H": token_logprob(0), "?": -3.0}
    # logprobs=0: only the chosen token
    lp0 = complete(client, max_tokens=2, logprobs=0)["choices"][0]["logprobs"]
    assert lp0["top_logprobs"] == [{"H": token_logprob(0)}, {"e": token_logprob(1)}]


def test_chat_body_and_logprobs_shape(client):
    body = chat(client, max_completion_tokens=3, logprobs=True, top_logprobs=2)
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"] == {"role": "assistant", "content": "Hel", "refusal": None}
    first = choice["logprobs"]["content"][0]
    assert first["token"] == "H" and first["bytes"] == [72] and first["logprob"] == token_logprob(0)
    assert first["top_logprobs"] == [{"token": "H", "logprob": token_logprob(0), "bytes": [72]},
                                     {"token": "?", "logprob": -3.0, "bytes": [63]}]
    assert chat(client, max_tokens=2)["choices"][0]["logprobs"] is None


def test_n_and_several_prompts_number_the_choices(client):
    body = complete(client, prompt=["a", "b"], n=2, max_tokens=20, temperature=1)
    got = [(c["index"], c["text"]) for c in body["choices"]]
    assert got == [(0, SCRIPT + "0"), (1, SCRIPT + "1"), (2, SCRIPT + "0"), (3, SCRIPT + "1")]
    assert all(c["finish_reason"] == "stop" for c in body["choices"])
    assert body["usage"]["prompt_tokens"] == 4  # <s>a + <s>b
    # token-id prompts, single and batched
    assert complete(client, prompt=[0, 40, 41], max_tokens=1)["choices"][0]["text"] == "H"
    assert len(complete(client, prompt=[[0, 40], [0, 41]], max_tokens=1)["choices"]) == 2


def test_echo_prepends_the_prompt(client):
    assert complete(client, prompt="Say: ", max_tokens=2, echo=True)["choices"][0]["text"] == "Say: He"
    assert complete(client, prompt=[0, 41, 42], max_tokens=1, echo=True)["choices"][0]["text"] == "<s>GHH"


def test_stop_string(client):
    (choice,) = complete(client, stop="w", max_tokens=16)["choices"]
    assert choice["text"] == "Hello " and choice["finish_reason"] == "stop" and choice["stop_reason"] == "w"


def test_mixture_and_named_mixture_are_echoed(client, engine):
    body = chat(client, max_tokens=1, mixture={"reference": "base", "policy": "dpo", "beta_prime": 0.05})
    assert body["policymix"]["weights"] == pytest.approx({"dpo": 2.0, "base": -1.0})
    assert engine.requests[-1].recipe.form == "dera"
    body = complete(client, model="half", max_tokens=1)
    assert body["model"] == "half" and body["policymix"]["mixture"] == "half"
    assert body["policymix"]["weights"] == {"base": 0.5, "dpo": 0.5}
    assert complete(client, mixture="half", max_tokens=1)["policymix"]["mixture"] == "half"


def test_best_of_candidates_and_rerank(client, engine):
    body = complete(client, n=1, best_of=3, max_tokens=20, rerank={"implicit": {"policy": "dpo", "reference": "base",
                                                                                 "beta": 0.1}})
    ext = body["policymix"]
    assert [c["score"] for c in ext["candidates"]] == [0.0, 1.0, 2.0]
    assert ext["candidates"][2]["text"] == SCRIPT + "2" and ext["candidates"][2]["token_ids"][-1] == 1
    assert ext["kl_bound"] == 0.5
    assert body["choices"][0]["text"] == SCRIPT + "2"  # the best candidate
    rr = engine.requests[-1].rerank
    assert rr.kind == "implicit" and (rr.implicit.policy, rr.implicit.reference, rr.implicit.beta) == ("dpo", "base", 0.1)
    complete(client, best_of=2, rerank={"reward_model": "rm"})
    assert engine.requests[-1].rerank.kind == "reward_model" and engine.requests[-1].rerank.reward_model == "rm"
    complete(client, best_of=2, rerank="logprob")
    assert engine.requests[-1].rerank.kind == "logprob"


def test_token_signals(client, engine):
    body = complete(client, model="half", max_tokens=3, return_token_signals=True)
    ext = body["policymix"]
    assert ext["kl_to_reference"] == 0.75 and ext["implicit_reward"] == 1.5
    assert [s["token"] for s in ext["token_signals"]] == ["H", "e", "l"]
    assert ext["token_signals"][0] == {"token": "H", "token_id": 42, "policy_logprobs": {"base": -1.0, "dpo": -1.0},
                                       "implicit_reward": 0.5, "kl": 0.25}
    assert engine.requests[-1].return_token_signals and engine.requests[-1].return_policy_logprobs
    many = complete(client, model="half", max_tokens=2, n=2, return_token_signals=True)
    assert [c["policymix"]["kl_to_reference"] for c in many["choices"]] == [0.5, 0.5]


# ---------------------------------------------------------------------------------------- SSE


def stream(client, path="/v1/completions", **body):
    base = {"model": "base", "stream": True}
    base.update({"prompt": "hi"} if path == "/v1/completions" else {"messages": CHAT})
    r = client.post(path, json={**base, **body})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]" and "[DONE]" not in events[:-1]
    return events[:-1]


def test_completion_stream(client):
    events = stream(client, max_tokens=3)
    assert "".join(c["choices"][0]["text"] for c in events) == "Hel"
    assert all(e["object"] == "text_completion" and e["id"] == events[0]["id"] for e in events)
    assert [e["choices"][0]["finish_reason"] for e in events] == [None, None, None, "length"]
    assert "usage" not in events[0]
    assert events[-1]["policymix"]["weights"] == {"base": 1.0}
    assert all("policymix" not in e for e in events[:-1])


def test_chat_stream_role_first_and_finish_last(client):
    events = stream(client, "/v1/chat/completions", max_tokens=3, logprobs=True, top_logprobs=1)
    assert events[0]["object"] == "chat.completion.chunk"
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [e["choices"][0]["delta"] for e in events[1:-1]]
    assert "".join(d["content"] for d in deltas) == "Hel" and all("role" not in d for d in deltas)
    assert events[1]["choices"][0]["logprobs"]["content"][0]["token"] == "H"
    assert [e["choices"][0]["finish_reason"] for e in events] == [None] * 4 + ["length"]
    assert events[-1]["choices"][0]["delta"] == {}


def test_stream_usage_chunk(client):
    events = stream(client, "/v1/chat/completions", max_tokens=2, stream_options={"include_usage": True})
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 2


def test_stream_n_interleaves_by_index(client):
    events = stream(client, "/v1/chat/completions", max_tokens=20, n=2, temperature=1)
    text = {0: "", 1: ""}
    order = []
    for e in events:
        (c,) = e["choices"]
        text[c["index"]] += c["delta"].get("content") or ""
        order.append(c["index"])
    assert text == {0: SCRIPT + "0", 1: SCRIPT + "1"}
    assert order[:4] == [0, 1, 0, 1]  # role chunks, then tokens interleaved as they come
    assert events[-1]["policymix"] is not None and events[-1]["choices"][0]["policymix"] is not None


def test_stream_completion_logprobs_offsets_and_echo(client):
    events = stream(client, max_tokens=3, logprobs=1)
    assert [e["choices"][0]["logprobs"]["text_offset"] for e in events[:3]] == [[0], [1], [2]]
    events = stream(client, prompt="Q: ", max_tokens=1, echo=True)
    assert events[0]["choices"][0]["text"] == "Q: " and events[1]["choices"][0]["text"] == "H"


def test_stream_best_of_sends_the_winner(client):
    events = stream(client, max_tokens=20, best_of=3)
    assert "".join(e["choices"][0]["text"] for e in events) == SCRIPT + "2"
    assert len(events[-1]["policymix"]["candidates"]) == 3


def test_stream_error_after_start_is_an_error_event(client):
    r = client.post("/v1/chat/completions", json={"model": "base", "messages": CHAT, "stream": True})
    assert r.status_code == 200
    r = client.post("/v1/completions", json={"model": "base", "prompt": "FAIL", "stream": True})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    err = events[-2]["error"]
    assert err["type"] == "server_error" and "boom" in err["message"]


# ----------------------------------------------------------------------------- other endpoints


def test_models(client):
    data = client.get("/v1/models").json()["data"]
    by_id = {m["id"]: m for m in data}
    assert by_id["half"]["policymix"] == {"kind": "mixture", "family": 0, "weights": {"base": 0.5, "dpo": 0.5}}
    assert by_id["nochat"]["policymix"]["family"] == 1 and by_id["base"]["max_model_len"] == 64
    assert all(m["object"] == "model" for m in data)
    assert client.get("/v1/models/rm").json()["policymix"]["kind"] == "reward"


def test_tokenize_detokenize(client):
    r = client.post("/tokenize", json={"model": "base", "prompt": "Hi"}).json()
    assert r["tokens"] == [0, 42, 75] and r["count"] == 3 and r["max_model_len"] == 64
    assert client.post("/tokenize", json={"model": "base", "prompt": "Hi", "add_special_tokens": False}).json()["count"] == 2
    r = client.post("/tokenize", json={"model": "base", "messages": [{"role": "user", "content": "x"}]}).json()
    assert r["count"] == len("<user>x<assistant>")
    assert client.post("/detokenize", json={"model": "base", "tokens": [42, 75]}).json() == {"prompt": "Hi"}
    assert client.post("/detokenize", json={"model": "base", "tokens": [999]}).status_code == 400
    assert client.post("/tokenize", json={"model": "base"}).status_code == 400


def test_metrics(client, engine):
    complete(client, max_tokens=3)
    stream(client, "/v1/chat/completions", model="half", max_tokens=2)
    text = client.get("/metrics").text
    assert 'policymix_generation_tokens_total{model="base"} 3.0' in text
    assert 'policymix_generation_tokens_total{model="half"} 2.0' in text
    assert 'policymix_prompt_tokens_total{model="base"} 3.0' in text
    assert 'policymix_requests_total{model="base",outcome="ok"} 1.0' in text
    assert 'policymix_time_to_first_token_seconds_count{model="half"} 1.0' in text
    assert 'policymix_inter_token_latency_seconds_count{model="base"} 2.0' in text
    assert 'policymix_e2e_request_latency_seconds_count{model="base"} 1.0' in text
    assert 'policymix_requests_running{model="base"} 0.0' in text
    assert f'policymix_policy_forwards_total{{policy="base"}} {float(engine.forwards)}' in text
    # a model name that does not exist never becomes a label
    client.post("/v1/completions", json={"model": "ghost", "prompt": "x"})
    assert "ghost" not in client.get("/metrics").text

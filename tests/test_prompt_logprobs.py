"""Prompt log-probabilities (echo with logprobs, prompt_logprobs, max_tokens 0) under any mixture.

Every prompt position's log-probability under q must equal an independent no-cache forward of each
policy over its own context (a prompted policy: its system prompt, then the same tokens), mixed and
normalised per position; for one policy, HF's log_softmax of a freshly loaded model's logits.
"""

from __future__ import annotations

import random

import httpx
import openai
import pytest
import torch

from api_helpers import LiveServer
from engine_helpers import make_request, run_until_done, submit
from policymix.engine.core import EngineCore

NAMES = ["base", "dpo", "safe", "small", "formal"]


@torch.inference_mode()
def oracle_prompt_logq(registry, weights: dict[str, float], prompts: dict[str, list[int]], n_scored: int):
    """log q [n_scored - 1, V] at the positions predicting scored tokens 1..n-1, by full forwards."""
    mixed = None
    for name, w in weights.items():
        if w == 0:
            continue
        pol = registry.policies[name]
        ctx = prompts[name]
        logits = pol.model(input_ids=torch.tensor([ctx])).logits[0, :, : pol.vocab_size].float()
        rows = torch.log_softmax(logits[len(ctx) - n_scored : len(ctx) - 1], -1)
        mixed = w * rows if mixed is None else mixed + w * rows
    return torch.log_softmax(mixed, -1)


def check_against_oracle(registry, plan, event, k: int):
    x = plan.scored
    assert event.token_ids == x and event.logprobs[0] is None and len(event.logprobs) == len(x)
    logq = oracle_prompt_logq(registry, plan.weights, plan.prompts, len(x))
    for t in range(1, len(x)):
        got, ref = event.logprobs[t], logq[t - 1]
        assert got.logprob == pytest.approx(float(ref[x[t]]), abs=1e-4)
        assert got.rank == int((ref > ref[x[t]]).sum()) + 1
        top = torch.topk(ref, k)
        assert [i for i, _ in got.top_logprobs] == top.indices.tolist()
        assert [v for _, v in got.top_logprobs] == pytest.approx(top.values.tolist(), abs=1e-4)


def test_random_recipes_joining_a_busy_engine_equal_the_oracle(tiny_registry):
    core = EngineCore(tiny_registry)
    rng = random.Random(3)
    busy = [submit(core, make_request(core, "base", {"weights": {"base": 0.6, "dpo": 0.4}}, f"Busy {i}",
                                      max_tokens=40, temperature=0.0, ignore_eos=True)) for i in range(4)]
    for _ in range(3):
        core.step()
    scoring = []
    for i in range(8):
        names = rng.sample(NAMES, rng.randint(1, 3))
        weights = {n: round(rng.uniform(-0.8, 1.6), 2) or 0.5 for n in names}
        req = make_request(core, names[0], {"weights": weights}, f"Prompt number {i} says hello to the world",
                           max_tokens=rng.choice([0, 3]), temperature=0.0, prompt_logprobs=5)
        plan = core.render(req).plan
        scoring.append((plan, submit(core, req)))
        core.step()  # they join while the busy ones decode
    run_until_done(core, busy + [c for _, c in scoring])
    for plan, col in scoring:
        check_against_oracle(tiny_registry, plan, col.prompt, 5)
        assert len(col.tokens()) == plan.sampling.max_tokens
    assert all(c.done.error is None for c in busy)
    assert not any(r.slots for r in core.runners.values()) and not any(r.position_logits for r in core.runners.values())


def test_a_long_scored_prompt_is_chunked_beside_streams_and_stays_exact(tiny_registry):
    """While others decode, a scored prefill advances CHUNK_TOKENS per step (the streams keep a token per
    step); chunk boundaries fall at the same distance from every policy's end, so the numbers are exact."""
    from policymix.engine.prompt_scoring import CHUNK_TOKENS

    core = EngineCore(tiny_registry)
    streams = [submit(core, make_request(core, "base", None, f"Stream {i}", max_tokens=60, temperature=0.0,
                                         ignore_eos=True)) for i in range(3)]
    core.step()
    text = " ".join(f"word{i % 17} and more text" for i in range(40))
    req = make_request(core, "formal", {"weights": {"formal": 1.3, "dpo": -0.3}}, text, max_tokens=2,
                       temperature=0.0, prompt_logprobs=3, ignore_eos=True)
    plan = core.render(req).plan
    col = submit(core, req)
    steps, before = 0, [len(c.events) for c in streams]
    while col.prompt is None:
        core.step()
        steps += 1
    assert len(plan.scored) > 3 * CHUNK_TOKENS and steps >= len(plan.scored) // CHUNK_TOKENS
    assert all(len(c.events) - b == steps for c, b in zip(streams, before))  # no stream waited
    run_until_done(core, streams + [col])
    check_against_oracle(tiny_registry, plan, col.prompt, 3)
    assert len(col.tokens()) == 2


def test_one_policy_equals_hf_log_softmax(tiny_registry, tiny_dir):
    from transformers import AutoModelForCausalLM

    core = EngineCore(tiny_registry)
    req = make_request(core, "base", None, "The quick brown fox jumps over the lazy dog", max_tokens=0,
                       prompt_logprobs=0)
    col = submit(core, req)
    run_until_done(core, [col])
    x = col.prompt.token_ids
    V = tiny_registry.policies["base"].vocab_size
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "base", dtype=torch.float32)
    with torch.inference_mode():
        ref = torch.log_softmax(model(input_ids=torch.tensor([x])).logits[0, :-1, :V].float(), -1)
    expected = ref.gather(1, torch.tensor(x[1:])[:, None])[:, 0].tolist()
    assert [e.logprob for e in col.prompt.logprobs[1:]] == pytest.approx(expected, abs=1e-4)
    assert col.tokens() == [] and col.done.sequences[0].finish_reason == "length"
    assert col.done.completion_tokens == 0 and col.done.prompt_tokens == len(x)


def test_n_after_scoring_and_prompted_policy_context(tiny_registry):
    """n=2 share the scored prefill; a prompted policy's context is its system prompt, then the same tokens."""
    core = EngineCore(tiny_registry)
    req = make_request(core, "formal", {"weights": {"formal": 1.2, "base": -0.2}}, "Hello there", max_tokens=4,
                       temperature=1.0, seed=1, n=2, ignore_eos=True, prompt_logprobs=2)
    plan = core.render(req).plan
    assert plan.prompts["formal"][-(len(plan.scored) - 1):] == plan.scored[1:]
    assert len(plan.prompts["formal"]) > len(plan.scored) and plan.prompts["base"] == plan.scored
    col = submit(core, req)
    run_until_done(core, [col])
    check_against_oracle(tiny_registry, plan, col.prompt, 2)
    assert len(col.tokens(0)) == len(col.tokens(1)) == 4


def test_max_tokens_zero_needs_scoring(tiny_registry):
    from policymix.errors import PolicymixError

    core = EngineCore(tiny_registry)
    with pytest.raises(PolicymixError) as err:
        core.render(make_request(core, "base", None, "Hi", max_tokens=0))
    assert err.value.param == "max_tokens"
    with pytest.raises(PolicymixError) as err:
        core.render(make_request(core, "base", None, "Hi", max_tokens=0, n=2, prompt_logprobs=0))
    assert err.value.param == "max_tokens"


# ----- over HTTP: the OpenAI SDK's echo + logprobs, vLLM's prompt_logprobs, /tokenizer_info -----------------


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.api import build_app
    from policymix.engine.native import NativeEngine

    with LiveServer(build_app(NativeEngine(tiny_registry), tiny_config, env={})) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=60)


def engine_prompt_logprobs(tiny_registry, model, mixture, prompt, k):
    core = EngineCore(tiny_registry)
    col = submit(core, make_request(core, model, mixture, prompt, max_tokens=0, prompt_logprobs=k))
    run_until_done(core, [col])
    return col.prompt


def test_echo_with_logprobs_over_http(sdk, tiny_registry):
    mixture = {"weights": {"dpo": 1.5, "small": -0.5}}
    c = sdk.completions.create(model="base", prompt="Hello world again", echo=True, logprobs=2, max_tokens=0,
                               extra_body={"mixture": mixture})
    ch = c.choices[0]
    ev = engine_prompt_logprobs(tiny_registry, "base", mixture, "Hello world again", 2)
    assert ch.text == "Hello world again" and ch.finish_reason == "length" and c.usage.completion_tokens == 0
    assert ch.logprobs.token_logprobs[0] is None and ch.logprobs.top_logprobs[0] is None
    assert ch.logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in ev.logprobs[1:]], abs=1e-5)
    assert len(ch.logprobs.tokens) == len(ev.token_ids) == c.usage.prompt_tokens
    # with generated tokens after the prompt (lm-eval sends max_tokens 1), token ids as the prompt
    ids = ev.token_ids
    c1 = sdk.completions.create(model="base", prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0,
                                extra_body={"mixture": mixture})
    lp = c1.choices[0].logprobs
    assert len(lp.token_logprobs) == len(ids) + 1 and lp.token_logprobs[1:-1] == pytest.approx(
        ch.logprobs.token_logprobs[1:], abs=1e-5)
    assert lp.text_offset == sorted(lp.text_offset)


def test_streamed_echo_equals_the_whole_response(sdk):
    kw = dict(model="base", prompt="Stream me", echo=True, logprobs=1, max_tokens=3, temperature=0)
    whole = sdk.completions.create(**kw)
    chunks = list(sdk.completions.create(stream=True, **kw))
    text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
    lps = [x for ch in chunks if ch.choices and ch.choices[0].logprobs for x in ch.choices[0].logprobs.token_logprobs]
    assert text == whole.choices[0].text and lps == pytest.approx(whole.choices[0].logprobs.token_logprobs)


def test_vllm_prompt_logprobs_shape_on_completions_and_chat(sdk, tiny_registry):
    c = sdk.completions.create(model="dpo-soft", prompt="Score this", max_tokens=1, temperature=0,
                               extra_body={"prompt_logprobs": 3})
    plp = c.choices[0].model_extra["prompt_logprobs"]
    ev = engine_prompt_logprobs(tiny_registry, "dpo-soft", None, "Score this", 3)
    assert plp[0] is None and len(plp) == len(ev.token_ids)
    for tid, entry, got in zip(ev.token_ids[1:], ev.logprobs[1:], plp[1:]):
        assert got[str(tid)]["logprob"] == pytest.approx(entry.logprob, abs=1e-5)
        assert got[str(tid)]["rank"] == entry.rank and 3 <= len(got) <= 4
    chat = sdk.chat.completions.create(model="base", messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                       extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and all(len(e) == 1 for e in plp[1:]) and len(plp) == chat.usage.prompt_tokens


def test_tokenizer_info_and_tokenize_without_a_model(server, tiny_registry):
    info = httpx.get(f"{server.url}/tokenizer_info").json()
    tok = tiny_registry.policies["base"].tokenizer
    assert info["eos_token"] == tok.eos_token and info["model"] == "base" and info["vocab_size"] == len(tok)
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "test", "add_special_tokens": False}).json()
    assert r["tokens"] == tok("test", add_special_tokens=False).input_ids


def test_bad_scoring_requests_are_400_naming_the_field(sdk):
    with pytest.raises(openai.BadRequestError) as err:
        sdk.completions.create(model="base", prompt="Hi", max_tokens=0)
    assert "max_tokens" in str(err.value)
    with pytest.raises(openai.BadRequestError) as err:  # longer than the context (tiny models: 1024 positions)
        sdk.completions.create(model="base", prompt=[5] * 1100, echo=True, logprobs=1, max_tokens=0)
    assert "maximum context length" in err.value.message and "1100" in err.value.message

"""Reward-guided best-of: early pruning (rerank.prune) and soft selection (rerank.soft), against independent
computations: partial scores recomputed from scratch, selection frequencies against the softmax."""

from __future__ import annotations

import math
import random

import httpx
import pytest
import torch
from scipy import stats

from api_helpers import LiveServer
from engine_helpers import make_request, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.protocol import ImplicitRewardSpec, RerankSpec
from policymix.rerank import reward_model_scores, soft_choose, soft_probabilities


def test_soft_choice_frequencies_follow_the_softmax():
    scores, temperature = [0.3, -1.2, 0.9, 0.0, -0.4], 0.7
    probs = soft_probabilities(scores, temperature)
    expected = [math.exp(s / temperature) for s in scores]
    assert probs == pytest.approx([e / sum(expected) for e in expected], abs=1e-12)
    draws = [soft_choose(probs, 1, random.Random(seed))[0] for seed in range(6000)]
    counts = [draws.count(i) for i in range(len(scores))]
    assert stats.chisquare(counts, [p * len(draws) for p in probs]).pvalue > 1e-3
    assert sorted(soft_choose(probs, 5, random.Random(1))) == [0, 1, 2, 3, 4]  # without replacement


@torch.inference_mode()
def implicit_from_scratch(registry, plan, spec: ImplicitRewardSpec, tokens: list[int]) -> float:
    total = 0.0
    for name, sign in ((spec.policy, 1.0), (spec.reference, -1.0)):
        pol = registry.policies[name]
        ctx = plan.prompts[name]
        logits = pol.model(input_ids=torch.tensor([ctx + tokens])).logits[0, len(ctx) - 1 : -1, : pol.vocab_size]
        lp = torch.log_softmax(logits.float(), -1).gather(1, torch.tensor(tokens)[:, None])
        total += sign * float(lp.sum())
    return spec.beta * total


def test_pruned_candidates_scored_from_scratch(tiny_registry):
    core = EngineCore(tiny_registry)
    spec = ImplicitRewardSpec("dpo", "base", 0.1)
    rerank = RerankSpec("implicit", implicit=spec, prune_every=3, prune_keep=0.5)
    req = make_request(core, "base", {"weights": {"base": 0.5, "dpo": 0.5}}, "Once upon a time", max_tokens=12,
                       temperature=1.0, seed=5, best_of=8, ignore_eos=True, rerank=rerank)
    plan = core.render(req).plan
    col = submit(core, req)
    run_until_done(core, [col])
    cands = col.done.candidates
    pruned = [c for c in cands if c.finish_reason == "pruned"]
    assert sorted(len(c.token_ids) for c in pruned) == [3, 3, 3, 3, 6, 6, 9]  # 8 -> 4 -> 2 -> 1 running
    for c in cands:
        assert c.score == pytest.approx(implicit_from_scratch(tiny_registry, plan, spec, c.token_ids), abs=1e-4)
    winner = max((c for c in cands if c.finish_reason != "pruned"), key=lambda c: c.score)
    assert col.done.sequences[0].token_ids == winner.token_ids and len(winner.token_ids) == 12
    assert col.done.generated_tokens == sum(len(c.token_ids) for c in cands) == 4 * 3 + 2 * 6 + 9 + 12
    assert not any(r.slots for r in core.runners.values())


def test_keep_one_equals_plain_best_of(tiny_registry):
    core = EngineCore(tiny_registry)
    runs = []
    for rerank in (RerankSpec("logprob"), RerankSpec("logprob", prune_every=2, prune_keep=1.0)):
        col = submit(core, make_request(core, "dpo", None, "Hello there", max_tokens=8, temperature=1.0, seed=11,
                                        best_of=5, rerank=rerank))
        run_until_done(core, [col])
        runs.append(col.done)
    a, b = runs
    assert [(c.token_ids, c.score, c.finish_reason) for c in a.candidates] == \
           [(c.token_ids, c.score, c.finish_reason) for c in b.candidates]
    assert a.sequences[0].token_ids == b.sequences[0].token_ids


def test_reward_model_prune_scores_the_partial_text(tiny_registry):
    core = EngineCore(tiny_registry)
    rerank = RerankSpec("reward_model", reward_model="rm", prune_every=4, prune_keep=0.25)
    req = make_request(core, "base", None, "Prompt", max_tokens=8, temperature=1.0, seed=2, best_of=4,
                       ignore_eos=True, rerank=rerank)
    col = submit(core, req)
    run_until_done(core, [col])
    rm = tiny_registry.policies["rm"]
    pruned = [c for c in col.done.candidates if c.finish_reason == "pruned"]
    assert len(pruned) == 3 and all(len(c.token_ids) == 4 for c in pruned)
    for c in col.done.candidates:
        assert c.score == pytest.approx(reward_model_scores(rm, req.prompt, [c.text])[0], abs=1e-4)


def test_soft_best_of_draws_from_the_request_seed(tiny_registry):
    core = EngineCore(tiny_registry)
    dones = []
    for _ in range(2):
        req = make_request(core, "base", None, "Hello", max_tokens=6, temperature=1.0, seed=9, best_of=6,
                           rerank=RerankSpec("logprob", soft_temperature=0.5))
        plan = core.render(req).plan
        col = submit(core, req)
        run_until_done(core, [col])
        dones.append(col.done)
    done = dones[0]
    scores = [c.score for c in done.candidates]
    assert [c.probability for c in done.candidates] == pytest.approx(soft_probabilities(scores, 0.5), abs=1e-12)
    pick = soft_choose(soft_probabilities(scores, 0.5), 1, random.Random(plan.seed(plan.candidates)))[0]
    assert done.sequences[0].token_ids == done.candidates[pick].token_ids
    assert dones[1].sequences[0].token_ids == done.sequences[0].token_ids  # same seed, same draw


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.api import build_app
    from policymix.engine.native import NativeEngine

    with LiveServer(build_app(NativeEngine(tiny_registry), tiny_config, env={})) as srv:
        yield srv


def test_http_fields_and_usage(server):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 6, "temperature": 1.0, "seed": 3, "best_of": 4,
            "ignore_eos": True, "rerank": {"prune": {"every": 2, "keep": 0.5}, "soft": {"temperature": 1.0}}}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    ext = r["policymix"]
    assert [c["finish_reason"] for c in ext["candidates"]].count("pruned") == 3
    assert ext["usage"]["generated_tokens"] == sum(len(c["token_ids"]) for c in ext["candidates"]) == 6 + 2 * 2 + 4
    assert sum(c["probability"] for c in ext["candidates"]) == pytest.approx(1.0)
    assert r["usage"]["completion_tokens"] == ext["usage"]["generated_tokens"]


@pytest.mark.parametrize("rerank, extra, param", [
    ({"prune": {"every": 2, "keep": 0}}, {}, "rerank.prune.keep"),
    ({"prune": {"every": 2, "keep": 1.5}}, {}, "rerank.prune.keep"),
    ({"prune": {"every": 0, "keep": 0.5}}, {}, "rerank.prune.every"),
    ({"soft": {"temperature": 0}}, {}, "rerank.soft.temperature"),
    ({"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}, "prune": {"every": 2, "keep": 0.5}},
     {"best_of": 1}, "rerank.prune"),
])
def test_bad_prune_and_soft_are_400_naming_the_field(server, rerank, extra, param):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, "best_of": 4, "rerank": rerank,
            **extra}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ----- chunk-level beam search ---------------------------------------------------------------------------


def _search_request(core, search, rerank, **kw):
    from policymix.engine.protocol import SearchSpec

    req = make_request(core, "base", {"weights": {"base": 0.5, "dpo": 0.5}}, "Once upon a time", temperature=1.0,
                       ignore_eos=True, rerank=rerank, **kw)
    req.search = SearchSpec(*search)
    w, k, _ = search
    req.sampling.best_of = w * k if w * k > 1 else None
    return req


def test_beam_width_one_expand_one_is_sampling(tiny_registry):
    core = EngineCore(tiny_registry)
    plain = submit(core, make_request(core, "base", {"weights": {"base": 0.5, "dpo": 0.5}}, "Once upon a time",
                                      temperature=1.0, ignore_eos=True, max_tokens=10, seed=4))
    beam = submit(core, _search_request(core, (1, 1, 3), RerankSpec("logprob"), max_tokens=10, seed=4))
    run_until_done(core, [plain, beam])
    assert beam.tokens() == plain.tokens() and len(plain.tokens()) == 10


def test_beam_search_keeps_the_best_chunks_by_the_scorer(tiny_registry):
    """Beams of 2 x 3 chunks of 4 tokens: every round keeps the 2 best of 6 by the implicit reward, which
    equals a from-scratch computation on every branch's tokens; other requests step alongside."""
    core = EngineCore(tiny_registry)
    spec = ImplicitRewardSpec("dpo", "base", 0.1)
    req = _search_request(core, (2, 3, 4), RerankSpec("implicit", implicit=spec), max_tokens=12, seed=7)
    plan = core.render(req).plan
    col = submit(core, req)
    other = submit(core, make_request(core, "dpo", None, "Beside", max_tokens=12, temperature=0.0, ignore_eos=True))
    steps = 0
    while col.done is None:
        core.step()
        steps += 1
        if other.done is None:
            assert len(other.tokens()) == min(steps, 12)  # it streams a token every step meanwhile
    run_until_done(core, [other])
    cands = col.done.candidates
    pruned = [c for c in cands if c.finish_reason == "pruned"]
    final = [c for c in cands if c.finish_reason != "pruned"]
    # round 1: 3 branches of the root, 1 pruned; rounds 2 and 3: 2 x 3 branches, 4 pruned each... until 12 tokens
    assert sorted(len(c.token_ids) for c in pruned) == [4, 8, 8, 8, 8]
    assert len(final) == 6 and all(len(c.token_ids) == 12 for c in final)
    for c in cands:
        assert c.score == pytest.approx(implicit_from_scratch(tiny_registry, plan, spec, c.token_ids), abs=1e-4)
    best = max(final, key=lambda c: c.score)
    assert col.done.sequences[0].token_ids == best.token_ids
    assert "".join(e.text for e in col.events) == best.text  # the final beam is what streams
    assert col.done.generated_tokens == 3 * 4 + 6 * 4 + 6 * 4
    assert not any(r.slots for r in core.runners.values())


@pytest.mark.parametrize("search, extra, param", [
    ({"beam_width": 2, "expand": 2, "chunk": 0}, {}, "search.chunk"),
    ({"beam_width": 4, "expand": 5, "chunk": 2}, {}, "search"),  # 20 > max_best_of (16)
    ({"beam_width": 2, "expand": 2, "chunk": 2}, {"temperature": 0}, "search"),
    ({"beam_width": 2, "expand": 2, "chunk": 2}, {"n": 2}, "search"),
])
def test_bad_search_is_400_naming_the_field(server, search, extra, param):
    body = {"model": "base", "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, "search": search, **extra}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_search_over_http(server):
    body = {"model": "base", "prompt": "Hi", "temperature": 1.0, "seed": 1, "ignore_eos": True,
            "search": {"beam_width": 2, "expand": 2, "chunk": 3, "max_tokens": 6,
                       "scorer": {"implicit": {"policy": "dpo", "reference": "base", "beta": 0.1}}}}
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).json()
    ext = r["policymix"]
    assert ext["usage"]["generated_tokens"] == 2 * 3 + 4 * 3 and len(r["choices"]) == 1
    best = max((c for c in ext["candidates"] if c["finish_reason"] != "pruned"), key=lambda c: c["score"])
    assert r["choices"][0]["text"] == best["text"]


def test_search_and_prune_obey_key_scopes_and_limits(tiny_registry, tiny_config):
    from policymix.api import build_app
    from policymix.api.auth import hash_key
    from policymix.config import ApiKeySpec
    from policymix.engine.native import NativeEngine

    cfg = tiny_config.model_copy(deep=True)
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key("k"), name="scoped", policies=["base", "dpo"],
                                      max_best_of=4)]
    implicit = {"implicit": {"policy": "dpo", "reference": "safe", "beta": 0.1}}  # safe is out of scope
    with LiveServer(build_app(NativeEngine(tiny_registry), cfg, env={})) as srv:
        def post(extra):
            body = {"model": "base", "prompt": "Hi", "max_tokens": 4, "temperature": 1.0, **extra}
            return httpx.post(f"{srv.url}/v1/completions", json=body, headers={"Authorization": "Bearer k"},
                              timeout=60)

        r = post({"search": {"beam_width": 2, "expand": 2, "chunk": 2, "scorer": implicit}})
        assert r.status_code == 403 and "safe" in r.json()["error"]["message"]
        r = post({"best_of": 4, "rerank": {**implicit, "prune": {"every": 2, "keep": 0.5}}})
        assert r.status_code == 403 and "safe" in r.json()["error"]["message"]
        r = post({"search": {"beam_width": 2, "expand": 3, "chunk": 2}})  # 6 candidates > the key's 4
        assert r.status_code == 403 and r.json()["error"]["param"] == "best_of"
        assert post({"search": {"beam_width": 2, "expand": 2, "chunk": 2}}).status_code == 200

"""The native engine against a no-cache oracle, and its sampling, stop and lifecycle rules."""

from __future__ import annotations

import random

import pytest
import torch
from scipy import stats

from engine_helpers import full_logprobs, make_request, oracle_mixed_logprobs, run_until_done, submit
from policymix.engine.core import EngineCore


@pytest.fixture()
def core(tiny_registry):
    return EngineCore(tiny_registry)


@pytest.mark.parametrize("decode", ["dynamic", "static"])
def test_exactness_oracle_continuous_batching(core, tiny_registry, decode):
    """Random recipes (negative weights too), 10 requests joining and leaving at random steps.

    ``static``: decode-only steps run with static shapes (padded batch bucket, whole-capacity keys), the
    path that is replayed as CUDA graphs on a GPU."""
    from policymix.engine.static_decode import StaticDecoder

    if decode == "static":
        for runner in core.runners.values():
            runner.static = StaticDecoder(runner, use_graphs=False)
    rng = random.Random(0)
    V = tiny_registry.policies["base"].vocab_size
    names = ["base", "dpo", "safe", "small", "formal"]
    prompts = ["Hello world", "Paris is the capital", "A policy is", "The quick brown fox jumps over",
               "Numbers: 1 2 3", "Alignment researchers tune", "How are you today?", "café naïve", "x",
               "Please answer formally and concisely: the quick brown fox jumps over the lazy dog, "
               "and alignment researchers tune language models with preferences."]
    plan = []  # (join step, request)
    for i, text in enumerate(prompts):
        chosen = rng.sample(names, rng.randint(1, 3))
        weights = {n: round(rng.uniform(-0.8, 1.5), 3) for n in chosen}
        if all(abs(w) < 1e-6 for w in weights.values()):
            weights[chosen[0]] = 1.0
        req = make_request(core, "base", {"weights": weights}, text, max_tokens=rng.randint(40, 140),
                           temperature=0, logprobs=V, ignore_eos=True)
        plan.append((rng.randint(0, 120), req))
    cols = {}
    step = 0
    while len(cols) < len(plan) or any(c.done is None for _, c in cols.values()):
        for join, req in plan:
            if join == step and req.request_id not in cols:
                cols[req.request_id] = (req, submit(core, req))
        if core.has_work():
            core.step()
        step += 1
        assert step < 1000
    checked = 0
    worst = 0.0
    for req, col in cols.values():
        state = core.render(req)
        out: list[int] = []
        for ev in col.events:
            expect = oracle_mixed_logprobs(tiny_registry, state.weights, state.prompts, out)
            got = full_logprobs(ev, V)
            worst = max(worst, float((got - expect).abs().max()))
            assert ev.token_id == int(expect.argmax())  # greedy identical to the oracle's greedy
            out.append(ev.token_id)
            checked += 1
        assert col.done.sequences[0].token_ids == out
    assert worst < 1e-4, worst
    assert core.steps >= 200 and checked >= 500
    assert max(len(c.events) for _, c in cols.values()) > min(len(c.events) for _, c in cols.values())
    assert not any(r.slots for r in core.runners.values())  # every cache slot freed
    if decode == "static":
        assert all(r.static.static for r in core.runners.values() if r.forwards)  # the static path ran
    else:
        assert sum(r.split_steps for r in core.runners.values()) > 0  # joins ran apart from decoding rows


def test_prompted_policy_sees_its_system_prompt(core, tiny_registry):
    req = make_request(core, "formal", None, "Hello", max_tokens=3, temperature=0)
    state = core.render(req)
    base_ids = tiny_registry.policies["base"].tokenizer("Hello").input_ids
    assert len(state.prompts["formal"]) > len(base_ids)
    assert tiny_registry.policies["formal"].model is tiny_registry.policies["base"].model  # weights loaded once


def test_seed_gives_same_tokens_alone_and_under_concurrency(tiny_registry):
    core = EngineCore(tiny_registry)
    mix = {"weights": {"base": 0.7, "dpo": 0.3}}
    alone = submit(core, make_request(core, "base", mix, "Hello world", max_tokens=24, temperature=1.0, seed=1234,
                                      ignore_eos=True))
    run_until_done(core, [alone])
    core = EngineCore(tiny_registry)
    others = [submit(core, make_request(core, "dpo", None, f"Prompt {i}", max_tokens=10 + i, temperature=0.9,
                                        ignore_eos=True)) for i in range(8)]
    core.step()
    crowd = submit(core, make_request(core, "base", mix, "Hello world", max_tokens=24, temperature=1.0, seed=1234,
                                      ignore_eos=True))
    others += [submit(core, make_request(core, "small", {"weights": {"small": 1.2, "safe": -0.2}}, f"Other {i}",
                                         max_tokens=30, temperature=1.0, ignore_eos=True)) for i in range(7)]
    run_until_done(core, others + [crowd])
    assert alone.tokens() == crowd.tokens()
    assert len(alone.tokens()) == 24


def test_sampled_frequencies_match_q(tiny_registry):
    """Chi-square: the first sampled token over many seeded draws follows q = softmax(s / T) after top-k."""
    core = EngineCore(tiny_registry)
    mix = {"weights": {"base": 0.6, "small": 0.6}}
    V = tiny_registry.policies["base"].vocab_size
    probe = submit(core, make_request(core, "base", mix, "The quick", max_tokens=1, temperature=0, logprobs=V))
    run_until_done(core, [probe])
    s = full_logprobs(probe.events[0], V)
    T, k = 0.8, 8
    top = torch.topk(s / T, k)
    q = torch.softmax(top.values, -1)
    draws = 3000
    cols = []
    for i in range(0, draws, 50):
        batch = [submit(core, make_request(core, "base", mix, "The quick", max_tokens=1, temperature=T, top_k=k,
                                           seed=i + j)) for j in range(50)]
        run_until_done(core, batch)
        cols += batch
    counts = torch.zeros(k)
    index = {int(t): n for n, t in enumerate(top.indices)}
    for c in cols:
        counts[index[c.tokens()[0]]] += 1  # a token outside the top-k would raise KeyError
    chi2, p = stats.chisquare(counts.numpy(), (q * draws).numpy())
    assert p > 1e-3, (chi2, p, counts, q * draws)


def test_n_shares_prefill_and_returns_distinct_samples(core):
    col = submit(core, make_request(core, "base", None, "Hello world", max_tokens=12, temperature=1.0, n=4, seed=3,
                                    ignore_eos=True))
    core.step()  # the prefill step: one leader fed the prompt, three forks copied its cache
    assert core.runners["base"].forwards == 1
    assert len(core.runners["base"].slots) == 4
    run_until_done(core, [col])
    seqs = col.done.sequences
    assert [s.index for s in seqs] == [0, 1, 2, 3]
    assert len({tuple(s.token_ids) for s in seqs}) > 1
    assert col.done.completion_tokens == 48


def test_greedy_n_forks_match_single(core):
    one = submit(core, make_request(core, "dpo", None, "Hello", max_tokens=10, temperature=0, ignore_eos=True))
    many = submit(core, make_request(core, "dpo", None, "Hello", max_tokens=10, temperature=0, n=3, ignore_eos=True))
    run_until_done(core, [one, many])
    assert all(s.token_ids == one.done.sequences[0].token_ids for s in many.done.sequences)


def test_stop_string_is_found_and_held_back(core):
    free = submit(core, make_request(core, "base", None, "Hello world", max_tokens=30, temperature=0, ignore_eos=True))
    run_until_done(core, [free])
    text = free.done.sequences[0].text
    assert len(text) > 6
    stop = text[3:6]
    col = submit(core, make_request(core, "base", None, "Hello world", max_tokens=30, temperature=0, stop=[stop],
                                    ignore_eos=True))
    run_until_done(core, [col])
    res = col.done.sequences[0]
    assert res.finish_reason == "stop" and res.stop_reason == stop
    assert res.text == text[: text.find(stop)]
    assert "".join(e.text for e in col.events) == res.text  # streamed deltas never leaked the stop string
    inc = submit(core, make_request(core, "base", None, "Hello world", max_tokens=30, temperature=0, stop=[stop],
                                    include_stop_str_in_output=True, ignore_eos=True))
    run_until_done(core, [inc])
    assert inc.done.sequences[0].text == text[: text.find(stop) + len(stop)]


def test_stop_token_ids_max_tokens_and_min_tokens(core):
    free = submit(core, make_request(core, "base", None, "Hello", max_tokens=8, temperature=0, ignore_eos=True))
    run_until_done(core, [free])
    toks = free.done.sequences[0].token_ids
    assert free.done.sequences[0].finish_reason == "length" and len(toks) == 8
    col = submit(core, make_request(core, "base", None, "Hello", max_tokens=8, temperature=0, stop_token_ids=[toks[2]],
                                    ignore_eos=True))
    run_until_done(core, [col])
    assert col.done.sequences[0].token_ids == toks[: toks.index(toks[2]) + 1]
    assert col.done.sequences[0].stop_reason == toks[2]
    blocked = submit(core, make_request(core, "base", None, "Hello", max_tokens=8, temperature=0,
                                        stop_token_ids=[toks[0]], min_tokens=3, ignore_eos=True))
    run_until_done(core, [blocked])
    assert blocked.done.sequences[0].token_ids[0] != toks[0]
    assert len(blocked.done.sequences[0].token_ids) >= 3


def test_abort_frees_cache_at_once(core):
    keep = submit(core, make_request(core, "base", {"weights": {"base": 1, "dpo": 1}}, "Hello", max_tokens=20,
                                     temperature=0, ignore_eos=True))
    gone = make_request(core, "base", {"weights": {"base": 1, "dpo": 1}}, "Bye", max_tokens=50, n=2, ignore_eos=True)
    gone_col = submit(core, gone)
    for _ in range(3):
        core.step()
    assert len(core.runners["dpo"].slots) == 3
    core.abort(gone.request_id)
    assert len(core.runners["dpo"].slots) == 1 and len(core.runners["base"].slots) == 1
    assert core.reserved["dpo"] == core.render(keep_req := make_request(core, "base", {"weights": {"base": 1, "dpo": 1}},
                                                                           "Hello", max_tokens=20)).reserved_tokens("dpo")
    run_until_done(core, [keep])
    assert gone_col.done is None and keep.done.sequences[0].finish_reason == "length"
    assert all(v == 0 for v in core.reserved.values())
    del keep_req


def test_nan_policy_fails_only_its_request(core, tiny_registry, monkeypatch):
    runner = core.runners["small"]
    real = runner.forward

    def broken():
        lp = real()
        return torch.full_like(lp, float("nan"))

    monkeypatch.setattr(runner, "forward", broken)
    bad = submit(core, make_request(core, "small", None, "Hello", max_tokens=5, temperature=0))
    good = submit(core, make_request(core, "base", None, "Hello", max_tokens=5, temperature=0, ignore_eos=True))
    run_until_done(core, [bad, good])
    assert bad.done.error and "finite" in bad.done.error
    assert good.done.error is None and len(good.done.sequences[0].token_ids) == 5


def test_mixing_different_families_is_refused(core):
    from policymix.errors import RecipeError

    with pytest.raises(RecipeError, match="different tokenizer families"):
        make_request(core, "base", {"weights": {"base": 0.5, "other": 0.5}}, "Hello")


def test_context_too_long_names_the_numbers(core, tiny_registry):
    from policymix.errors import ContextTooLong

    limit = tiny_registry.max_model_len(0)
    with pytest.raises(ContextTooLong, match=str(limit)):
        core.render(make_request(core, "base", None, "Hello", max_tokens=limit))


def test_logprobs_are_computed_only_when_asked(core):
    """Without ``logprobs`` (or signals, or a mean-logprob rerank) the engine never normalises the mixed
    scores, as vLLM skips unrequested logprobs; with ``logprobs=0`` each token carries its logprob."""
    mix = {"weights": {"base": 1.2, "dpo": -0.2}}
    plain = submit(core, make_request(core, "base", mix, "Hello world", max_tokens=6, temperature=0, ignore_eos=True))
    asked = submit(core, make_request(core, "base", mix, "Hello world", max_tokens=6, temperature=0, ignore_eos=True,
                                      logprobs=0))
    run_until_done(core, [plain, asked])
    assert plain.tokens() == asked.tokens()
    assert all(e.logprob is None for e in plain.events)
    assert all(e.logprob is not None and e.logprob <= 0.0 for e in asked.events)

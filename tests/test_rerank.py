"""Best-of-n reranking, the implicit DPO reward, token signals and KL to the reference."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from engine_helpers import make_request, oracle_mixed_logprobs, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.protocol import ImplicitRewardSpec, RerankSpec
from policymix.errors import PolicymixError
from policymix.rerank import kl_bound


@pytest.fixture(scope="module")
def rule_registry(tiny_dir, tmp_path_factory):
    """The tiny family plus a reward model with a known rule: its score depends only on the last token.

    Zeroing every attention output and MLP output leaves the residual stream equal to the token
    embedding, so score(text) = w . RMSNorm(embed[last token]) exactly.
    """
    from transformers import AutoModelForSequenceClassification

    from policymix.config import parse_config
    from policymix.registry import load_registry

    path = tmp_path_factory.mktemp("rule") / "rule_rm"
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "rm")
    with torch.no_grad():
        for layer in rm.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    rm.save_pretrained(path)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dir / "rm").save_pretrained(path)
    cfg = parse_config({"policies": {
        "base": {"path": str(tiny_dir / "base")},
        "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1},
        "rm": {"path": str(path), "kind": "reward"},
    }, "server": {"max_best_of": 16}})
    return load_registry(cfg)


def rule_score(registry, text: str) -> float:
    rm = registry.policies["rm"]
    ids = rm.tokenizer(text).input_ids
    with torch.no_grad():
        h = rm.model.model.norm(rm.model.model.embed_tokens.weight[ids[-1]][None, None])
        return float(rm.model.score(h)[0, 0, 0])


def test_reward_model_best_of_returns_the_argmax(rule_registry):
    core = EngineCore(rule_registry)
    cols = [submit(core, make_request(core, "base", None, f"Prompt {i}", max_tokens=6, temperature=1.0, best_of=6,
                                      seed=i, ignore_eos=True, rerank=RerankSpec("reward_model", reward_model="rm")))
            for i in range(4)]
    run_until_done(core, cols)
    for i, col in enumerate(cols):
        cands = col.done.candidates
        assert len(cands) == 6
        for c in cands:
            assert c.score == pytest.approx(rule_score(rule_registry, f"Prompt {i}" + c.text), abs=1e-4)
        best = max(cands, key=lambda c: c.score)
        assert col.done.sequences[0].text == best.text
        assert "".join(e.text for e in col.events) == best.text  # the winner is what streams
        assert col.done.kl_bound == pytest.approx(math.log(6) - 5 / 6)


def test_winner_reward_rises_with_n(rule_registry):
    core = EngineCore(rule_registry)
    means = {}
    for n in (1, 2, 4, 8):
        cols = [submit(core, make_request(core, "base", None, f"Question {i}?", max_tokens=4, temperature=1.0,
                                          best_of=n if n > 1 else None, seed=100 + i, ignore_eos=True,
                                          rerank=RerankSpec("reward_model", reward_model="rm")))
                for i in range(12)]
        run_until_done(core, cols)
        means[n] = sum(rule_score(rule_registry, f"Question {i}?" + c.done.sequences[0].text)
                       for i, c in enumerate(cols)) / len(cols)
    assert means[1] <= means[2] <= means[4] <= means[8] and means[8] > means[1], means


def test_n_of_best_of_returns_the_top_k(rule_registry):
    core = EngineCore(rule_registry)
    col = submit(core, make_request(core, "base", None, "Hello", max_tokens=5, temperature=1.0, n=2, best_of=5, seed=9,
                                    ignore_eos=True, rerank=RerankSpec("reward_model", reward_model="rm")))
    run_until_done(core, [col])
    top = sorted(col.done.candidates, key=lambda c: -c.score)[:2]
    assert [s.text for s in col.done.sequences] == [c.text for c in top]
    assert {e.index for e in col.events} == {0, 1}


def test_implicit_reward_matches_independent_forwards(rule_registry):
    core = EngineCore(rule_registry)
    spec = ImplicitRewardSpec("dpo", "base", 0.1)
    col = submit(core, make_request(core, "base", {"weights": {"base": 0.5, "dpo": 0.5}}, "Hello world", max_tokens=10,
                                    temperature=1.0, best_of=3, seed=5, ignore_eos=True,
                                    rerank=RerankSpec("implicit", implicit=spec)))
    run_until_done(core, [col])
    pols = rule_registry.policies
    prompt = pols["base"].tokenizer("Hello world").input_ids
    for cand in col.done.candidates:
        ids = torch.tensor([prompt + cand.token_ids])
        total = 0.0
        with torch.no_grad():
            for name, sign in (("dpo", 1), ("base", -1)):
                lp = torch.log_softmax(pols[name].model(input_ids=ids).logits[0, :, : pols[name].vocab_size].float(), -1)
                total += sign * sum(float(lp[len(prompt) - 1 + t, tok]) for t, tok in enumerate(cand.token_ids))
        assert cand.score == pytest.approx(0.1 * total, abs=1e-4)


def test_token_signals_sum_and_kl_zero_for_the_reference(rule_registry):
    core = EngineCore(rule_registry)
    col = submit(core, make_request(core, "base", None, "Hello", max_tokens=8, temperature=0, ignore_eos=True,
                                    return_token_signals=True, signals=ImplicitRewardSpec("dpo", "base", 0.1)))
    run_until_done(core, [col])
    assert all(abs(e.kl) < 1e-6 for e in col.events)
    seq = col.done.sequences[0]
    assert seq.implicit_reward == pytest.approx(sum(e.implicit_reward for e in col.events))
    for e in col.events:
        assert e.implicit_reward == pytest.approx(0.1 * (e.policy_logprobs["dpo"] - e.policy_logprobs["base"]), abs=1e-6)


def test_kl_grows_monotonically_with_dera_scale(rule_registry):
    core = EngineCore(rule_registry)
    kls = []
    for lam in [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]:
        col = submit(core, make_request(core, "base", {"weights": {"dpo": lam, "base": 1 - lam}} if lam else None,
                                        "Paris is", max_tokens=1, temperature=0, return_token_signals=True,
                                        signals=ImplicitRewardSpec("dpo", "base", 0.1)))
        run_until_done(core, [col])
        kls.append(col.events[0].kl)
    assert kls[0] < 1e-6
    assert all(a < b for a, b in zip(kls, kls[1:])), kls


def test_best_of_distribution_matches_the_exact_formula(rule_registry):
    """On an enumerable space (top-3 tokens, 2 new tokens: 9 sequences), the winners of best-of-4 with the
    implicit reward follow P(y) = F(r(y))^N - F(r(y)-)^N; that distribution's KL to the policy is below
    log N - (N-1)/N."""
    reg = rule_registry
    N, k, beta = 4, 3, 1.0
    prompt = "The quick"
    base_prompt = reg.policies["base"].tokenizer(prompt).input_ids
    prompts = {"base": base_prompt, "dpo": base_prompt}
    seqs, probs, rewards = [], [], []
    first = oracle_mixed_logprobs(reg, {"base": 1.0}, prompts, [])
    top1 = torch.topk(first, k)
    p1 = torch.softmax(top1.values, -1)
    for a, pa in zip(top1.indices.tolist(), p1.tolist()):
        second = oracle_mixed_logprobs(reg, {"base": 1.0}, prompts, [a])
        top2 = torch.topk(second, k)
        p2 = torch.softmax(top2.values, -1)
        for b, pb in zip(top2.indices.tolist(), p2.tolist()):
            seqs.append((a, b))
            probs.append(pa * pb)
            r = 0.0
            for t, tok in enumerate((a, b)):
                out = [a] if t else []
                r += (oracle_mixed_logprobs(reg, {"dpo": 1.0}, prompts, out)[tok]
                      - oracle_mixed_logprobs(reg, {"base": 1.0}, prompts, out)[tok]).item()
            rewards.append(beta * r)
    order = sorted(range(len(seqs)), key=lambda i: rewards[i])
    assert len({round(r, 6) for r in rewards}) == len(rewards)  # distinct rewards
    exact, cdf = {}, 0.0
    for i in order:
        exact[seqs[i]] = (cdf + probs[i]) ** N - cdf ** N
        cdf += probs[i]
    kl = sum(q * math.log(q / probs[seqs.index(y)]) for y, q in exact.items() if q > 0)
    assert kl <= kl_bound(N) + 1e-9

    core = EngineCore(reg)
    draws = 1200
    counts = dict.fromkeys(exact, 0)
    spec = RerankSpec("implicit", implicit=ImplicitRewardSpec("dpo", "base", beta))
    for start in range(0, draws, 8):
        cols = [submit(core, make_request(core, "base", None, prompt, max_tokens=2, temperature=1.0, top_k=k,
                                          best_of=N, seed=10_000 + start + j, ignore_eos=True, rerank=spec))
                for j in range(8)]
        run_until_done(core, cols)
        for c in cols:
            counts[tuple(c.done.sequences[0].token_ids)] += 1
    keys = [y for y in exact if exact[y] * draws >= 5]
    other = draws - sum(counts[y] for y in keys)
    obs = [counts[y] for y in keys] + [other]
    exp = [exact[y] * draws for y in keys] + [draws - sum(exact[y] * draws for y in keys)]
    if exp[-1] < 1e-9:
        obs, exp = obs[:-1], exp[:-1]
    _, p = stats.chisquare(obs, exp)
    assert p > 1e-3, (obs, exp)


@pytest.mark.parametrize("kwargs, param", [
    ({"rerank": RerankSpec("reward_model", reward_model="ghost"), "best_of": 2}, "rerank.reward_model"),
    ({"rerank": RerankSpec("reward_model", reward_model="dpo"), "best_of": 2}, "rerank.reward_model"),
    ({"rerank": RerankSpec("implicit", implicit=ImplicitRewardSpec("dpo", "base", 0.0)), "best_of": 2},
     "rerank.implicit.beta"),
    ({"best_of": 17}, "best_of"),
    ({"best_of": 2, "n": 3}, "best_of"),
])
def test_bad_rerank_input_names_the_field(rule_registry, kwargs, param):
    core = EngineCore(rule_registry)
    running = submit(core, make_request(core, "base", None, "Hi", max_tokens=4, temperature=1.0, ignore_eos=True))
    with pytest.raises(PolicymixError) as err:
        core.render(make_request(core, "base", None, "Hello", max_tokens=4, temperature=1.0, **kwargs))
    assert err.value.param == param and err.value.status == 400
    run_until_done(core, [running])  # nothing else disturbed
    assert len(running.done.sequences[0].token_ids) == 4


def test_best_of_with_greedy_is_refused(rule_registry):
    core = EngineCore(rule_registry)
    with pytest.raises(PolicymixError, match="temperature 0"):
        core.render(make_request(core, "base", None, "Hello", max_tokens=4, temperature=0, best_of=3))

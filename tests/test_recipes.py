"""Recipe algebra: every form compiles to the weights of the design's table; bad recipes name the field."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from engine_helpers import make_request, oracle_mixed_logprobs, run_until_done, submit
from policymix.config import Recipe
from policymix.engine.core import EngineCore
from policymix.errors import ModelNotFound, RecipeError
from policymix.mixing.recipes import PolicyInfo, compile_recipe

INFOS = {
    "base": PolicyInfo("base", "causal", 0),
    "dpo": PolicyInfo("dpo", "causal", 0, reference="base", beta=0.1),
    "p2": PolicyInfo("p2", "causal", 0, reference="base", beta=0.1),
    "small": PolicyInfo("small", "causal", 0),
    "small_tuned": PolicyInfo("small_tuned", "causal", 0),
    "rm": PolicyInfo("rm", "reward", 0),
    "other": PolicyInfo("other", "causal", 1),
}
MIXTURES = {"soft": Recipe(reference="base", policy="dpo", beta=0.1, beta_prime=0.2)}


def comp(recipe, model="base"):
    return compile_recipe(recipe, model, INFOS, MIXTURES)


def test_explicit_weights_as_given():
    assert comp({"weights": {"dpo": 0.7, "base": 0.3}}).weights == {"dpo": 0.7, "base": 0.3}


def test_single_policy_is_weight_one():
    c = comp(None, "dpo")
    assert c.weights == {"dpo": 1.0} and c.form == "single"


def test_mod_weights():
    c = comp({"reference": "base", "objectives": {"dpo": 0.3, "p2": 0.5}})
    assert c.weights == pytest.approx({"dpo": 0.3, "p2": 0.5, "base": 0.2})
    # objectives summing to 1 leave the reference at weight 0 (MOD's pure combination)
    c = comp({"reference": "base", "objectives": {"dpo": 0.4, "p2": 0.6}})
    assert c.weights["base"] == pytest.approx(0.0) and "base" not in {k for k, v in c.active.items() if abs(v) > 1e-12}


def test_dera_weights_and_beta_from_metadata():
    c = comp({"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.05})
    assert c.weights == pytest.approx({"dpo": 2.0, "base": -1.0})
    c = comp({"policy": "dpo", "beta_prime": 0.2})  # beta and reference from the registered policy
    assert c.weights == pytest.approx({"dpo": 0.5, "base": 0.5}) and c.reference == "base"
    c = comp({"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.1})
    assert c.weights == pytest.approx({"dpo": 1.0, "base": 0.0})


def test_mod_with_beta_prime():
    c = comp({"reference": "base", "objectives": {"dpo": 0.3, "p2": 0.2}, "beta": 0.1, "beta_prime": 0.05})
    assert c.weights == pytest.approx({"dpo": 0.6, "p2": 0.4, "base": 0.0})


def test_proxy_tuning_weights():
    c = comp({"proxy": {"base": "base", "tuned": "small_tuned", "untuned": "small", "alpha": 0.8}})
    assert c.weights == pytest.approx({"base": 1.0, "small_tuned": 0.8, "small": -0.8})
    c = comp({"proxy": {"base": "base", "tuned": "small", "untuned": "small"}})
    assert c.weights == pytest.approx({"base": 1.0, "small": 0.0}) and c.active == {"base": 1.0}


def test_named_mixture_by_model_and_by_field():
    assert comp(None, "soft").weights == pytest.approx({"dpo": 0.5, "base": 0.5})
    assert comp("soft").mixture_name == "soft"


@pytest.mark.parametrize("recipe, field", [
    ({"weights": {"dpo": float("nan")}}, "mixture.weights.dpo"),
    ({"weights": {"dpo": float("inf")}}, "mixture.weights.dpo"),
    ({"weights": {"dpo": 0.0, "base": 0.0}}, "mixture"),
    ({"weights": {"nope": 1.0}}, "mixture"),
    ({"weights": {"rm": 1.0}}, "mixture"),
    ({"weights": {"base": 0.5, "other": 0.5}}, "mixture"),
    ({"reference": "base", "policy": "dpo", "beta": 0.0, "beta_prime": 0.1}, "mixture.beta"),
    ({"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": -1}, "mixture.beta_prime"),
    ({"reference": "base", "policy": "dpo", "beta": 0.1}, "mixture.beta_prime"),
    ({"reference": "base", "objectives": {"dpo": 0.5}, "beta": 0.1}, "mixture.beta_prime"),
    ({"weights": {"dpo": 1.0}, "beta": 0.1}, "mixture.beta"),
    ({"weights": {"dpo": 1.0}, "policy": "dpo"}, "mixture"),
    ({"proxy": {"base": "base", "tuned": "dpo", "untuned": "small", "alpha": float("nan")}}, "mixture.proxy.alpha"),
    ({}, "mixture"),
    ({"weights": {"dpo": "heavy"}}, "mixture.weights.dpo"),
    ("nonexistent-mixture", "mixture"),
    (["not", "a", "recipe"], "mixture"),
])
def test_bad_recipes_name_the_field(recipe, field):
    with pytest.raises(RecipeError) as err:
        comp(recipe)
    assert err.value.param == field and err.value.status == 400


def test_unknown_model_is_404():
    with pytest.raises(ModelNotFound) as err:
        comp(None, "gpt-99")
    assert err.value.status == 404


def test_reward_model_cannot_generate():
    with pytest.raises(RecipeError):
        comp(None, "rm")


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(st.sampled_from(list(INFOS)), st.floats(allow_nan=True, allow_infinity=True), max_size=4))
def test_any_weights_compile_or_raise_recipe_error(weights):
    try:
        c = comp({"weights": weights})
    except RecipeError:
        return
    assert all(math.isfinite(w) for w in c.weights.values()) and any(w != 0 for w in c.weights.values())


# ----- the algebra on real (tiny) policies, through the engine ---------------------------------

def _greedy(core, mixture, prompt="Hello world", n=12):
    col = submit(core, make_request(core, "base", mixture, prompt, max_tokens=n, temperature=0, ignore_eos=True,
                                    logprobs=5))
    run_until_done(core, [col])
    return col


def test_dera_with_beta_prime_equal_beta_is_the_policy(tiny_registry):
    core = EngineCore(tiny_registry)
    alone = _greedy(core, {"weights": {"dpo": 1.0}})
    dera = _greedy(core, {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.1})
    assert alone.tokens() == dera.tokens()
    for a, b in zip(alone.events, dera.events):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-5)


def test_proxy_with_tuned_equal_untuned_is_the_base(tiny_registry):
    core = EngineCore(tiny_registry)
    base = _greedy(core, {"weights": {"base": 1.0}})
    proxy = _greedy(core, {"proxy": {"base": "base", "tuned": "small", "untuned": "small", "alpha": 2.0}})
    assert base.tokens() == proxy.tokens()


def test_mod_summing_to_one_matches_oracle(tiny_registry):
    core = EngineCore(tiny_registry)
    recipe = {"reference": "base", "objectives": {"dpo": 0.25, "safe": 0.75}}
    col = _greedy(core, recipe, n=6)
    state = core.render(make_request(core, "base", recipe, "Hello world"))
    assert state.weights == pytest.approx({"dpo": 0.25, "safe": 0.75})
    out = []
    for ev in col.events:
        expect = oracle_mixed_logprobs(tiny_registry, state.weights, state.prompts, out)
        assert ev.token_id == int(torch.argmax(expect))
        assert ev.logprob == pytest.approx(float(expect[ev.token_id]), abs=1e-4)
        out.append(ev.token_id)

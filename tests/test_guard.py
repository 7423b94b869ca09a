"""The mixing guard refuses inversions of protected policies and out-of-bound recipes."""

from __future__ import annotations

import pytest

from policymix.config import GuardSpec
from policymix.errors import GuardRefusal
from policymix.mixing.guard import check_recipe
from policymix.mixing.recipes import PolicyInfo, compile_recipe

INFOS = {
    "base": PolicyInfo("base", "causal", 0),
    "safe": PolicyInfo("safe", "causal", 0, reference="base", beta=0.1, protected=True, floor=0.0),
    "strong": PolicyInfo("strong", "causal", 0),
    "small": PolicyInfo("small", "causal", 0),
    "careful": PolicyInfo("careful", "causal", 0, reference="base", beta=0.1, protected=True, floor=0.5),
}
GUARD = GuardSpec()


def comp(recipe):
    return compile_recipe(recipe, "base", INFOS, {})


def test_weak_to_strong_jailbreak_is_refused_without_permission():
    # pi_strong * pi_ref / pi_safe: the reference above 1, the protected policy negative
    jailbreak = comp({"weights": {"strong": 1.0, "base": 1.0, "safe": -1.0}})
    with pytest.raises(GuardRefusal, match="protected floor") as err:
        check_recipe(jailbreak, INFOS, GUARD)
    assert err.value.status == 403
    check_recipe(jailbreak, INFOS, GUARD, allow_inversion=True)  # a key allowed to invert passes


def test_dera_past_the_reference_inverts_and_is_refused():
    # beta/beta' negative is impossible, but MOD with a negative objective on a protected policy is caught
    with pytest.raises(GuardRefusal):
        check_recipe(comp({"reference": "base", "objectives": {"safe": -0.5}}), INFOS, GUARD)


def test_recipes_that_respect_floors_are_served():
    check_recipe(comp({"proxy": {"base": "strong", "tuned": "safe", "untuned": "base", "alpha": 1.0}}), INFOS, GUARD)
    check_recipe(comp({"reference": "base", "policy": "safe", "beta": 0.1, "beta_prime": 0.05}), INFOS, GUARD)
    check_recipe(comp({"weights": {"careful": 0.5, "base": 0.5}}), INFOS, GUARD)
    with pytest.raises(GuardRefusal, match="floor 0.5"):
        check_recipe(comp({"weights": {"careful": 0.4, "base": 0.6}}), INFOS, GUARD)


@pytest.mark.parametrize("recipe, rule", [
    ({"weights": {"base": 9.0}}, "weight bound"),
    ({"weights": {"base": 7.0, "small": -7.0, "strong": 3.0}}, "total weight bound"),
    ({"reference": "base", "policy": "strong", "beta": 0.1, "beta_prime": 1e-5}, "beta bounds"),
])
def test_bounds_apply_to_everyone(recipe, rule):
    with pytest.raises(GuardRefusal, match=rule):
        check_recipe(comp(recipe), INFOS, GUARD, allow_inversion=True)


PROMPTED = {**INFOS, "guarded": PolicyInfo("guarded", "causal", 0, reference="base", beta=None, protected=True,
                                           prompted=True)}


def test_an_implicit_reward_scorer_with_a_protected_reference_is_an_inversion():
    from policymix.request_types import ImplicitRewardSpec

    plain = comp({"weights": {"base": 1.0}})
    with pytest.raises(GuardRefusal, match="coefficient -1 < 0") as err:
        check_recipe(plain, INFOS, GUARD, scorers=[("rerank.implicit", ImplicitRewardSpec("base", "safe", 1.0))])
    assert err.value.param == "rerank.implicit"
    check_recipe(plain, INFOS, GUARD, scorers=[("rerank.implicit", ImplicitRewardSpec("safe", "base", 1.0))])
    check_recipe(plain, INFOS, GUARD, scorers=[("rerank.implicit", ImplicitRewardSpec("safe", "safe", 1.0))])  # 0
    check_recipe(plain, INFOS, GUARD, allow_inversion=True,
                 scorers=[("search.scorer.implicit", ImplicitRewardSpec("base", "safe", 1.0))])


@pytest.mark.parametrize("recipe, refused", [
    ({"weights": {"guarded": 1.0, "v": 0.3}, "prompt_variants": {"v": {"policy": "guarded", "system_prompt": "x"}}},
     True),
    ({"weights": {"guarded": 1.0, "v": -0.3}, "prompt_variants": {"v": {"policy": "guarded", "system_prompt": "x"}}},
     False),
    ({"weights": {"guarded": 1.0, "v": 0.3}, "prompt_variants": {"v": {"policy": "guarded", "prompt": "other"}}},
     False),  # a prompt variant is rendered with the policy's own system prompt
    ({"context_aware": {"policy": "guarded", "alpha": -0.5, "drop": "system"}}, True),
    ({"context_aware": {"policy": "guarded", "alpha": -0.5, "drop": "context"}}, True),
    ({"context_aware": {"policy": "guarded", "alpha": 1.0, "drop": "system"}}, False),
    ({"guidance": {"policy": "guarded", "scale": 0.5}}, True),  # halfway to the unconditional context
    ({"guidance": {"policy": "guarded", "scale": 1.5}}, False),
    ({"guidance": {"policy": "guarded", "scale": 0.5, "negative_prompt": "rude"}}, False),  # keeps its prompt
])
def test_a_prompted_protected_policy_keeps_its_system_prompt(recipe, refused):
    compiled = compile_recipe(recipe, "guarded", PROMPTED, {})
    if refused:
        with pytest.raises(GuardRefusal, match="protected by its system prompt"):
            check_recipe(compiled, PROMPTED, GUARD)
        check_recipe(compiled, PROMPTED, GUARD, allow_inversion=True)
    else:
        check_recipe(compiled, PROMPTED, GUARD)


def test_a_protected_policy_without_a_system_prompt_may_have_variants():
    # its safety is in its weights: a variant of it under another system prompt still carries that tuning
    compiled = comp({"weights": {"safe": 1.0, "v": 0.5}, "prompt_variants": {"v": {"policy": "safe",
                                                                                   "system_prompt": "x"}}})
    check_recipe(compiled, INFOS, GUARD)

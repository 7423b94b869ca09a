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

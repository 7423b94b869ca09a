"""The mixing guard: refuse recipes that invert a safety-tuned ("protected") policy.

Why: log-linear mixing is also the weak-to-strong jailbreak (arXiv 2401.17256). With a safe policy
P tuned from reference R, the recipe ``pi_R^(1+a) * pi_P^(-a)`` (weights R: 1 + a, P: -a) is
``pi_R * exp(-a * log(pi_P / pi_R))``: it *subtracts* P's implicit reward, steering away from what
P learned to prefer. In any recipe the coefficient on ``log(pi_P / pi_R)`` is P's weight, so:

1. floor rule: a protected policy's weight must be >= its ``floor`` (default 0) whenever the recipe
   uses it. Only an API key with ``allow_inversion`` passes this rule.
2. bounds (everyone): |w_k| <= max_abs_weight, sum_k |w_k| <= max_sum_abs_weight (large opposite
   weights amplify the difference between two policies without limit), and every beta / beta_prime
   in [min_beta, max_beta] (DeRa with a tiny beta_prime scales the tuned policy's weight by b/b2).
"""

from __future__ import annotations

import logging
from typing import Mapping

from ..config import GuardSpec
from ..errors import GuardRefusal
from .recipes import CompiledRecipe, PolicyInfo

log = logging.getLogger("policymix.guard")


def check_recipe(recipe: CompiledRecipe, policies: Mapping[str, PolicyInfo], guard: GuardSpec,
                 allow_inversion: bool = False, who: str = "anonymous") -> None:
    """Raise GuardRefusal (403) naming the rule when ``recipe`` breaks one."""
    for b in recipe.betas:
        if not guard.min_beta <= b <= guard.max_beta:
            _refuse(f"beta/beta_prime {b} is outside the allowed range [{guard.min_beta}, {guard.max_beta}] "
                    "(guard rule: beta bounds)", who, recipe)
    for name, w in recipe.weights.items():
        if abs(w) > guard.max_abs_weight:
            _refuse(f"weight {w:g} on {name!r} exceeds the bound |w| <= {guard.max_abs_weight:g} "
                    "(guard rule: weight bound)", who, recipe)
    total = sum(abs(w) for w in recipe.weights.values())
    if total > guard.max_sum_abs_weight:
        _refuse(f"the sum of |weights| {total:g} exceeds {guard.max_sum_abs_weight:g} (guard rule: total weight bound)",
                who, recipe)
    if allow_inversion:
        return
    totals: dict[str, float] = {}  # a prompt variant counts as its policy: the sum must stay >= the floor
    for name, w in recipe.weights.items():
        policy = recipe.policy_of(name)
        totals[policy] = totals.get(policy, 0.0) + w
    for name, w in totals.items():
        info = policies.get(name)
        if info is not None and info.protected and w < info.floor:
            _refuse(
                f"policy {name!r} is protected: its weight {w:g} (its prompt variants included) is below its floor "
                f"{info.floor:g}. A weight below "
                f"the floor subtracts its safety tuning (pi_ref * (pi_ref / pi_{name})^a, the weak-to-strong "
                "jailbreak); this key is not allowed to invert protected policies (guard rule: protected floor)",
                who, recipe)


def _refuse(message: str, who: str, recipe: CompiledRecipe) -> None:
    # no prompt text in logs: only who, the rule and the weights
    log.warning("mixing guard refused a recipe", extra={"key": who, "weights": recipe.weights, "rule": message})
    raise GuardRefusal(message, param="mixture")

"""The mixing guard: refuse recipes that invert a safety-tuned ("protected") policy.

Why: log-linear mixing is also the weak-to-strong jailbreak (arXiv 2401.17256). With a safe policy
P tuned from reference R, the recipe ``pi_R^(1+a) * pi_P^(-a)`` (weights R: 1 + a, P: -a) is
``pi_R * exp(-a * log(pi_P / pi_R))``: it *subtracts* P's implicit reward, steering away from what
P learned to prefer. In any recipe the coefficient on ``log(pi_P / pi_R)`` is P's weight, so:

1. floor rule: a protected policy's weight must be >= its ``floor`` (default 0) whenever the recipe
   uses it. Only an API key with ``allow_inversion`` passes this rule. The same arithmetic selects
   text in two more places, checked with it:
   - scorers: an implicit reward ``beta * (log pi_policy - log pi_reference)`` that ranks best-of
     candidates, prunes them or steers a beam search puts ``-beta`` on its reference; a protected
     reference (a negative coefficient on its log-probability) ranks the least safe text first;
   - a prompted protected policy's safety is its system prompt: a prompt variant that replaces or
     drops it is the policy without its safety, so it may only be subtracted (CFG or context-aware
     decoding that amplify the prompt); with a positive weight it inverts (context-aware decoding
     with a negative alpha subtracts the prompted distribution from the unprompted one).
2. bounds (everyone): |w_k| <= max_abs_weight, sum_k |w_k| <= max_sum_abs_weight (large opposite
   weights amplify the difference between two policies without limit), and every beta / beta_prime
   in [min_beta, max_beta] (DeRa with a tiny beta_prime scales the tuned policy's weight by b/b2).
"""

from __future__ import annotations

import logging
from typing import Mapping, Sequence

from ..config import GuardSpec
from ..errors import GuardRefusal
from ..request_types import ImplicitRewardSpec
from .recipes import WITHOUT_SYSTEM_PROMPT, CompiledRecipe, PolicyInfo

log = logging.getLogger("policymix.guard")

_CANNOT = "this key is not allowed to invert protected policies (guard rule: protected floor)"


def check_recipe(recipe: CompiledRecipe, policies: Mapping[str, PolicyInfo], guard: GuardSpec,
                 allow_inversion: bool = False, who: str = "anonymous",
                 scorers: Sequence[tuple[str, ImplicitRewardSpec]] = ()) -> None:
    """Raise GuardRefusal (403) naming the rule when ``recipe`` breaks one; ``scorers`` are the implicit
    rewards that select among the request's texts, each with the request field that set it."""
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
                f"jailbreak); {_CANNOT}", who, recipe)
    for name, w in recipe.weights.items():
        v = recipe.variants.get(name)
        info = policies.get(v.policy) if v is not None else None
        if info is not None and info.protected and info.prompted and v.source in WITHOUT_SYSTEM_PROMPT and w > 0:
            _refuse(f"{v.origin}: policy {v.policy!r} is protected by its system prompt, and the variant {name!r} "
                    f"({v.source}) renders it without that prompt at weight {w:g} > 0: it adds the policy without its "
                    f"safety prompt (such a variant may only be subtracted, as CFG and context-aware decoding with "
                    f"alpha > 0 do); {_CANNOT}", who, recipe, param=v.origin)
    for field, spec in scorers:
        coef = {spec.policy: spec.beta}
        coef[spec.reference] = coef.get(spec.reference, 0.0) - spec.beta
        for name, c in coef.items():
            info = policies.get(name)
            if info is not None and info.protected and c < 0:
                _refuse(f"{field}: policy {name!r} is protected and the implicit reward beta * (log pi_{spec.policy} "
                        f"- log pi_{spec.reference}) gives its log-probability the coefficient {c:g} < 0: ranking by it "
                        f"prefers what {name!r} learned to avoid (the weak-to-strong jailbreak as a scorer); {_CANNOT}",
                        who, recipe, param=field)


def _refuse(message: str, who: str, recipe: CompiledRecipe, param: str = "mixture") -> None:
    # no prompt text in logs: only who, the rule and the weights
    log.warning("mixing guard refused a recipe", extra={"key": who, "weights": recipe.weights, "rule": message})
    raise GuardRefusal(message, param=param)

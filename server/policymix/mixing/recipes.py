"""Compile a mixing recipe into a weight vector over registered policies.

Every recipe is a log-linear mixture: the next-token score is ``s = sum_k w_k * log pi_k``.

| recipe                | weights                                                         |
|-----------------------|-----------------------------------------------------------------|
| weights               | as given                                                        |
| MOD                   | P_i: w_i, R: 1 - sum w_i                                        |
| DeRa                  | P: b/b2, R: 1 - b/b2          (pi ∝ pi_ref · exp(r / b2))       |
| MOD + beta'           | P_i: w_i·b/b2, R: 1 - sum w_i·b/b2                              |
| proxy tuning          | L: 1, S+: a, S-: -a                                             |
| guidance (CFG)        | P: g, P[neg]: 1 - g           (P[neg]: P under the negative prompt) |
| context-aware         | P: 1 + a, P[-context]: -a     (P[-context]: P without the context)  |
| GenARM (arm)          | B: 1, A_i: w_i / b            (A_i: autoregressive reward models)   |

``prompt_variants`` name served policies under other contexts (a variant runs its policy's weights
with its own cache rows, for one request); variant names stand in ``weights``, ``objectives`` and
``proxy`` like policies. The guard and API-key scopes see a variant as its policy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Any, Mapping

from pydantic import ValidationError

from ..config import Recipe
from ..errors import ModelNotFound, RecipeError, field_path


@dataclass(frozen=True)
class PolicyInfo:
    """What recipe compilation needs to know of a registered policy."""

    name: str
    kind: str  # "causal" | "reward"
    family: int  # tokenizer family id: policies mix only within one
    reference: str | None = None
    beta: float | None = None
    protected: bool = False
    floor: float = 0.0
    prompted: bool = False  # it carries a system prompt of its own (a prompted policy)


# variant sources that render the policy without its own system prompt (replaced, dropped, or no context)
WITHOUT_SYSTEM_PROMPT = ("system_prompt", "drop_system", "drop_context", "unconditional")


@dataclass(frozen=True)
class Variant:
    """A served policy under another context, for one request."""

    policy: str
    source: str  # "prompt" | "messages" | "system_prompt" | "negative" | "unconditional" | "drop_system" | "drop_context"
    value: Any = None  # the text, token ids or messages (rendered by the engine; never echoed)
    origin: str = "mixture.prompt_variants"  # the request field that defined it (named in errors)

    def describe(self) -> dict[str, Any]:
        """What the response echoes: the policy, the source and its length, not its text."""
        v = self.value
        if isinstance(v, str):
            length = {"chars": len(v)}
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            length = {"messages": len(v), "chars": sum(len(str(m.get("content") or "")) for m in v)}
        elif isinstance(v, list):
            length = {"tokens": len(v)}
        else:
            length = {}
        return {"policy": self.policy, "source": self.source, **length}


@dataclass(frozen=True)
class CompiledRecipe:
    weights: dict[str, float]  # every policy the recipe names, zeros included (echoed to clients)
    family: int
    form: str  # "single" | "weights" | "mod" | "dera" | "proxy" | "guidance" | "context_aware" | "arm"
    mixture_name: str | None = None
    reference: str | None = None  # MOD / DeRa: the reference the recipe is relative to
    tuned: str | None = None  # DeRa: the tuned policy; MOD: the first objective
    betas: tuple[float, ...] = ()  # beta / beta_prime values the recipe used (guard bounds)
    variants: Mapping[str, Variant] = field(default_factory=dict)  # names in ``weights`` that are variants

    @property
    def active(self) -> dict[str, float]:
        """Policies (and variants) that contribute to the score (weight != 0)."""
        return {k: w for k, w in self.weights.items() if w != 0.0}

    def policy_of(self, name: str) -> str:
        """The served policy behind a name of ``weights`` (a variant's policy, else the name itself)."""
        v = self.variants.get(name)
        return v.policy if v is not None else name


def _finite(value: float, field: str) -> float:
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"{field} must be a number", param=field)
    if not math.isfinite(value):
        raise RecipeError(f"{field} must be finite, got {value}", param=field)
    return float(value)


def _positive(value: float | None, field: str) -> float:
    if value is None:
        raise RecipeError(f"{field} is required for this recipe", param=field)
    value = _finite(value, field)
    if value <= 0:
        raise RecipeError(f"{field} must be > 0, got {value}", param=field)
    return value


def _form_of(r: Recipe) -> str:
    forms = []
    if r.weights is not None:
        forms.append("weights")
    if r.proxy is not None:
        forms.append("proxy")
    if r.objectives is not None:
        forms.append("mod")
    elif r.policy is not None:
        forms.append("dera")
    if r.guidance is not None:
        forms.append("guidance")
    if r.context_aware is not None:
        forms.append("context_aware")
    if r.arm is not None:
        forms.append("arm")
    if len(forms) != 1:
        raise RecipeError(
            "a mixture needs exactly one of: weights, objectives (+ reference), "
            "policy + beta_prime (+ reference), proxy, guidance, context_aware, arm",
            param="mixture",
        )
    form = forms[0]
    others = ("reference", "policy", "objectives", "beta", "beta_prime")
    stray = {"weights": others, "proxy": others, "guidance": others, "context_aware": others, "arm": others,
             "mod": ("policy",), "dera": ()}[form]
    for name in stray:
        if getattr(r, name) is not None:
            article = "an" if form[0] in "aeiou" else "a"
            raise RecipeError(f"mixture.{name} does not belong to {article} {form} recipe", param=f"mixture.{name}")
    return form


def _compile_form(r: Recipe, form: str, policies: Mapping[str, PolicyInfo]) -> dict[str, float]:
    w: dict[str, float] = {}

    def add(name: str, value: float) -> None:
        w[name] = w.get(name, 0.0) + value

    if form == "weights":
        if not r.weights:
            raise RecipeError("mixture.weights must name at least one policy", param="mixture.weights")
        for name, value in r.weights.items():
            add(name, _finite(value, f"mixture.weights.{name}"))
    elif form == "proxy":
        p = r.proxy
        alpha = _finite(p.alpha, "mixture.proxy.alpha")
        add(p.base, 1.0)
        add(p.tuned, alpha)
        add(p.untuned, -alpha)
    elif form == "guidance":
        g = r.guidance
        scale = _finite(g.scale, "mixture.guidance.scale")
        add(g.policy, scale)
        add(f"{g.policy}[neg]", 1.0 - scale)
    elif form == "context_aware":
        c = r.context_aware
        alpha = _finite(c.alpha, "mixture.context_aware.alpha")
        add(c.policy, 1.0 + alpha)
        add(f"{c.policy}[-{c.drop}]", -alpha)
    elif form == "arm":
        a = r.arm
        beta = _positive(a.beta, "mixture.arm.beta")
        _served_policy(a.base, policies, "mixture.arm.base")
        if not a.arms:
            raise RecipeError("mixture.arm.arms must name at least one autoregressive reward model",
                              param="mixture.arm.arms")
        add(a.base, 1.0)
        for name, value in a.arms.items():
            _served_policy(name, policies, f"mixture.arm.arms.{name}")
            add(name, _finite(value, f"mixture.arm.arms.{name}") / beta)
    elif form == "mod":
        ref = _reference(r, policies)
        if not r.objectives:
            raise RecipeError("mixture.objectives must name at least one policy", param="mixture.objectives")
        scale = 1.0
        if r.beta is not None or r.beta_prime is not None:
            scale = _positive(r.beta, "mixture.beta") / _positive(r.beta_prime, "mixture.beta_prime")
        total = 0.0
        for name, value in r.objectives.items():
            wi = _finite(value, f"mixture.objectives.{name}") * scale
            add(name, wi)
            total += wi
        add(ref, 1.0 - total)
    else:  # dera
        ref = _reference(r, policies)
        beta = r.beta
        if beta is None and r.policy in policies:
            beta = policies[r.policy].beta  # the beta recorded with the trained policy
        scale = _positive(beta, "mixture.beta") / _positive(r.beta_prime, "mixture.beta_prime")
        add(r.policy, scale)
        add(ref, 1.0 - scale)
    return w


def _reference(r: Recipe, policies: Mapping[str, PolicyInfo]) -> str:
    if r.reference is not None:
        return r.reference
    # Default to the reference that the (first) tuned policy was registered with.
    first = r.policy if r.policy is not None else next(iter(r.objectives or {}), None)
    if first in policies and policies[first].reference is not None:
        return policies[first].reference
    raise RecipeError("mixture.reference is required (the policy has no registered reference)",
                      param="mixture.reference")


def compile_recipe(
    recipe: Recipe | Mapping | str | None,
    model: str,
    policies: Mapping[str, PolicyInfo],
    mixtures: Mapping[str, Recipe],
) -> CompiledRecipe:
    """Turn a request's ``model`` and optional ``mixture`` into weights.

    ``recipe`` is None (``model`` decides), the name of a configured mixture, or an inline recipe.
    Raises ModelNotFound for an unknown ``model`` and RecipeError (400) for a bad recipe.
    """
    if model not in policies and model not in mixtures:
        raise ModelNotFound(f"The model `{model}` does not exist.", param="model")
    mixture_name = None
    if recipe is None:
        if model in mixtures:
            mixture_name, recipe = model, mixtures[model]
        else:
            info = policies[model]
            if info.kind != "causal":
                raise RecipeError(f"`{model}` is a reward model, not a policy to generate with", param="model")
            return CompiledRecipe({model: 1.0}, info.family, "single")
    if isinstance(recipe, str):
        if recipe not in mixtures:
            raise RecipeError(f"unknown named mixture {recipe!r}", param="mixture")
        mixture_name, recipe = recipe, mixtures[recipe]
    if not isinstance(recipe, Recipe):
        if not isinstance(recipe, Mapping):
            raise RecipeError("mixture must be a mixture name or an object", param="mixture")
        try:
            recipe = Recipe.model_validate(recipe)
        except ValidationError as err:
            first = err.errors()[0]
            field = ".".join(["mixture", *(str(p) for p in field_path(first["loc"]))])
            raise RecipeError(f"{field}: {first['msg']}", param=field) from None

    form = _form_of(recipe)
    variants = _variants(recipe, policies, mixtures)
    policies = {**policies, **{n: replace(policies[v.policy], name=n, protected=False) for n, v in variants.items()}}
    weights = _compile_form(recipe, form, policies)
    reference = tuned = None
    if form in ("mod", "dera"):
        reference = _reference(recipe, policies)
        tuned = recipe.policy if form == "dera" else next(iter(recipe.objectives))
    families = set()
    for name in weights:
        if name not in policies:
            raise RecipeError(f"mixture names unknown policy {name!r}", param="mixture")
        info = policies[name]
        if info.kind != "causal":
            raise RecipeError(f"{name!r} is a reward model and cannot be mixed as a policy", param="mixture")
        families.add(info.family)
    if len(families) > 1:
        raise RecipeError(
            f"policies {sorted(weights)} belong to different tokenizer families and cannot be mixed",
            param="mixture",
        )
    if all(v == 0.0 for v in weights.values()):
        raise RecipeError("all mixture weights are zero", param="mixture")
    betas = tuple(float(b) for b in (recipe.beta, recipe.beta_prime, recipe.arm and recipe.arm.beta) if b is not None)
    used = {n: v for n, v in variants.items() if n in weights}
    return CompiledRecipe(weights, families.pop(), form, mixture_name, reference, tuned, betas, used)


def _served_policy(name: str, policies: Mapping[str, PolicyInfo], field: str) -> None:
    info = policies.get(name)
    if info is None:
        raise RecipeError(f"{field}: unknown policy {name!r}", param=field)
    if info.kind != "causal":
        raise RecipeError(f"{field}: {name!r} is a reward model, not a policy", param=field)


def _variants(r: Recipe, policies: Mapping[str, PolicyInfo], mixtures: Mapping[str, Recipe]) -> dict[str, Variant]:
    """The recipe's prompt variants (declared, and those guidance / context_aware imply), checked."""
    out: dict[str, Variant] = {}
    for name, v in (r.prompt_variants or {}).items():
        field_ = f"mixture.prompt_variants.{name}"
        if name in policies or name in mixtures:
            raise RecipeError(f"{field_}: a variant may not take the name of a served policy or mixture", param=field_)
        _served_policy(v.policy, policies, f"{field_}.policy")
        given = [(s, getattr(v, s)) for s in ("prompt", "messages", "system_prompt") if getattr(v, s) is not None]
        if len(given) != 1:
            raise RecipeError(f"{field_}: give exactly one of prompt, messages, system_prompt", param=field_)
        source, value = given[0]
        if not value:
            raise RecipeError(f"{field_}.{source}: an empty variant", param=f"{field_}.{source}")
        if source == "messages":  # typed (config.VariantSpec): rendered as the request's own messages are
            value = [m.as_dict() for m in value]
        out[name] = Variant(v.policy, source, value, field_)
    if r.guidance is not None:
        g = r.guidance
        _served_policy(g.policy, policies, "mixture.guidance.policy")
        neg = g.negative_prompt
        if isinstance(neg, list):
            neg = [m.as_dict() for m in neg]
        out[f"{g.policy}[neg]"] = Variant(g.policy, "unconditional", None, "mixture.guidance") if not neg else \
            Variant(g.policy, "messages" if isinstance(neg, list) else "negative", neg, "mixture.guidance.negative_prompt")
    if r.context_aware is not None:
        c = r.context_aware
        _served_policy(c.policy, policies, "mixture.context_aware.policy")
        out[f"{c.policy}[-{c.drop}]"] = Variant(c.policy, f"drop_{c.drop}", None, "mixture.context_aware")
    return out

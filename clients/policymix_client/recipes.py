"""Builders for policymix's request fields, as plain dicts.

Pass them to :class:`~policymix_client.PolicymixClient`, or to the OpenAI SDK through
``extra_body=mixing(...)``::

    client.chat.completions.create(model="formal", messages=[...],
                                   extra_body=mixing(weights(formal=0.5, playful=0.5)))
"""

from __future__ import annotations

from typing import Any, Mapping

Recipe = dict[str, Any]


def weights(mapping: Mapping[str, float] | None = None, /, **by_name: float) -> Recipe:
    """Explicit weights: ``s = sum_k w_k log pi_k``."""
    return {"weights": {**(mapping or {}), **by_name}}


def mod(reference: str, objectives: Mapping[str, float], beta: float | None = None,
        beta_prime: float | None = None) -> Recipe:
    """Multi-objective decoding: P_i gets w_i (times beta/beta_prime if given), the reference the rest."""
    r: Recipe = {"reference": reference, "objectives": dict(objectives)}
    if beta is not None or beta_prime is not None:
        r.update(beta=beta, beta_prime=beta_prime)
    return r


def dera(reference: str, policy: str, beta_prime: float, beta: float | None = None) -> Recipe:
    """Decoding-time realignment: policy weight beta/beta_prime (beta defaults to the policy's own)."""
    r: Recipe = {"reference": reference, "policy": policy, "beta_prime": beta_prime}
    if beta is not None:
        r["beta"] = beta
    return r


def proxy(base: str, tuned: str, untuned: str, alpha: float = 1.0) -> Recipe:
    """Proxy tuning: base + alpha * (tuned - untuned) in log space."""
    return {"proxy": {"base": base, "tuned": tuned, "untuned": untuned, "alpha": alpha}}


def implicit_rerank(policy: str, reference: str, beta: float) -> dict[str, Any]:
    """Rerank best-of candidates by the DPO implicit reward beta * sum log(pi_policy / pi_reference)."""
    return {"implicit": {"policy": policy, "reference": reference, "beta": beta}}


def reward_model_rerank(name: str) -> dict[str, Any]:
    """Rerank best-of candidates with a registered reward model."""
    return {"reward_model": name}


def mixing(mixture: Recipe | str | None = None, *, best_of: int | None = None,
           rerank: dict[str, Any] | str | None = None, return_token_signals: bool | None = None,
           **extra: Any) -> dict[str, Any]:
    """The extension fields of one request (for the OpenAI SDK's ``extra_body``); unset ones are left out."""
    body = {"mixture": mixture, "best_of": best_of, "rerank": rerank, "return_token_signals": return_token_signals,
            **extra}
    return {k: v for k, v in body.items() if v is not None}

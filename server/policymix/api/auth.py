"""API keys: hashed in the config, compared in constant time, with scopes and per-key limits.

Keys come from ``server.api_keys`` (SHA-256 of the key, hex), from ``--api-key`` on the command line
and from the ``POLICYMIX_API_KEY`` environment variable (a single key with every scope). When no key
is configured the API is open. A request without a valid key gets 401; a key that lacks a scope
gets 403; a key at its concurrency limit gets 429 with ``retry-after``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass
from typing import Any, Mapping

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..config import ApiKeySpec, Config
from ..errors import Overloaded
from ..engine.protocol import RequestPlan
from ..mixing.recipes import CompiledRecipe
from .errors import ApiError

ENV_KEY = "POLICYMIX_API_KEY"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(eq=False)
class ApiKey:
    spec: ApiKeySpec
    digest: bytes
    active: int = 0  # requests of this key in flight

    @property
    def name(self) -> str:
        return self.spec.name or self.spec.key_sha256[:8]

    def acquire(self, count: int = 1) -> None:
        """Take ``count`` of the key's concurrent-request slots (a batched completion holds one per prompt; 429
        when too few are free, 400 when the batch could never fit); ``release`` them after."""
        limit = self.spec.max_concurrent
        if limit is not None and count > limit:
            raise ApiError(400, f"a batch of {count} prompts is more than API key {self.name!r} may run at once "
                           f"({limit}); send at most {limit} per request", param="prompt", code="key_limit_exceeded")
        if limit is not None and self.active + count > limit:
            raise Overloaded(f"API key {self.name!r} already has {self.active} of its {limit} requests in flight",
                             status=429, retry_after=1.0)
        self.active += count

    def release(self, count: int = 1) -> None:
        self.active -= count

    def allows(self, policy: str) -> bool:
        return self.spec.policies is None or policy in self.spec.policies

    def authorize(self, model: str, mixture: Any, recipe: CompiledRecipe, rerank: Any = None) -> None:
        """403 unless the key may use this model, mixture and every policy that runs (and scores)."""
        spec = self.spec
        if isinstance(mixture, Mapping) and not spec.allow_inline_recipes:
            raise _forbidden(f"API key {self.name!r} may not send inline recipes; use a named mixture", "mixture")
        if spec.policies is None:
            return
        allowed = set(spec.policies)
        if model not in allowed:
            raise _forbidden(f"API key {self.name!r} may not use model `{model}`", "model")
        if isinstance(mixture, str) and mixture not in allowed:
            raise _forbidden(f"API key {self.name!r} may not use mixture `{mixture}`", "mixture")
        # A named mixture the key may use grants the policies inside it.
        if recipe.mixture_name is None or recipe.mixture_name not in allowed:
            for policy in dict.fromkeys(recipe.policy_of(n) for n in recipe.active):  # a variant is its policy
                if policy not in allowed:
                    raise _forbidden(f"API key {self.name!r} may not use policy `{policy}`", "mixture")
        for policy in _rerank_policies(rerank):
            if policy not in allowed:
                raise _forbidden(f"API key {self.name!r} may not use `{policy}` for reranking", "rerank")

    def authorize_plan(self, plan: RequestPlan) -> None:
        """403 unless the key may use every policy a request's plan runs or scores with (the recipe's and its
        variants', the observers of token signals and implicit reranking, a reward model, a draft policy), on
        either engine; the message names the field that brought the policy in."""
        if self.spec.policies is None:
            return
        recipe = plan.request.recipe
        allowed = set(self.spec.policies)
        if recipe.mixture_name is not None and recipe.mixture_name in allowed:  # it grants what it mixes
            allowed |= {recipe.policy_of(n) for n in recipe.weights}
        for policy, field in _plan_fields(plan).items():
            if policy not in allowed:
                raise _forbidden(f"API key {self.name!r} may not use policy `{policy}`, which {field} would run",
                                 field)

    def check_limits(self, max_tokens: int | None, best_of: int) -> None:
        spec = self.spec
        if spec.max_tokens is not None and max_tokens is not None and max_tokens > spec.max_tokens:
            raise _forbidden(f"max_tokens {max_tokens} exceeds this API key's limit of {spec.max_tokens}",
                             "max_tokens", code="key_limit_exceeded")
        if spec.max_best_of is not None and best_of > spec.max_best_of:
            raise _forbidden(f"best_of {best_of} exceeds this API key's limit of {spec.max_best_of}",
                             "best_of", code="key_limit_exceeded")


def _plan_fields(plan: RequestPlan) -> dict[str, str]:
    """Each policy a plan uses -> the request field that brought it in (the first one, in this order)."""
    req = plan.request
    fields: dict[str, str] = {}
    for stream in plan.weights:
        if stream not in plan.observers:
            fields.setdefault(plan.policy_of(stream), "mixture")
    rr = req.rerank
    if rr is not None and rr.kind == "implicit":
        for p in (rr.implicit.policy, rr.implicit.reference):
            fields.setdefault(p, "search.scorer" if req.search is not None else "rerank.implicit")
    for p in plan.scorers:
        fields.setdefault(p, "rerank.reward_model")
    if plan.signal_pair is not None:
        for p in (plan.signal_pair.policy, plan.signal_pair.reference):
            fields.setdefault(p, "return_token_signals")
    for p in plan.policies:  # what is left: the draft policy
        fields.setdefault(p, "speculative.draft")
    return fields


def _rerank_policies(rerank: Any) -> list[str]:
    if rerank is None or isinstance(rerank, str):
        return []
    if getattr(rerank, "reward_model", None) is not None:
        return [rerank.reward_model]
    imp = getattr(rerank, "implicit", None)
    return [imp.policy, imp.reference] if imp is not None else []


def _forbidden(message: str, param: str, code: str = "scope_denied") -> ApiError:
    return ApiError(403, message, param=param, code=code, type="permission_error")


class KeyRing:
    """Every accepted key. ``lookup`` hashes the presented key and compares it with all of them."""

    def __init__(self, specs: list[ApiKeySpec]):
        self.keys = [ApiKey(s, bytes.fromhex(s.key_sha256)) for s in specs]

    @classmethod
    def from_config(cls, config: Config, env: Mapping[str, str] | None = None) -> "KeyRing":
        env = os.environ if env is None else env
        specs = list(config.server.api_keys)
        if env.get(ENV_KEY):
            specs.append(ApiKeySpec(key_sha256=hash_key(env[ENV_KEY]), name="env"))
        return cls(specs)

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, presented: str) -> ApiKey | None:
        digest = hashlib.sha256(presented.encode("utf-8")).digest()
        found = None
        for key in self.keys:  # no early exit: the time taken does not depend on which key matched
            if hmac.compare_digest(digest, key.digest):
                found = key
        return found


_bearer = HTTPBearer(auto_error=False, description="An API key, when the server is configured with keys")


def key_dependency(ring: KeyRing, open_access: bool = False):
    """A FastAPI dependency returning the caller's ApiKey (None when the API or route is open)."""

    async def require_key(
        request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(_bearer)
    ) -> ApiKey | None:
        if open_access or not ring.enabled:
            return None
        presented = credentials.credentials if credentials is not None else request.headers.get("x-api-key")
        if not presented:
            raise ApiError(401, "Missing API key: send it as 'Authorization: Bearer <key>'.",
                           code="invalid_api_key")
        key = ring.lookup(presented)
        if key is None:
            raise ApiError(401, "Incorrect API key provided.", code="invalid_api_key")
        return key

    return require_key

"""What every engine checks of a request before queueing it, and the shared registry-backed methods.

Both engines (native and vLLM) validate the same fields with the same messages, resolve the same
token-signal pair and run the same observer policies (weight 0: signals, implicit reranking).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ..errors import PolicymixError
from ..mixing.recipes import CompiledRecipe, compile_recipe
from ..registry import Registry
from .protocol import EngineClient, EngineEvent, GenerationRequest, ImplicitRewardSpec, ModelCard, RequestDone


def check_request(registry: Registry, req: GenerationRequest) -> tuple[ImplicitRewardSpec | None, list[str]]:
    """Raise PolicymixError (400, naming the field) for bad best-of / rerank / signals fields; return the
    token-signal pair (or None) and the policies the request only observes."""
    sp, rr = req.sampling, req.rerank
    pols = registry.policies
    max_best_of = registry.config.server.max_best_of
    best_of = sp.best_of or sp.n
    if best_of < sp.n:
        raise PolicymixError(f"best_of ({best_of}) must be >= n ({sp.n})", param="best_of")
    if best_of > max_best_of:
        raise PolicymixError(f"best_of {best_of} is above the server's maximum {max_best_of}", param="best_of")
    if best_of > sp.n and sp.temperature == 0:
        raise PolicymixError("best_of > n with temperature 0 would give identical candidates", param="best_of")
    if rr is not None and rr.kind == "reward_model":
        rm = pols.get(rr.reward_model)
        if rm is None:
            raise PolicymixError(f"unknown reward model {rr.reward_model!r}", param="rerank.reward_model")
        if rm.kind != "reward":
            raise PolicymixError(f"{rr.reward_model!r} is a policy, not a reward model", param="rerank.reward_model")
    if rr is not None and rr.kind == "implicit" and (rr.implicit is None or not rr.implicit.beta > 0):
        raise PolicymixError("rerank.implicit.beta must be > 0", param="rerank.implicit.beta")
    if req.signals is not None and not req.signals.beta > 0:
        raise PolicymixError("signals.beta must be > 0", param="signals.beta")
    pair = req.signals or registry.default_signal_pair(req.recipe)
    observers: list[str] = []
    if req.return_token_signals and pair is not None:
        observers += [pair.policy, pair.reference]
    if rr is not None and rr.kind == "implicit":
        observers += [rr.implicit.policy, rr.implicit.reference]
    for name in observers:
        p = pols.get(name)
        if p is None or p.kind != "causal":
            raise PolicymixError(f"unknown policy {name!r} for signals / rerank", param="rerank.implicit")
        if p.family != req.recipe.family:
            raise PolicymixError(f"policy {name!r} uses a different tokenizer than the mixture",
                                 param="rerank.implicit")
    return pair, list(dict.fromkeys(observers))


class RegistryEngineClient(EngineClient):
    """The EngineClient methods that only read the registry, shared by both engines."""

    registry: Registry

    def models(self) -> list[ModelCard]:
        reg = self.registry
        cards = [ModelCard(name, "policy" if p.kind == "causal" else "reward", p.family,
                           max_model_len=reg.max_model_len(p.family)) for name, p in reg.policies.items()]
        infos = reg.infos()
        for name, recipe in reg.config.mixtures.items():
            c = compile_recipe(recipe, name, infos, reg.config.mixtures)
            cards.append(ModelCard(name, "mixture", c.family, weights=c.weights,
                                   max_model_len=reg.max_model_len(c.family)))
        return cards

    def compile(self, model: str, mixture: Any) -> CompiledRecipe:
        return compile_recipe(mixture, model, self.registry.infos(), self.registry.config.mixtures)

    def tokenizer(self, model: str) -> Any:
        reg = self.registry
        if model in reg.policies:
            return reg.policies[model].tokenizer
        return reg.family_members(self.compile(model, None).family)[0].tokenizer


async def event_stream(start: Callable[[Callable[[EngineEvent], None]], None],
                       finish: Callable[[bool], None]) -> AsyncIterator[EngineEvent]:
    """Yield a request's events until its RequestDone. ``start(emit)`` submits it (``emit`` may be called
    from any thread); ``finish(done)`` runs last, with done False when the consumer left first (a client
    that went away: the engine must free the request now)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    start(lambda ev: loop.call_soon_threadsafe(queue.put_nowait, ev))
    done = False
    try:
        while True:
            ev = await queue.get()
            yield ev
            if isinstance(ev, RequestDone):
                done = True
                return
    finally:
        finish(done)

"""The EngineClient methods both engines share (registry-backed), and the event pump.

Both engines plan a request with :func:`policymix.engine.plan.make_plan`, so they validate the same
fields with the same messages, run the same observers and stop on the same EOS ids.
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator, Callable

from ..mixing.recipes import CompiledRecipe, compile_recipe
from ..registry import Registry
from .plan import make_plan
from .protocol import EngineClient, EngineEvent, GenerationRequest, ModelCard, RequestDone, RequestPlan


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

    def plan(self, request: GenerationRequest) -> RequestPlan:
        return make_plan(self.registry, request)

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

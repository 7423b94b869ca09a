"""Graceful shutdown: stop admitting, let running requests finish within a deadline, end the rest cleanly.

The first SIGTERM or SIGINT starts a drain while the listener stays open: new requests get 503
with ``retry-after`` (``/health`` too, so a load balancer stops sending traffic) and running
requests go on until the deadline. Those still running then are ended by the middleware with a
clean error (an SSE error event and ``[DONE]`` for a stream, a 503 for an answer not yet started)
and their handlers are cancelled, which aborts their engine requests. Only then does uvicorn close
the listener and the lifespan stop the engine, and the process exits 0. A second signal ends the
drain at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from contextlib import contextmanager
from types import FrameType
from typing import TYPE_CHECKING, Iterator

import uvicorn

if TYPE_CHECKING:
    from .middleware import Flight

log = logging.getLogger("policymix.shutdown")

_POLL_S = 0.05
UNWIND_S = 5.0  # for ended requests' handlers to finish their cleanup (engine aborts)


class Lifecycle:
    """Whether the server still admits requests, and the responses in flight (kept by the middleware)."""

    def __init__(self) -> None:
        self.draining = False
        self.flights: set[Flight] = set()
        self._hurry = False
        self._drain: asyncio.Future | None = None

    def refuses(self, path: str) -> bool:
        """Requests refused while draining: all but /metrics (scrapes should see the drain happen)."""
        return self.draining and path != "/metrics"

    @contextmanager
    def track(self, flight: Flight) -> Iterator[None]:
        self.flights.add(flight)
        try:
            yield
        finally:
            self.flights.discard(flight)

    def hurry(self) -> None:
        """End the drain now: what still runs is ended at once."""
        self._hurry = True

    async def drain(self, deadline_s: float) -> None:
        """Stop admitting; wait up to ``deadline_s`` for running requests; end the rest. Idempotent."""
        if self._drain is None:
            self._drain = asyncio.ensure_future(self._run_drain(deadline_s))
        await asyncio.shield(self._drain)

    async def _run_drain(self, deadline_s: float) -> None:
        self.draining = True
        loop = asyncio.get_running_loop()
        if self.flights:
            log.info("shutting down: %d requests running, deadline %g s", len(self.flights), deadline_s,
                     extra={"running": len(self.flights), "deadline_s": deadline_s})
        await self._wait_idle(loop.time() + deadline_s)
        if self.flights:
            ending = list(self.flights)
            log.warning("shutdown deadline passed: ending %d running requests", len(ending),
                        extra={"ended": len(ending)})
            await asyncio.gather(*(f.end() for f in ending))
            await self._wait_idle(loop.time() + UNWIND_S, hurried=False)
        if self.flights:
            log.warning("%d ended requests did not unwind", len(self.flights))
        else:
            log.info("drained: no request running")

    async def _wait_idle(self, until: float, hurried: bool = True) -> None:
        loop = asyncio.get_running_loop()
        while self.flights and loop.time() < until and not (hurried and self._hurry):
            await asyncio.sleep(_POLL_S)


class GracefulServer(uvicorn.Server):
    """uvicorn whose first SIGTERM/SIGINT drains ``lifecycle`` before the listener closes.

    The signal handler only counts signals; the event loop's once-per-0.1 s tick acts on them, so
    nothing runs inside the handler. Signals are not re-raised after the shutdown (uvicorn's
    default), so the process exits 0.
    """

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, deadline_s: float):
        super().__init__(config)
        self.lifecycle = lifecycle
        self.deadline_s = deadline_s
        self.signals = 0
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.signals += 1
        if sig not in (signal.SIGINT, signal.SIGTERM):
            self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.signals and self._drain_task is None:
            log.info("signal received: draining (second signal: stop at once)")
            self._drain_task = asyncio.ensure_future(self._drain_then_exit())
        if self.signals > 1:
            self.lifecycle.hurry()
        return await super().on_tick(counter)

    async def _drain_then_exit(self) -> None:
        try:
            await self.lifecycle.drain(self.deadline_s)
        finally:
            self.should_exit = True

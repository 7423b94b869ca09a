"""The native engine: an EngineClient that steps :class:`EngineCore` on one background thread.

Requests and aborts cross into the thread through an inbox; events come back through each
request's asyncio queue (``call_soon_threadsafe``). If the loop dies, ``is_healthy()`` turns false.
"""

from __future__ import annotations

import asyncio
from contextlib import aclosing
import logging
import sys
import threading
import time
from typing import Any, AsyncIterator, Callable

from ..config import Config
from ..errors import PolicymixError
from ..registry import Registry, load_registry
from .core import EngineCore
from .protocol import EngineError, EngineEvent, ErrorKind, GenerationRequest, RequestPlan
from .requests import RegistryEngineClient, event_stream
from .scheduler import QueueFull
from .sequence import RequestState

log = logging.getLogger("policymix.engine")

GIL_SWITCH_INTERVAL_S = 0.0005


class NativeEngine(RegistryEngineClient):
    def __init__(self, registry: Registry):
        self.registry = registry
        self.core = EngineCore(registry)
        self._inbox: list[tuple[str, Any]] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._dead: str | None = None
        self._pending = 0  # submitted, not yet admitted into the core (queue accounting)
        self.on_fatal: Callable[[str], None] | None = None  # e.g. exit the process for a supervisor

    @classmethod
    def from_config(cls, cfg: Config, progress: bool = True) -> "NativeEngine":
        import torch

        if cfg.server.torch_threads:
            torch.set_num_threads(cfg.server.torch_threads)
        report = (lambda msg: print(msg, flush=True)) if progress else None
        return cls(load_registry(cfg, progress=report))

    # ----- EngineClient ------------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> RequestPlan:
        return self.core.render(request).plan  # the KV budget checked too: a request that could never fit is bad input

    async def generate(self, plan: RequestPlan) -> AsyncIterator[EngineEvent]:
        self._check_open()
        state = RequestState(plan)
        request = plan.request

        def start(emit) -> None:
            state.emit = emit
            with self._lock:  # the loop's death drains the inbox under this lock: nothing is queued after it
                self._check_open()
                self._check_room()
                self._inbox.append(("add", state))
                self._pending += 1
            self._wake.set()

        def finish(done: bool) -> None:
            if not done:  # the client went away (or the consumer stopped): free its cache now
                self._post(("abort", request.request_id))

        async with aclosing(event_stream(start, finish)) as events:  # closed at once if our consumer leaves
            async for ev in events:
                yield ev

    def _check_open(self) -> None:
        if self._dead or self._draining or self._stopping:
            raise EngineError(ErrorKind.OVERLOADED, "the engine is not accepting requests (shutting down or stopped)",
                              "engine_stopped")

    def _check_room(self) -> None:
        if len(self.core.waiting) + self._pending >= self.core.max_queue + self.core.max_num_seqs:
            raise EngineError(ErrorKind.OVERLOADED, f"the server is full ({self.core.max_queue} requests waiting)",
                              "server_overloaded")

    async def abort(self, request_id: str) -> None:
        self._post(("abort", request_id))

    def _post(self, item) -> None:
        with self._lock:
            self._inbox.append(item)
        self._wake.set()

    def is_healthy(self) -> bool:
        return self._dead is None and self._thread is not None and self._thread.is_alive()

    def stats(self) -> dict[str, Any]:
        core = self.core
        return {
            "running": sum(len([s for s in st.sequences if not s.finished]) for st in core.running),
            "running_requests": len(core.running),
            "waiting": len(core.waiting) + self._pending,
            "forwards": {name: r.forwards for name, r in core.runners.items()},
            "timers": dict(core.timers),
            "steps": core.steps,
            "kv_cache_bytes": {name: r.cache.nbytes() for name, r in core.runners.items()},
            "speculative": {"rounds": core.speculator.rounds, "drafted": core.speculator.drafted,
                            "accepted": core.speculator.accepted},
        }

    async def start(self) -> None:
        # The step thread shares the GIL with reward-model scoring (outputs.py) and the HTTP loop: hand it
        # over every 0.5 ms instead of Python's 5 ms, so scoring beside the streams does not stretch their
        # steps (benchmarks/results/rerank_stall_cpu.md: the scoring thread's cost on p99, 1.28x -> 1.17x).
        sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="policymix-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, deadline_s: float = 30.0) -> None:
        """Stop admitting; let running requests finish until the deadline, then abort the rest."""
        self._draining = True
        end = time.monotonic() + deadline_s
        while (self.core.has_work() or self._inbox) and self.is_healthy():
            if time.monotonic() > end:
                self._post(("fail_all", "the server is shutting down"))
                break
            await asyncio.sleep(0.02)
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)
        self.core.close()

    # ----- the loop ----------------------------------------------------------------------------

    def _drain_inbox(self) -> None:
        with self._lock:
            items, self._inbox = self._inbox, []
        for kind, arg in items:
            if kind == "add":
                self._pending -= 1
                try:
                    self.core.add(arg)
                except QueueFull as err:
                    arg.emit(arg.plan.failure(ErrorKind.OVERLOADED, str(err), "server_overloaded"))
                except PolicymixError as err:
                    arg.emit(arg.plan.failure(ErrorKind.BAD_INPUT, err.message, err.code))
                except Exception as err:  # noqa: BLE001 - e.g. out of memory while admitting: this request only
                    log.exception("admitting request %s failed", arg.req.request_id)
                    arg.emit(arg.plan.failure(ErrorKind.INTERNAL, f"admission failed: {type(err).__name__}: {err}",
                                              "engine_error"))
            elif kind == "abort":
                self.core.abort(arg)
            elif kind == "fail_all":
                self.core.fail_all(arg)

    def _loop(self) -> None:
        try:
            while not self._stopping:
                self._drain_inbox()
                if self.core.has_work():
                    self.core.step()
                else:
                    self._wake.wait(0.05)
                    self._wake.clear()
        except BaseException as err:  # noqa: BLE001 - report, then let health checks see it
            log.exception("engine loop died")
            self._die(f"{type(err).__name__}: {err}")
            return
        self._answer_the_rest("the server is shutting down")  # a deadline-expired shutdown

    def _die(self, reason: str) -> None:
        with self._lock:
            self._dead = reason
        try:
            self._answer_the_rest(f"the engine stopped: {reason}")
        finally:
            if self.on_fatal:
                self.on_fatal(reason)

    def _answer_the_rest(self, message: str) -> None:
        """Every request still inside (running, waiting, or in the inbox) gets a final error event."""
        with self._lock:
            items, self._inbox = self._inbox, []
            self._pending = 0
        for kind, arg in items:
            if kind == "add":
                arg.emit(arg.plan.failure(ErrorKind.OVERLOADED, message, "engine_stopped"))
        self.core.fail_all(message)

"""Running engine requests from HTTP handlers: merge several streams, stop on client disconnect.

A batched /v1/completions request (a list of prompts) is one engine request per prompt; their
events are merged as they come. Whatever ends the consumer early (a disconnect, an error, a
cancelled task) closes every engine stream and aborts its request, so the engine frees the cache.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, AsyncIterator, Awaitable, Sequence

import anyio
from starlette.requests import Request

from ..engine.protocol import EngineClient, EngineEvent, RequestDone, RequestPlan

log = logging.getLogger("policymix.api")

_END = object()


async def _abort(engine: EngineClient, request_ids: list[str]) -> None:
    with anyio.CancelScope(shield=True):  # cleanup must run even inside a cancelled scope
        for rid in request_ids:
            try:
                await engine.abort(rid)
            except Exception:  # an engine that already forgot the request is fine
                log.debug("abort of %s failed", rid, exc_info=True)


async def merged(engine: EngineClient, plans: Sequence[RequestPlan]) -> AsyncIterator[tuple[int, EngineEvent]]:
    """Events of every request as ``(request position, event)``, in arrival order.

    Errors raised by ``engine.generate`` (Overloaded, ...) propagate to the consumer. Use inside
    ``contextlib.aclosing`` so that early exits abort the unfinished requests at once.
    """
    finished: set[int] = set()
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, plan: RequestPlan) -> None:
        try:
            async for ev in engine.generate(plan):
                await queue.put((i, ev))
        except BaseException as err:  # noqa: BLE001 - handed to the consumer, which re-raises it
            queue.put_nowait((i, err))
            if isinstance(err, asyncio.CancelledError):
                raise
        else:
            queue.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, p)) for i, p in enumerate(plans)]
    try:
        while len(finished) < len(plans):
            i, item = await queue.get()
            if item is _END:
                finished.add(i)
            elif isinstance(item, BaseException):
                raise item
            else:
                if isinstance(item, RequestDone):
                    finished.add(i)
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        with anyio.CancelScope(shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)
        await _abort(engine, [p.request.request_id for i, p in enumerate(plans) if i not in finished])


async def wait_disconnect(request: Request) -> None:
    """Return when the client goes away (the body has been read, so only disconnects arrive)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class ClientGone(Exception):
    """The client disconnected before the answer was ready."""


async def unless_disconnected(request: Request, work: Awaitable[Any]) -> Any:
    """Await ``work``; cancel it (and so its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(task, return_exceptions=True)
        watcher.cancel()
    if task.cancelled():
        raise ClientGone()
    return task.result()

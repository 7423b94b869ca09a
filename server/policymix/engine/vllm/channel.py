"""Per-policy log-probabilities of the chosen tokens, from vLLM's worker back to the engine client.

vLLM returns only the mixed distribution's logprobs; token signals, per-policy logprobs and the
implicit-reward rerank need each policy's ``log pi_k`` of the token that was sampled. The worker
learns that token one step later (the request's output list grows after sampling), reads the
values from the distributions it kept, and pushes them over a local ZMQ socket (pyzmq comes with
vLLM): one message per step, ``[[key, position, [logp_k or None per policy], kl or None], ...]``.
A finished request is removed from vLLM's batch in one more step, so its last token is sent too.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from typing import Any

CHANNEL_KEY = "policymix_channel"  # hf_overrides key: the ZMQ address the worker pushes to


def new_address() -> str:
    d = tempfile.mkdtemp(prefix="policymix-vllm-")
    return f"ipc://{os.path.join(d, 'policy-logprobs.sock')}"


class Sender:
    """Worker side: a PUSH socket, connected lazily (only rank 0 of a tensor-parallel group sends)."""

    def __init__(self, address: str):
        self.address = address
        self._sock = None

    def send(self, rows: list[list[Any]]) -> None:
        if not rows:
            return
        if self._sock is None:
            import zmq

            self._sock = zmq.Context.instance().socket(zmq.PUSH)
            self._sock.setsockopt(zmq.LINGER, 1000)
            self._sock.connect(self.address)
        self._sock.send(json.dumps(rows).encode())


class Receiver:
    """Client side: a PULL socket on the engine loop; ``wait(key, position)`` gives one token's values."""

    def __init__(self, address: str):
        import zmq
        import zmq.asyncio

        self.address = address
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.bind(address)
        self._values: dict[str, dict[int, tuple[list, float | None]]] = {}
        self._waiters: dict[tuple[str, int], asyncio.Future] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        while True:
            for key, pos, values, kl in json.loads(await self._sock.recv()):
                fut = self._waiters.pop((key, pos), None)
                if fut is not None and not fut.done():
                    fut.set_result((values, kl))
                elif key in self._values:  # arrived before anyone waited
                    self._values[key][pos] = (values, kl)

    def open(self, key: str) -> None:
        self._values[key] = {}

    def close(self, key: str) -> None:
        self._values.pop(key, None)
        for k in [k for k in self._waiters if k[0] == key]:
            self._waiters.pop(k).cancel()

    async def wait(self, key: str, position: int, timeout: float) -> tuple[list, float | None]:
        got = self._values.get(key, {}).pop(position, None)
        if got is not None:
            return got
        fut = asyncio.get_running_loop().create_future()
        self._waiters[(key, position)] = fut
        return await asyncio.wait_for(fut, timeout)

    def shutdown(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._sock.close(linger=0)
        self._ctx.term()
        path = self.address[len("ipc://"):]
        try:
            os.unlink(path)
            os.rmdir(os.path.dirname(path))
        except OSError:
            pass

"""Helpers for API tests: an app over the scripted engine, a live uvicorn server, an SSE reader."""

from __future__ import annotations

import json
import socket
import threading
import time

import uvicorn

from policymix.api import build_app
from policymix.config import parse_config


def fake_config(**server):
    return parse_config({"policies": {"base": {"path": "unused"}}, "server": server})


def sse_events(raw: str) -> list:
    """Split an SSE body into its JSON events (``"[DONE]"`` kept as a string); checks the framing."""
    assert raw.endswith("\n\n"), "every event ends with a blank line"
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, f"bad SSE event {block!r}"
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events


class LiveServer:
    """A real uvicorn server on a free loopback port, in a background thread."""

    def __init__(self, app, startup_timeout: float = 120.0):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.startup_timeout = startup_timeout

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        end = time.monotonic() + self.startup_timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > end:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.sock.close()


def live_fake(engine, **server) -> LiveServer:
    return LiveServer(build_app(engine, fake_config(**server), env={}))

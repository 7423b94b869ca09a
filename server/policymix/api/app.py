"""The FastAPI application: ``build_app(engine, config)``; no module-level app.

The lifespan starts the engine's stepping loop and shuts it down (draining running requests within
``shutdown_s``) when the server stops.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping

from fastapi import FastAPI

from .. import __version__
from ..config import Config
from ..engine.protocol import EngineClient
from .auth import KeyRing
from .errors import install_handlers
from .metrics import ServerMetrics
from .routes import build_routers
from .serving import Serving


def build_app(engine: EngineClient, config: Config, *, env: Mapping[str, str] | None = None,
              shutdown_s: float = 30.0) -> FastAPI:
    """An app serving ``engine``; API keys from ``config.server.api_keys`` and ``POLICYMIX_API_KEY`` in ``env``."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await engine.shutdown(shutdown_s)

    app = FastAPI(title="policymix", version=__version__, lifespan=lifespan,
                  description="OpenAI-compatible server that mixes language-model policies token by token.")
    serving = Serving(engine, config, ServerMetrics(engine.stats))
    app.state.serving = serving  # for tests and operators; routes get it by closure, not from here
    for router in build_routers(serving, KeyRing.from_config(config, env), config):
        app.include_router(router)
    install_handlers(app)
    return app

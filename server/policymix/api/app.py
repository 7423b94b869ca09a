"""The FastAPI application: ``build_app(engine, config)``; no module-level app.

The lifespan starts the engine's stepping loop; when the server stops it drains the HTTP requests
in flight (see :mod:`policymix.api.lifecycle`, at most ``shutdown_s``) and then shuts the engine
down. The request-context layer (request ids, access log, shutdown gate) wraps everything else.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Mapping

from fastapi import FastAPI
from starlette.types import ASGIApp

from .. import __version__
from ..config import Config
from ..engine.protocol import EngineClient
from .auth import KeyRing
from .errors import install_handlers
from .lifecycle import Lifecycle
from .metrics import ServerMetrics
from .middleware import RequestContext
from .routes import build_routers
from .serving import Serving


class PolicymixApp(FastAPI):
    """FastAPI with :class:`RequestContext` outside its error handlers, so a crash's 500 gets the request id too."""

    lifecycle: Lifecycle
    log_prompts: bool = False

    def build_middleware_stack(self) -> ASGIApp:
        return RequestContext(super().build_middleware_stack(), self.lifecycle, self.log_prompts)


def build_app(engine: EngineClient, config: Config, *, env: Mapping[str, str] | None = None,
              shutdown_s: float = 30.0, lifecycle: Lifecycle | None = None) -> PolicymixApp:
    """An app serving ``engine``; API keys from ``config.server.api_keys`` and ``POLICYMIX_API_KEY`` in ``env``."""
    lifecycle = lifecycle or Lifecycle()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await engine.start()
        try:
            yield
        finally:
            await lifecycle.drain(shutdown_s)  # at once when a signal already drained it
            await engine.shutdown(shutdown_s)

    app = PolicymixApp(title="policymix", version=__version__, lifespan=lifespan,
                       description="OpenAI-compatible server that mixes language-model policies token by token.")
    app.lifecycle = lifecycle
    app.log_prompts = config.server.log_prompts
    serving = Serving(engine, config, ServerMetrics(engine.stats))
    app.state.serving = serving  # for tests and operators; routes get it by closure, not from here
    for router in build_routers(serving, KeyRing.from_config(config, env), config):
        app.include_router(router)
    install_handlers(app)
    return app

"""The OpenAI-compatible HTTP layer. It talks only to an :class:`~policymix.engine.protocol.EngineClient`
and never imports torch."""

from .app import build_app

__all__ = ["build_app"]

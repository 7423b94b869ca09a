"""The browser playground: ``GET /playground``, a static page that calls this server's own API.

The page is plain HTML, CSS and JavaScript modules from ``static/playground/`` (no build step, no
CDN): it lists ``/v1/models``, sends ``/v1/completions`` or ``/v1/chat/completions`` with the
user's recipe and key, and draws what comes back. The server only hands out the files and two
public numbers of the mixing guard (``settings.json``), so the slider bounds match what the guard
accepts; the API key stays in the browser's memory and travels only in the page's API calls.

A Content-Security-Policy allows nothing but this origin, so the page cannot reach another host
even by mistake. ``server.playground: false`` leaves these routes out (404).
"""

from __future__ import annotations

from importlib import resources
from pathlib import PurePosixPath

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response

from ..config import Config
from .errors import ApiError

_MEDIA = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
          ".css": "text/css; charset=utf-8"}
_HEADERS = {
    "content-security-policy": ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
                                "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
    "x-content-type-options": "nosniff",
    "cache-control": "no-cache",  # a restarted server's page is picked up at once
}


def _static_files() -> dict[str, bytes]:
    """Every file of the page by name, read once (a fixed set: no path from the URL reaches the disk)."""
    folder = resources.files("policymix.api") / "static" / "playground"
    return {f.name: f.read_bytes() for f in folder.iterdir() if f.is_file() and PurePosixPath(f.name).suffix in _MEDIA}


def build_playground_router(config: Config, keys_required: bool) -> APIRouter:
    files = _static_files()
    guard = config.server.guard
    settings = {"guard": {"max_abs_weight": guard.max_abs_weight, "max_sum_abs_weight": guard.max_sum_abs_weight},
                "keys_required": keys_required}
    router = APIRouter(prefix="/playground", include_in_schema=False)

    def serve(name: str) -> Response:
        body = files.get(name)
        if body is None:
            raise ApiError(404, f"no playground file {name!r}", code="not_found")
        return Response(body, media_type=_MEDIA[PurePosixPath(name).suffix], headers=_HEADERS)

    @router.get("")
    async def page() -> Response:
        return serve("index.html")

    @router.get("/settings.json")
    async def page_settings() -> JSONResponse:
        return JSONResponse(settings, headers={"cache-control": "no-cache"})

    @router.get("/{name}")
    async def asset(name: str) -> Response:
        return serve(name)

    return router

"""The OpenAI error envelope and the exception handlers that produce it.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with the status
its :class:`~policymix.errors.PolicymixError` carries. FastAPI's 422 for a malformed body becomes a
400 (OpenAI's status for bad input) with the offending field in ``param``.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..engine.protocol import EngineError, ErrorKind
from ..errors import Overloaded, PolicymixError, field_path

log = logging.getLogger("policymix.api")

# OpenAI's error types by status, for errors that are not PolicymixErrors.
_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_exceeded", 503: "server_overloaded"}


class ApiError(PolicymixError):
    """An HTTP-level error raised by the API layer itself (auth, key limits, unknown route)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message, param=param, code=code)
        self.status = status
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


# How each engine-level failure answers over HTTP (the engines know no statuses).
_STATUS = {ErrorKind.OVERLOADED: 503, ErrorKind.OUT_OF_MEMORY: 503, ErrorKind.BAD_INPUT: 400,
           ErrorKind.INTERNAL: 500}


def engine_error(kind: ErrorKind, message: str, code: str | None) -> PolicymixError:
    """The API error an engine failure stands for: retryable kinds are 503 with retry-after."""
    status = _STATUS.get(kind, 500)
    if status == 503:
        err = Overloaded(message, status=503)
        if code:  # e.g. queue_timeout, out_of_memory: say which kind of "later"
            err.code = code
        return err
    return ApiError(status, message if status < 500 else f"generation failed: {message}",
                    code=code or ("engine_error" if status >= 500 else None))


def error_payload(exc: BaseException) -> tuple[int, dict, dict[str, str]]:
    """(status, envelope, headers) for any exception; unknown exceptions are a 500 that hides internals."""
    if isinstance(exc, EngineError):
        exc = engine_error(exc.kind, exc.message, exc.code)
    if isinstance(exc, PolicymixError):
        headers = {}
        if isinstance(exc, Overloaded):
            headers["retry-after"] = str(max(1, math.ceil(exc.retry_after)))
        return exc.status, error_body(exc.message, exc.type, exc.param, exc.code), headers
    return 500, error_body("internal server error", "server_error", None, "internal_error"), {}


def error_response(exc: BaseException) -> JSONResponse:
    status, body, headers = error_payload(exc)
    return JSONResponse(body, status_code=status, headers=headers)


def _clean_loc(error: dict) -> list:
    loc = field_path(error.get("loc", ()))
    return loc[1:] if loc and loc[0] == "body" else loc


def _validation_error(errors: list[dict]) -> ApiError:
    # Of a union's per-member errors, the deepest names the field the client most likely meant.
    first = max(errors, key=lambda e: len(_clean_loc(e)))
    loc = _clean_loc(first)
    if first.get("type") == "json_invalid":
        return ApiError(400, f"the request body is not valid JSON: {first.get('msg', '')}")
    if not loc and first.get("type") in ("model_attributes_type", "dict_type", "model_type"):
        # e.g. `curl -d '{...}'` without a JSON content type: the body was never parsed as JSON
        return ApiError(400, "the request body must be a JSON object, sent with 'Content-Type: application/json'")
    param = ".".join(str(p) for p in loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "missing":
        msg = "a required field is missing"
    return ApiError(400, f"{param}: {msg}" if param else msg, param=param)


def install_handlers(app: FastAPI) -> None:
    """Map every error to the OpenAI envelope: typed errors, validation (422 -> 400), routing, crashes."""

    @app.exception_handler(PolicymixError)
    async def _policymix(request: Request, exc: PolicymixError) -> JSONResponse:
        if exc.status >= 500:
            log.warning("%s %s: %s", request.method, request.url.path, exc.message)
        return error_response(exc)

    @app.exception_handler(EngineError)
    async def _engine(request: Request, exc: EngineError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(_validation_error(list(exc.errors())))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        err = ApiError(exc.status_code, str(exc.detail), code=code)
        resp = error_response(err)
        for k, v in (exc.headers or {}).items():
            resp.headers[k] = v
        return resp

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(exc)

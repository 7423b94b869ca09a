"""Logging for the server: one JSON object per line (or plain text), each tagged with its request id.

The request id lives in a context variable that the HTTP middleware sets for the duration of a
request, so every log line written while serving it (policymix's loggers, uvicorn's, the error
handlers') carries it without being passed around. Lines written outside a request have
``"request_id": null``. Prompt text never reaches the log unless ``server.log_prompts`` is set:
the formatter drops the fields that could hold it.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Any, Iterator, TextIO

REQUEST_ID: ContextVar[str | None] = ContextVar("policymix_request_id", default=None)

MAX_REQUEST_ID = 128
_UNSAFE = re.compile(r"[^A-Za-z0-9._:=+/@-]")  # a client's id goes into headers, logs and engine ids
PROMPT_FIELDS = frozenset({"prompt", "messages", "input", "completion"})

# Attributes every LogRecord has; anything else on a record came from ``extra=`` and is logged.
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}
_HIDDEN = {"color_message", "request_id"}  # uvicorn's coloured duplicate of the message; ours


def clean_request_id(raw: str | None) -> str | None:
    """A client's ``X-Request-Id`` reduced to safe characters and at most 128 of them (None if nothing is left)."""
    if not raw:
        return None
    cleaned = _UNSAFE.sub("", raw)[:MAX_REQUEST_ID]
    return cleaned or None


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return REQUEST_ID.get()


def engine_request_prefix() -> str:
    """What engine request ids start with inside a request (``"<request id>:"``), so engine logs match."""
    rid = REQUEST_ID.get()
    return f"{rid}:" if rid else ""


def _extras(record: logging.LogRecord, log_prompts: bool) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items()
            if k not in _STANDARD and k not in _HIDDEN and (log_prompts or k not in PROMPT_FIELDS)}


def _request_id(record: logging.LogRecord) -> str | None:
    return getattr(record, "request_id", None) or REQUEST_ID.get()


class JsonFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message", "request_id", ...extra fields}`` on one line."""

    def __init__(self, log_prompts: bool = False):
        super().__init__()
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds")
                    .replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": _request_id(record),
        }
        for k, v in _extras(record, self.log_prompts).items():
            out.setdefault(k, v)
        if record.exc_info:
            out["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            out["stack_info"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    """``time LEVEL logger [request id] message key=value ...`` for people reading a terminal."""

    def __init__(self, log_prompts: bool = False):
        super().__init__("%(asctime)s %(levelname)s %(name)s%(rid)s: %(message)s%(kv)s")
        self.log_prompts = log_prompts

    def format(self, record: logging.LogRecord) -> str:
        rid = _request_id(record)
        record.rid = f" [{rid}]" if rid else ""
        extras = _extras(record, self.log_prompts)
        extras.pop("rid", None)
        extras.pop("kv", None)
        record.kv = "".join(f" {k}={v}" for k, v in extras.items())
        try:
            return super().format(record)
        finally:
            del record.rid, record.kv


class _OurHandler(logging.StreamHandler):
    """Marks the handler configure_logging installed, so that calling it again replaces it."""

    root_level = logging.WARNING


def reset_logging() -> int:
    """Undo configure_logging (for callers in a longer-lived process, such as tests); the root level now."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _OurHandler)]:
        root.removeHandler(old)
        root.setLevel(old.root_level)
    return root.level


def configure_logging(fmt: str = "json", level: str | int = "info", log_prompts: bool = False,
                      stream: TextIO | None = None) -> logging.Handler:
    """Send every logger (policymix's, uvicorn's, libraries') through one handler in ``fmt``.

    Returns the handler. Uvicorn must be started with ``log_config=None`` so that it keeps these.
    """
    if fmt not in ("json", "text"):
        raise ValueError(f"unknown log format {fmt!r} (json or text)")
    stream = stream or sys.stdout
    while isinstance(stream, _LineLogger):  # called inside prints_as_logs: write where print would have
        stream = stream.under
    handler = _OurHandler(stream)
    handler.setFormatter(JsonFormatter(log_prompts) if fmt == "json" else TextFormatter(log_prompts))
    root = logging.getLogger()
    handler.root_level = reset_logging()  # the level to go back to
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # no handlers of their own: they propagate
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    return handler


class _LineLogger(io.TextIOBase):
    """A text stream whose complete lines become log records (for libraries that print)."""

    def __init__(self, logger: logging.Logger, under: TextIO):
        self.logger = logger
        self.under = under  # the stream it replaces
        self.partial = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        lines = (self.partial + text).split("\n")
        self.partial = lines.pop()
        for line in lines:
            if line.strip():
                self.logger.info(line.strip())
        return len(text)

    def flush(self) -> None:
        if self.partial.strip():
            self.logger.info(self.partial.strip())
        self.partial = ""


@contextlib.contextmanager
def prints_as_logs(logger: logging.Logger) -> Iterator[None]:
    """Within the block, what is printed to stdout is logged by ``logger`` instead (one record per line)."""
    sink = _LineLogger(logger, sys.stdout)
    with contextlib.redirect_stdout(sink):
        try:
            yield
        finally:
            sink.flush()

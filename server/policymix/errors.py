"""Typed errors shared by the library and the API.

Each carries the request field it is about (``param``) so that the HTTP layer can map it to the
OpenAI error envelope without parsing messages.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

# Pydantic adds union-member tags ("str", "list[int]", "function-after[...]", a model's class name) to error
# locations; fields are lower-case names (mixture keys may hold a hyphen: "dpo-concise")
_TAG = re.compile(r"^(str|int|float|bool|list|dict|none|null)$|^[A-Z]|[\[\]]")


def field_path(loc: Iterable[Any]) -> list[Any]:
    """A pydantic error location without its union-member tags: the path of the field a client sent."""
    return [p for p in loc if not (isinstance(p, str) and _TAG.search(p))]


class PolicymixError(Exception):
    """Base class. ``status`` is the HTTP status the API answers with."""

    status = 400
    type = "invalid_request_error"
    code: str | None = None

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class ConfigError(PolicymixError):
    """A config file or policy that cannot be loaded (raised at start, never per request)."""

    status = 500
    type = "server_error"


class RecipeError(PolicymixError):
    """A mixing recipe that does not compile (bad weight, unknown policy, mixed families...)."""

    code = "invalid_recipe"


class ModelNotFound(PolicymixError):
    status = 404
    code = "model_not_found"


class GuardRefusal(PolicymixError):
    """A recipe refused by the mixing guard (would invert a protected policy)."""

    status = 403
    type = "permission_error"
    code = "mixing_guard"


class Overloaded(PolicymixError):
    """The server (503) or the caller's key (429) has no room now; retry later."""

    status = 503
    type = "server_overloaded"
    code = "server_overloaded"

    def __init__(self, message: str, status: int = 503, retry_after: float = 1.0):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after
        if status == 429:
            self.type = "rate_limit_exceeded"
            self.code = "rate_limit_exceeded"


class ContextTooLong(PolicymixError):
    code = "context_length_exceeded"

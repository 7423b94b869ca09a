"""Request types that the registry, both engines and the API all need (kept below all of them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ImplicitRewardSpec:
    """The DPO implicit reward ``beta * (log pi_policy - log pi_reference)``."""

    policy: str
    reference: str
    beta: float


@dataclass
class Prompt:
    """Exactly one of text, token_ids or messages. Each policy renders it with its own system prompt."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None  # chat: OpenAI function tools, rendered by the chat template

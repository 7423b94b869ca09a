"""Typed views of policymix responses (pydantic; unknown fields are kept, so newer servers still parse)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class Usage(_Open):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Candidate(_Open):
    text: str
    token_ids: list[int]
    score: float
    finish_reason: str
    prompt_index: int = 0


class TokenSignal(_Open):
    token: str
    token_id: int
    policy_logprobs: dict[str, float] | None = None
    implicit_reward: float | None = None
    kl: float | None = None


class ChoiceSignals(_Open):
    kl_to_reference: float | None = None
    implicit_reward: float | None = None
    token_signals: list[TokenSignal] | None = None


class Policymix(ChoiceSignals):
    """The ``policymix`` extension object: compiled weights, best-of candidates, first choice's signals."""

    weights: dict[str, float] = {}
    mixture: str | None = None
    candidates: list[Candidate] | None = None
    kl_bound: float | None = None


class CompletionChoice(_Open):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    policymix: ChoiceSignals | None = None


class Completion(_Open):
    id: str
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    policymix: Policymix | None = None

    @property
    def text(self) -> str:
        return self.choices[0].text


class CompletionChunk(Completion):
    pass


class Message(_Open):
    role: str | None = None
    content: str | None = None


class ChatChoice(_Open):
    index: int
    message: Message
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    policymix: ChoiceSignals | None = None


class ChatCompletion(_Open):
    id: str
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    policymix: Policymix | None = None

    @property
    def content(self) -> str:
        return self.choices[0].message.content or ""


class ChatChunkChoice(_Open):
    index: int
    delta: Message
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Open):
    id: str
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    policymix: Policymix | None = None


class ModelInfo(_Open):
    id: str
    max_model_len: int | None = None
    policymix: dict[str, Any] = {}

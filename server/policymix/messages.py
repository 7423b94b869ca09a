"""Chat messages as every part of a request carries them: top-level ``messages``, prompt variants'
``messages`` and guidance's negative prompt. One typed model, so nested conversations get the same
rules (and the same 400 naming the field) as the request's own.

Tool turns are OpenAI's: an assistant message with ``tool_calls`` (``arguments`` a JSON text) and a
``tool`` message with ``tool_call_id`` and the result as ``content``. They reach the chat template in
the shape Hugging Face templates read: ``tool_calls: [{"type": "function", "id", "function": {"name",
"arguments": <dict>}}]`` and ``{"role": "tool", "tool_call_id", "content"}``.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class MessageFunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text of an object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            parsed = json.loads(v) if v.strip() else {}
        except (ValueError, RecursionError):
            raise ValueError("arguments must be JSON text of an object") from None
        if not isinstance(parsed, dict):
            raise ValueError("arguments must be JSON text of an object")
        return v


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: MessageFunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None  # assistant only
    tool_call_id: str | None = Field(default=None, validate_default=True)  # tool only: the call it answers

    @field_validator("tool_calls", mode="after")
    @classmethod
    def _calls_on_assistant(cls, v, info: ValidationInfo):
        if v is not None and info.data.get("role") != "assistant":
            raise ValueError("only an assistant message carries tool calls")
        return v

    @field_validator("tool_call_id", mode="after")
    @classmethod
    def _id_on_tool(cls, v, info: ValidationInfo):
        role = info.data.get("role")
        if role == "tool" and not v:
            raise ValueError("a tool message names the call it answers (tool_call_id)")
        if role not in (None, "tool") and v is not None:
            raise ValueError("only a tool message answers a call")
        return v

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """What a chat template renders: role and text content, and tool turns in HF templates' shape."""
        out: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", **({"id": c.id} if c.id else {}),
                 "function": {"name": c.function.name,
                              "arguments": json.loads(c.function.arguments) if c.function.arguments.strip() else {}}}
                for c in self.tool_calls]
        if self.role == "tool":
            out["tool_call_id"] = self.tool_call_id
            if self.name:
                out["name"] = self.name
        return out

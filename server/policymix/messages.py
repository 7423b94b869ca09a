"""Chat messages as every part of a request carries them: top-level ``messages``, prompt variants'
``messages`` and guidance's negative prompt. One typed model, so nested conversations get the same
rules (and the same 400 naming the field) as the request's own."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)

    def as_dict(self) -> dict[str, Any]:
        """What a chat template renders: role and text content."""
        return {"role": self.role, "content": self.text()}

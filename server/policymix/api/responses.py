"""``POST /v1/responses``: the Responses API, text subset, stateless, served through the chat path.

A request becomes a chat request (``instructions`` as a system message, then ``input``: a string or
messages; ``max_output_tokens``; ``temperature``; ``top_p``; ``text.format`` as ``response_format``;
function ``tools`` and ``tool_choice``; the ``mixture`` extension and ``speculative``, ``seed``,
``structured_outputs``), so it is
planned, guarded and run exactly as chat is; the events are shaped as a ``response`` object or as the
Responses stream (``response.created`` ... ``response.completed``, each with its ``sequence_number``).
Nothing is stored: ``store: true``, ``previous_response_id`` and ``conversation`` are 400s naming the
field, as are the Responses fields this server does not serve (``unserved.RESPONSES``).
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING, Any, Iterator, Literal

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ..errors import PolicymixError
from . import shapes, unserved
from .errors import ApiError, _validation_error
from .protocol import ChatCompletionRequest, _Part, _Request
from .serving import chat_prompt

if TYPE_CHECKING:
    from .auth import ApiKey
    from .serving import Job, Serving


class InputText(_Part):
    type: Literal["input_text", "output_text", "text"]
    text: str


class InputMessage(_Part):
    type: Literal["message"] | None = None
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[InputText]


class ResponsesRequest(_Request):
    model: str
    input: str | list[InputMessage] = Field(min_length=1)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    text: dict[str, Any] | None = None  # {"format": {"type": "text" | "json_object" | "json_schema", ...}}
    tools: list[dict[str, Any]] | None = None  # function tools: {"type": "function", "name", "parameters", ...}
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    stream: bool | None = False
    store: bool | None = None
    previous_response_id: str | None = None
    user: str | None = None
    # extensions, as on chat
    seed: int | None = None
    mixture: str | dict[str, Any] | None = None
    speculative: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None  # vLLM's options (disable_any_whitespace), as on chat

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved(cls, body: Any) -> Any:
        return unserved.refuse_unserved(body, unserved.RESPONSES)


_RENAMED = {"response_format": "text.format", "max_tokens": "max_output_tokens", "messages": "input"}


def _param(p: str | None) -> str | None:
    if p is None:
        return None
    head, dot, rest = p.partition(".")
    return _RENAMED.get(head, head) + dot + rest if head in _RENAMED else p


def chat_body(body: ResponsesRequest) -> dict[str, Any]:
    """The chat request that serves ``body``."""
    if body.store:
        raise ApiError(400, "store: this server is stateless and stores no response", param="store")
    if body.previous_response_id is not None:
        raise ApiError(400, "previous_response_id: this server is stateless; send the conversation as input",
                       param="previous_response_id")
    messages = [{"role": "system", "content": body.instructions}] if body.instructions else []
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
    else:
        for m in body.input:
            text = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
            messages.append({"role": m.role, "content": text})
    out: dict[str, Any] = {"model": body.model, "messages": messages}
    for name in ("temperature", "top_p", "seed", "mixture", "parallel_tool_calls", "user", "structured_outputs"):
        if getattr(body, name) is not None:
            out[name] = getattr(body, name)
    if "speculative" in body.model_fields_set:
        out["speculative"] = body.speculative
    if body.max_output_tokens is not None:
        out["max_tokens"] = body.max_output_tokens
    fmt = (body.text or {}).get("format")
    if fmt is not None:
        if not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object", "json_schema"):
            raise ApiError(400, "text.format: type must be text, json_object or json_schema", param="text.format")
        if fmt["type"] == "json_schema":
            out["response_format"] = {"type": "json_schema", "json_schema": {
                "name": fmt.get("name"), "schema": fmt.get("schema"), "strict": fmt.get("strict")}}
        else:
            out["response_format"] = {"type": fmt["type"]}
    if body.tools is not None:
        tools = []
        for i, t in enumerate(body.tools):
            if t.get("type") != "function":
                raise ApiError(400, f"tools.{i}.type: only function tools are served", param=f"tools.{i}.type")
            tools.append({"type": "function", "function": {k: t[k] for k in ("name", "description", "parameters",
                                                                              "strict") if k in t}})
        out["tools"] = tools
    choice = body.tool_choice
    if isinstance(choice, dict):
        if choice.get("type") != "function" or "name" not in choice:
            raise ApiError(400, "tool_choice: a named function is {\"type\": \"function\", \"name\": ...}",
                           param="tool_choice")
        choice = {"type": "function", "function": {"name": choice["name"]}}
    if choice is not None:
        out["tool_choice"] = choice
    return out


async def respond(serving: "Serving", body: ResponsesRequest, key: "ApiKey | None", http: Request) -> Response:
    try:
        chat = ChatCompletionRequest.model_validate(chat_body(body))
        prompt = chat_prompt(chat)
        job = serving._prepare(chat, key, [prompt], _Responses(body), chat.max_tokens, None, "resp")
    except ValidationError as err:
        raise _renamed(_validation_error(list(err.errors()))) from None
    except PolicymixError as err:
        raise _renamed(err) from None
    job.stream = bool(body.stream)
    return await serving._respond(job, http)


def _renamed(err: PolicymixError) -> PolicymixError:
    new = _param(err.param)
    if new != err.param:
        err.message = err.message.replace(err.param, new, 1)
        err.param = new
    return err


# ------------------------------------------------------------------------------------------- shapes


class ResponseBody(BaseModel):
    """A ``response`` object, built as a dict (its fields: ``_Responses.envelope``)."""

    model_config = ConfigDict(extra="allow")


class _Responses:
    """Engine events as a ``response`` object (``response``) or as the Responses stream (``stream_writer``)."""

    def __init__(self, body: ResponsesRequest):
        self.body = body
        self.msg_id = f"msg_{uuid.uuid4().hex}"

    def envelope(self, job: "Job", status: str, output: list, usage: dict | None = None, **extra) -> dict:
        b = self.body
        tools = [{"type": "function", "name": t.get("name"), "description": t.get("description"),
                  "parameters": t.get("parameters"), "strict": t.get("strict")} for t in (b.tools or [])]
        return {"id": job.response_id, "object": "response", "created_at": job.created, "status": status,
                "model": job.model, "output": output, "parallel_tool_calls": b.parallel_tool_calls is not False,
                "tool_choice": b.tool_choice or ("auto" if b.tools else "none"), "tools": tools,
                "temperature": b.temperature, "top_p": b.top_p, "max_output_tokens": b.max_output_tokens,
                "instructions": b.instructions, "text": b.text or {"format": {"type": "text"}}, "error": None,
                "incomplete_details": None, "metadata": {}, "store": False, "usage": usage, **extra}

    @staticmethod
    def usage(acc: shapes.Accumulator) -> dict:
        u = acc.usage()
        return {"input_tokens": u.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": u.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": u.total_tokens}

    def items(self, job: "Job", text: str) -> list[dict]:
        """The output items of a finished text: tool calls, or one assistant message."""
        calls = job.tool_calls.calls(0, text) if job.tool_calls is not None else None
        if calls is not None:
            return [{"type": "function_call", "id": f"fc_{c.id.removeprefix('call_')}", "call_id": c.id,
                     "name": c.function.name, "arguments": c.function.arguments, "status": "completed"}
                    for c in calls]
        return [self.message(text, "completed")]

    def message(self, text: str | None, status: str) -> dict:
        content = [] if text is None else [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]
        return {"type": "message", "id": self.msg_id, "status": status, "role": "assistant", "content": content}

    def finished(self, job: "Job", acc: shapes.Accumulator, texts, text: str, finish: str) -> dict:
        extra = {}
        status = "completed"
        if finish == "length":
            status, extra["incomplete_details"] = "incomplete", {"reason": "max_output_tokens"}
        per = shapes.choice_extensions(job, acc, texts)
        return self.envelope(job, status, self.items(job, text), self.usage(acc),
                             policymix=shapes.extension(job, acc, per).model_dump(mode="json"), **extra)

    def response(self, job: "Job", acc: shapes.Accumulator, texts) -> "ResponseBody":
        (seq,) = acc.dones[0].sequences
        return ResponseBody(**self.finished(job, acc, texts, seq.text, seq.finish_reason))

    def stream_writer(self, job: "Job", acc: shapes.Accumulator, texts) -> "_ResponsesStream":
        return _ResponsesStream(job, acc, texts, self)


class _ResponsesStream(shapes.StreamWriter):
    """OpenAI's Responses events: created, in_progress, the message item and its text deltas (tool calls: their
    items once the call is complete), the done events, completed."""

    def __init__(self, job, acc, texts, shape: _Responses):
        super().__init__(job, acc, texts)
        self.shape, self.seq, self.text = shape, 0, ""

    def ev(self, type_: str, **fields) -> dict:
        self.seq += 1
        return {"type": type_, "sequence_number": self.seq - 1, **fields}

    def start(self) -> Iterator[Any]:
        pending = self.shape.envelope(self.job, "in_progress", [])
        yield self.ev("response.created", response=pending)
        yield self.ev("response.in_progress", response=pending)
        if self.job.tool_calls is None:
            yield self.ev("response.output_item.added", output_index=0, item=self.shape.message(None, "in_progress"))
            yield self.ev("response.content_part.added", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})

    def token(self, idx: int, ev) -> Iterator[Any]:
        self.text += ev.text
        if self.job.tool_calls is None and ev.text:
            yield self.ev("response.output_text.delta", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          delta=ev.text, logprobs=[])

    def final(self, idx, seq, ext, top) -> Iterator[Any]:
        done = self.shape.finished(self.job, self.acc, self.texts, self.text, seq.finish_reason)
        items = done["output"]
        if self.job.tool_calls is not None and items[0]["type"] == "message":  # calls that did not parse: the text
            yield self.ev("response.output_item.added", output_index=0, item=self.shape.message(None, "in_progress"))
            yield self.ev("response.content_part.added", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          part={"type": "output_text", "text": "", "annotations": [], "logprobs": []})
            yield self.ev("response.output_text.delta", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          delta=self.text, logprobs=[])
        if items[0]["type"] == "message":
            part = items[0]["content"][0]
            yield self.ev("response.output_text.done", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          text=self.text, logprobs=[])
            yield self.ev("response.content_part.done", item_id=self.shape.msg_id, output_index=0, content_index=0,
                          part=part)
            yield self.ev("response.output_item.done", output_index=0, item=items[0])
        else:
            for i, item in enumerate(items):
                yield self.ev("response.output_item.added", output_index=i,
                              item={**item, "arguments": "", "status": "in_progress"})
                if item["type"] == "function_call":
                    yield self.ev("response.function_call_arguments.delta", item_id=item["id"], output_index=i,
                                  delta=item["arguments"])
                    yield self.ev("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                  name=item["name"], arguments=item["arguments"])
                yield self.ev("response.output_item.done", output_index=i, item=item)
        yield self.ev("response.completed" if done["status"] == "completed" else "response.incomplete", response=done)

    def finish(self) -> Iterator[Any]:
        return iter(())

"""Structured outputs and tool calls at the API boundary: request fields -> one engine Constraint, and the
constrained text -> ``tool_calls``.

Where a constraint can come from (one per request, as vLLM; two are a 400 naming the second):
``response_format`` (``json_object``, ``json_schema``; ``text`` is no constraint), vLLM's
``structured_outputs`` (``json``, ``regex``, ``choice``, ``grammar``, ``json_object``; its
``disable_any_whitespace`` also applies to ``response_format``), the older ``guided_json``,
``guided_regex``, ``guided_choice``, ``guided_grammar``, and chat ``tools`` with ``tool_choice``:

- a named function: the output is the function's arguments, constrained to its ``parameters`` schema;
- ``"required"``: the output is a JSON array of ``{"name", "parameters"}`` calls (at least one; exactly
  one with ``parallel_tool_calls: false``), each constrained to its function's schema;
- ``"none"``: no constraint, no tool call;
- ``"auto"`` (OpenAI's default with tools) is refused with a 400 naming ``tool_choice``: the model's own
  tool-call format is not parsed.

The tool definitions are not rendered into the prompt (the chat template is not given them): the
constraint alone makes the call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from typing import Any

from ..engine.protocol import Constraint
from .errors import ApiError
from .protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall, ToolCallDelta, _Common


@dataclass
class ToolCalls:
    """How a chat request's constrained output becomes ``tool_calls``."""

    name: str | None  # a named function: the output is its arguments; None: "required", an array of calls
    ids: dict[int, list[str]]  # choice index -> the ids of its calls (made once, so a stream and its end agree)

    def call_id(self, choice: int, k: int) -> str:
        ids = self.ids.setdefault(choice, [])
        while len(ids) <= k:
            ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return ids[k]

    def calls(self, choice: int, text: str) -> list[ToolCall] | None:
        """The tool calls of a finished choice's text; None when it does not parse (cut at max_tokens)."""
        if self.name is not None:
            return [ToolCall(id=self.call_id(choice, 0), function=FunctionCall(name=self.name, arguments=text))]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list) or not all(isinstance(x, dict) and "name" in x for x in items):
            return None
        return [ToolCall(id=self.call_id(choice, k), function=FunctionCall(
                    name=x["name"], arguments=json.dumps(x.get("parameters", {}), ensure_ascii=False)))
                for k, x in enumerate(items)]

    def deltas(self, choice: int, text: str, first: bool) -> list[ToolCallDelta]:
        """A named function's streamed arguments: the first piece carries the call's id, type and name."""
        if first:
            return [ToolCallDelta(index=0, id=self.call_id(choice, 0), type="function",
                                  function=FunctionCall(name=self.name, arguments=text))]
        return [ToolCallDelta(index=0, function=FunctionCall(arguments=text))]


def _object_schema(params: dict[str, Any] | None) -> dict[str, Any]:
    return params if params else {"type": "object", "properties": {}}


def _tools(body: ChatCompletionRequest, any_ws: bool) -> tuple[Constraint | None, ToolCalls | None]:
    tools, choice = body.tools, body.tool_choice
    if not tools:
        if choice is not None and choice != "none":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        if body.parallel_tool_calls is not None:
            raise ApiError(400, "parallel_tool_calls needs tools", param="parallel_tool_calls")
        return None, None
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tools: two functions have the same name", param="tools")
    if choice is None or choice == "auto":
        raise ApiError(400, "tool_choice 'auto' (the default with tools) is not served: the model's own tool-call "
                       "format is not parsed; use tool_choice 'required' or a named function", param="tool_choice")
    if choice == "none":
        return None, None
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise ApiError(400, f"tool_choice names function {choice.function.name!r}, which is not in tools",
                           param="tool_choice")
        fn = tools[names.index(choice.function.name)].function
        return Constraint("json", _object_schema(fn.parameters), any_ws, "tool_choice"), ToolCalls(fn.name, {})
    calls = [{"type": "object", "properties": {"name": {"const": t.function.name},
                                               "parameters": _object_schema(t.function.parameters)},
              "required": ["name", "parameters"]} for t in tools]
    schema: dict[str, Any] = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
                              "minItems": 1}
    if body.parallel_tool_calls is False:
        schema["maxItems"] = 1
    return Constraint("json", schema, any_ws, "tool_choice"), ToolCalls(None, {})


def constraint_of(body: _Common) -> tuple[Constraint | None, ToolCalls | None]:
    """The request's one constraint (or None) and, for chat tools, how its output becomes tool_calls."""
    found: list[Constraint] = []
    so = body.structured_outputs
    any_ws = not (so is not None and so.disable_any_whitespace)
    rf = body.response_format
    if rf is not None and rf.type == "json_object":
        found.append(Constraint("json_object", None, any_ws, "response_format"))
    elif rf is not None and rf.type == "json_schema":
        if rf.json_schema is None:
            raise ApiError(400, "response_format json_schema needs its json_schema object (with a schema)",
                           param="response_format.json_schema")
        found.append(Constraint("json", rf.json_schema.json_schema, any_ws, "response_format"))
    if so is not None:
        for name in ("whitespace_pattern", "structural_tag"):
            if getattr(so, name) is not None:
                raise ApiError(400, f"structured_outputs.{name} is not served", param=f"structured_outputs.{name}")
        for kind, value in (("json", so.json_), ("regex", so.regex), ("choice", so.choice),
                            ("grammar", so.grammar), ("json_object", so.json_object or None)):
            if value is not None:
                found.append(Constraint(kind, None if kind == "json_object" else value, any_ws,
                                        f"structured_outputs.{kind}"))
    for kind, name in (("json", "guided_json"), ("regex", "guided_regex"), ("choice", "guided_choice"),
                       ("grammar", "guided_grammar")):
        value = getattr(body, name)
        if value is not None:
            found.append(Constraint(kind, value, any_ws, name))
    tool_calls = None
    if isinstance(body, ChatCompletionRequest):
        tool_constraint, tool_calls = _tools(body, any_ws)
        if tool_constraint is not None:
            found.append(tool_constraint)
    if len(found) > 1:
        raise ApiError(400, f"{found[1].param}: one structured-output constraint per request, and "
                       f"{found[0].param} is already one", param=found[1].param)
    c = found[0] if found else None
    if c is not None and c.kind == "json" and isinstance(c.spec, str):
        try:
            c.spec = json.loads(c.spec)
        except ValueError:
            raise ApiError(400, f"{c.param}: the schema is not valid JSON", param=c.param) from None
    return c, tool_calls

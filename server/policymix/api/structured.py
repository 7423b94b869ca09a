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
- ``"auto"`` (OpenAI's default with tools): the tools render through the model's chat template
  (``apply_chat_template(..., tools=...)``), the output is unconstrained, and the model's own tool-call
  format is parsed from it: the Hermes/Qwen ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
  format. A template that does not render the tools (no ``tools`` in its source, or the same text with and
  without them) or does not write that format (no ``<tool_call>`` in its source) gets a 400 naming
  ``tool_choice``: SmolLM2-135M-Instruct's template is one (it has no tool support). With
  ``parallel_tool_calls: false`` generation stops at the first ``</tool_call>`` (at most one call).

For ``required`` and a named function the tool definitions are not rendered into the prompt: the
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


TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"


@dataclass
class ToolCalls:
    """How a chat request's output becomes ``tool_calls``."""

    name: str | None  # a named function: the output is its arguments; None: "required", an array of calls
    ids: dict[int, list[str]]  # choice index -> the ids of its calls (made once, so a stream and its end agree)
    auto: bool = False  # "auto": unconstrained text, the model's <tool_call> blocks parsed out of it
    names: tuple[str, ...] = ()  # auto: the functions a parsed call may name

    def call_id(self, choice: int, k: int) -> str:
        ids = self.ids.setdefault(choice, [])
        while len(ids) <= k:
            ids.append(f"call_{uuid.uuid4().hex[:24]}")
        return ids[k]

    def split(self, choice: int, text: str) -> tuple[str | None, list[ToolCall] | None]:
        """auto: (content, calls) of a finished choice's text (content None when empty; calls None when none)."""
        content, parsed = parse_tool_calls(text, self.names)
        if not parsed:
            return text, None
        return content or None, [ToolCall(id=self.call_id(choice, k), function=FunctionCall(name=n, arguments=a))
                                 for k, (n, a) in enumerate(parsed)]

    def calls(self, choice: int, text: str) -> list[ToolCall] | None:
        """The tool calls of a finished choice's text; None when it does not parse (cut at max_tokens)."""
        if self.auto:
            return self.split(choice, text)[1]
        if self.name is not None:
            return [ToolCall(id=self.call_id(choice, 0), function=FunctionCall(name=self.name, arguments=text))]
        try:
            items = json.loads(text)
        except ValueError:
            return None
        if not isinstance(items, list) or not all(isinstance(x, dict) and "name" in x for x in items):
            return None
        scan = RequiredScanner()
        scan.feed(text)
        raw = scan.args if len(scan.args) == len(items) else [None] * len(items)  # the text as written (streamed)
        return [ToolCall(id=self.call_id(choice, k), function=FunctionCall(
                    name=x["name"], arguments=raw[k] or json.dumps(x.get("parameters", {}), ensure_ascii=False)))
                for k, x in enumerate(items)]

    def required_deltas(self, choice: int, events: list[tuple[int, str | None, str | None]]) -> list[ToolCallDelta]:
        """``required``'s streamed calls: a call's first delta carries its id, type and name, then its arguments."""
        return [ToolCallDelta(index=k, id=self.call_id(choice, k), type="function",
                              function=FunctionCall(name=name, arguments=""))
                if name is not None else ToolCallDelta(index=k, function=FunctionCall(arguments=piece))
                for k, name, piece in events]

    def deltas(self, choice: int, text: str, first: bool) -> list[ToolCallDelta]:
        """A named function's streamed arguments: the first piece carries the call's id, type and name."""
        if first:
            return [ToolCallDelta(index=0, id=self.call_id(choice, 0), type="function",
                                  function=FunctionCall(name=self.name, arguments=text))]
        return [ToolCallDelta(index=0, function=FunctionCall(arguments=text))]


class RequiredScanner:
    """Reads ``"required"``'s array ``[{"name": ..., "parameters": {...}}, ...]`` as it is written: each call's
    name once its string closes, then its ``parameters`` value piece by piece (the raw JSON text, which is
    also what the finished response returns as ``arguments``). ``feed`` returns ``(k, name, None)`` when
    call k's name is known and ``(k, None, piece)`` for its arguments text (after the name)."""

    def __init__(self) -> None:
        self.depth = 0
        self.in_str = self.esc = False
        self.raw: str | None = None  # a string at the call object's level, being read
        self.key: str | None = None
        self.expect_key = True
        self.args_pending = self.args_on = False
        self.names: list[str | None] = []
        self.args: list[str] = []
        self.pending: list[str] = []  # arguments read before the call's name (sent once it is known)

    def feed(self, text: str) -> list[tuple[int, str | None, str | None]]:
        out: list[tuple[int, str | None, str | None]] = []
        piece = []
        for c in text:
            if self.args_pending and not c.isspace():
                self.args_pending, self.args_on = False, True
            k = len(self.names) - 1
            if self.in_str:
                if self.esc:
                    self.esc = False
                elif c == "\\":
                    self.esc = True
                elif c == '"':
                    self.in_str = False
                    if self.raw is not None and not self.args_on:
                        try:
                            value = json.loads(f'"{self.raw}"')
                        except ValueError:
                            value = self.raw
                        self.raw = None
                        if self.expect_key:
                            self.key = value
                        elif self.key == "name" and self.names[k] is None:
                            self.names[k] = value
                            out.append((k, value, None))
                            if self.pending[k]:
                                out.append((k, None, self.pending[k]))
                                self.pending[k] = ""
                if self.raw is not None and self.in_str:
                    self.raw += c
            elif c == '"':
                self.in_str = True
                if self.depth == 2 and not self.args_on:
                    self.raw = ""
            elif c in "[{":
                self.depth += 1
                if self.depth == 2 and c == "{":
                    self.names.append(None)
                    self.args.append("")
                    self.pending.append("")
                    self.expect_key, self.key = True, None
            elif c in "]}":
                self.depth -= 1
            elif self.depth == 2 and c == ":":
                self.expect_key = False
                self.args_pending = self.key == "parameters"
            elif self.depth == 2 and c == ",":
                self.expect_key, self.key = True, None
            if self.args_on:
                piece.append(c)
                if self.depth == 2:  # the parameters value closed
                    self.args_on = False
                    self._args(k, "".join(piece), out)
                    piece = []
        if piece:
            self._args(len(self.names) - 1, "".join(piece), out)
        return out

    def _args(self, k: int, text: str, out: list) -> None:
        self.args[k] += text
        if self.names[k] is None:
            self.pending[k] += text
        else:
            out.append((k, None, text))


def _parse_call(body: str, names: tuple[str, ...]) -> tuple[str, str] | None:
    try:
        obj = json.loads(body)
    except (ValueError, RecursionError):
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or (names and obj["name"] not in names):
        return None
    args = obj.get("arguments", obj.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as JSON text
        try:
            args = json.loads(args) if args.strip() else {}
        except (ValueError, RecursionError):
            return None
    if not isinstance(args, dict):
        return None
    return obj["name"], json.dumps(args, ensure_ascii=False)


def parse_tool_calls(text: str, names: tuple[str, ...] = ()) -> tuple[str, list[tuple[str, str]]]:
    """The Hermes/Qwen tool-call format: ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks
    (the last may be unclosed: stopped at ``</tool_call>`` or at the end of the text). Returns (content,
    [(name, arguments JSON)]): content is the text outside the blocks, without the whitespace next to a
    block, pieces on either side of one joined by a newline. A block that is not a call (not JSON, no name,
    a function not in ``names``, arguments not an object) means no calls: the whole text is content, as
    written."""
    calls: list[tuple[str, str]] = []
    parts: list[str] = []
    pos = 0
    while True:
        start = text.find(TOOL_OPEN, pos)
        if start < 0:
            parts.append(text[pos:].lstrip() if calls else text[pos:])
            break
        before = text[pos:start]
        parts.append(before.strip() if calls else before.rstrip())
        end = text.find(TOOL_CLOSE, start)
        call = _parse_call(text[start + len(TOOL_OPEN): end if end >= 0 else len(text)], names)
        if call is None:
            return text, []
        calls.append(call)
        if end < 0:
            break
        pos = end + len(TOOL_CLOSE)
    return ("\n".join(p for p in parts if p) if calls else text), calls


def stream_safe(text: str) -> int:
    """auto streaming: how much of ``text`` can go out as content now: none from a ``<tool_call>`` (or what may
    be its start) on, and no trailing whitespace (it is dropped if a call follows)."""
    start = text.find(TOOL_OPEN)
    if start < 0:
        start = len(text)
        for k in range(min(len(TOOL_OPEN) - 1, len(text)), 0, -1):
            if text.endswith(TOOL_OPEN[:k]):
                start = len(text) - k
                break
    return len(text[:start].rstrip())


def check_auto_template(tok: Any, tools: list[dict[str, Any]]) -> None:
    """tool_choice auto needs a chat template that renders the tools and writes the <tool_call> format."""
    template = getattr(tok, "chat_template", None)
    source = "\n".join(template.values()) if isinstance(template, dict) else template or ""
    why = None
    if not source:
        why = "the model has no chat template"
    elif "tools" not in source:
        why = "the model's chat template does not render tools"
    elif TOOL_OPEN not in source:
        why = f"the model's chat template does not use the {TOOL_OPEN} format (the one tool-call format parsed)"
    else:
        probe = [{"role": "user", "content": "hi"}]
        try:
            with_tools = tok.apply_chat_template(probe, tools=tools, add_generation_prompt=True, tokenize=False)
            without = tok.apply_chat_template(probe, add_generation_prompt=True, tokenize=False)
        except Exception as exc:
            why = f"the model's chat template fails on tools ({type(exc).__name__}: {exc})"
        else:
            if with_tools == without:
                why = "the model's chat template renders the same text with and without tools"
    if why is not None:
        raise ApiError(400, f"tool_choice 'auto' (the default with tools) needs a chat template with tool "
                       f"support: {why}; use tool_choice 'required' or a named function", param="tool_choice")


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
    if choice is None or choice == "auto":  # the template is checked once the tokenizer is known (serving)
        return None, ToolCalls(None, {}, auto=True, names=tuple(names))
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

"""POST /v1/responses through the OpenAI SDK (``responses.create``, ``responses.parse``, ``responses.stream``) on
the tiny models: text, text.format under a mixture, function tools, and the stateless refusals."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from api_helpers import LiveServer
from policymix.api import build_app

COMPACT = {"structured_outputs": {"disable_any_whitespace": True}}
MIX = {"mixture": {"weights": {"dpo": 1.5, "base": -0.5}}}


class Item(BaseModel):
    name: str = Field(pattern=r"^[a-z]{1,6}$")
    n: int = Field(ge=0, le=9)


TOOLS = [{"type": "function", "name": "get", "strict": True, "parameters": {
    "type": "object", "properties": {"ok": {"type": "boolean"}, "k": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["ok", "k"], "additionalProperties": False}}]


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.engine.native import NativeEngine

    with LiveServer(build_app(NativeEngine(tiny_registry), tiny_config, env={})) as srv:
        yield srv


@pytest.fixture(scope="module")
def sdk(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120)


def test_create_text_matches_chat(sdk):
    """The same request as chat (instructions = the system message) gives the same greedy text and usage."""
    r = sdk.responses.create(model="base", instructions="Be brief.", input="Hello world", max_output_tokens=8,
                             temperature=0)
    chat = sdk.chat.completions.create(model="base", max_tokens=8, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world"}])
    assert r.object == "response" and r.output_text == chat.choices[0].message.content
    assert r.status == "incomplete" and r.incomplete_details.reason == "max_output_tokens"
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == 8
    assert r.model_extra["policymix"]["weights"] == {"base": 1.0}
    msgs = sdk.responses.create(model="base", input=[{"role": "system", "content": "Be brief."},
                                                     {"role": "user", "content": [{"type": "input_text",
                                                                                   "text": "Hello world"}]}],
                                max_output_tokens=8, temperature=0)
    assert msgs.output_text == r.output_text


def test_parse_and_stream_with_text_format_under_a_mixture(sdk):
    r = sdk.responses.parse(model="base", input="Hi", text_format=Item, max_output_tokens=100, temperature=1.0,
                            extra_body={**COMPACT, **MIX, "seed": 4})
    assert r.status == "completed" and isinstance(r.output_parsed, Item)
    assert r.model_extra["policymix"]["weights"] == {"dpo": 1.5, "base": -0.5}
    with sdk.responses.stream(model="base", input="Hi", text_format=Item, max_output_tokens=100, temperature=1.0,
                              extra_body={**COMPACT, **MIX, "seed": 4}) as s:
        events = [e.type for e in s]
        final = s.get_final_response()  # the SDK's accumulator checked every item's identity
    assert events[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                          "response.content_part.added"]
    assert events[-1] == "response.completed" and "response.output_text.delta" in events
    assert final.output_text == r.output_text and final.output_parsed == r.output_parsed  # seeded: the same


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "name": "get"}], ids=["required", "named"])
def test_function_tools(sdk, stream, choice):
    kw = dict(model="base", input="Hi", tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              max_output_tokens=80, temperature=1.0, extra_body={**COMPACT, "seed": 2})
    if stream:
        with sdk.responses.stream(**kw) as s:
            events = [e.type for e in s]
            r = s.get_final_response()
        assert "response.function_call_arguments.done" in events
    else:
        r = sdk.responses.create(**kw)
    (call,) = r.output
    assert r.status == "completed" and call.type == "function_call" and call.name == "get"
    assert call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), TOOLS[0]["parameters"])


@pytest.mark.parametrize("extra,param", [
    ({"store": True}, "store"), ({"previous_response_id": "resp_1"}, "previous_response_id"),
    ({"background": True}, "background"), ({"conversation": "c"}, "conversation"),
    ({"top_logprobs": 2}, "top_logprobs"), ({"tools": TOOLS}, "tool_choice"),
    ({"tools": [{"type": "web_search"}], "tool_choice": "required"}, "tools.0.type"),
    ({"max_output_tokens": 0}, "max_output_tokens"),
    ({"guided_regex": "a"}, "guided_regex"), ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"text": {"format": {"type": "grammar"}}}, "text.format"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}},
      "tools": TOOLS, "tool_choice": "required"}, "tool_choice"),  # two constraints
])
def test_refusals_name_the_field(server, extra, param):
    r = httpx.post(f"{server.url}/v1/responses", json={"model": "base", "input": "hi", "max_output_tokens": 4,
                                                       **extra})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param

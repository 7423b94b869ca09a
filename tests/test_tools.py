"""tool_choice "auto" and tool turns: the chat template renders the tools and the conversation's tool turns,
and the model's Hermes/Qwen ``<tool_call>`` blocks come back as OpenAI ``tool_calls``.

A random tiny model never writes a ``<tool_call>``, so: the parser is tested on strings; the tiny model
(under a Hermes-style template written here) shows the tools and tool turns reach the rendered prompt; the
scripted engine writes a ``<tool_call>`` and the real OpenAI SDK, against a live uvicorn server, receives
``tool_calls``, streamed and not.
"""

from __future__ import annotations

import json
import random

import openai
import pytest

from api_helpers import LiveServer, live_fake
from fake_engine import CharTokenizer, FakeEngine
from policymix.api import build_app
from policymix.api.errors import ApiError
from policymix.api.structured import RequiredScanner, check_auto_template, parse_tool_calls, stream_safe
from policymix.errors import PolicymixError
from policymix.messages import ChatMessage
from policymix.registry import render_chat

# a minimal Hermes-style template (Qwen2.5's conventions): tools in the system turn, calls as <tool_call> blocks
TOOLS_TEMPLATE = (
    "{% if tools %}<|system|>Tools:{% for t in tools %} {{ t['function'] | tojson }}{% endfor %}"
    " Call one as <tool_call>{\"name\": ..., \"arguments\": ...}</tool_call></s>{% endif %}"
    "{% for m in messages %}"
    "{% if m['role'] == 'tool' %}<|tool|><tool_response>{{ m['content'] }}</tool_response></s>"
    "{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{\"name\": \"{{ c['function']['name'] }}\", "
    "\"arguments\": {{ c['function']['arguments'] | tojson }}}</tool_call>{% endfor %}</s>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WEATHER = {"type": "function", "function": {"name": "weather", "description": "The weather of a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "time", "parameters": {"type": "object", "properties": {}}}}
CHAT = [{"role": "user", "content": "Weather in Paris?"}]
TURNS = [  # a finished call and its result, in OpenAI's shapes
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21C"},
]


# ---------------------------------------------------------------------------------------------- the parser


def test_parse_hermes_calls():
    one = '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert parse_tool_calls(one) == ("", [("weather", '{"city": "Paris"}')])
    two = ('Let me check. <tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>\n'
           '<tool_call>{"name": "time", "arguments": "{}"}</tool_call> Done.')
    assert parse_tool_calls(two, ("weather", "time")) == (
        "Let me check.\nDone.", [("weather", '{"city": "Paris"}'), ("time", "{}")])
    # stopped at </tool_call> (parallel_tool_calls false) or at EOS: the last block may be unclosed
    assert parse_tool_calls('<tool_call>{"name": "time", "parameters": {}}') == ("", [("time", "{}")])
    assert parse_tool_calls("no call here") == ("no call here", [])


@pytest.mark.parametrize("text", [
    '<tool_call>{"name": "weather", "arguments": {"city": </tool_call>',  # not JSON
    '<tool_call>{"arguments": {}}</tool_call>',  # no name
    '<tool_call>{"name": "ghost", "arguments": {}}</tool_call>',  # not a declared function
    '<tool_call>{"name": "time", "arguments": [1]}</tool_call>',  # arguments not an object
    'ok <tool_call>{"name": "time", "arguments": {}}</tool_call><tool_call>oops</tool_call>',
])
def test_text_that_is_not_a_call_stays_content(text):
    assert parse_tool_calls(text, ("weather", "time")) == (text, [])


def test_streamed_content_is_a_prefix_of_the_final_content():
    """What the auto stream sends as it goes (stream_safe) is always a prefix of the final content, and never
    holds a piece of a <tool_call> tag, for every way of cutting the text into tokens."""
    texts = ['Sure.  \n<tool_call>{"name": "time", "arguments": {}}</tool_call>\nBye',
             "Plain answer with a < sign and <tool no call. ", "<tool_call>{bad}</tool_call>", "<tool_cal",
             'A<tool_call>{"name": "time", "arguments": {}}']
    rng = random.Random(0)
    for text in texts:
        for _ in range(30):
            sent, cuts = 0, sorted(rng.sample(range(1, len(text)), k=min(5, len(text) - 1)))
            for end in [*cuts, len(text)]:
                safe = max(sent, stream_safe(text[:end]))
                assert "<tool_" not in text[:safe]
                sent = safe
            content, calls = parse_tool_calls(text, ("time",))
            assert content.startswith(text[:sent])
            assert bool(calls) == text.startswith(("Sure", "A<"))


# ---------------------------------------------------------------------------------------- the messages


def test_tool_turns_reach_the_template_in_hf_shape():
    msgs = [ChatMessage.model_validate(m).as_dict() for m in TURNS]
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "id": "call_1", "function": {"name": "weather", "arguments": {"city": "Paris"}}}]}
    assert msgs[2] == {"role": "tool", "content": "sunny, 21C", "tool_call_id": "call_1"}


@pytest.fixture(scope="module")
def tool_tokenizer(tiny_dir, tmp_path_factory):
    """The tiny family's tokenizer under the Hermes-style template."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")
    tok.chat_template = TOOLS_TEMPLATE
    out = tmp_path_factory.mktemp("tooltok")
    tok.save_pretrained(out)
    return out


def test_templates_that_cannot_render_tool_turns_are_400_naming_messages(tiny_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "tokenizer")  # tiny_models' template: no tool calls
    msgs = [ChatMessage.model_validate(m).as_dict() for m in TURNS]
    with pytest.raises(PolicymixError) as err:
        render_chat(tok, msgs, True)
    assert err.value.param == "messages" and "weather" in str(err.value)
    tok.chat_template = "{{ raise_exception('tools are not supported') }}"
    with pytest.raises(PolicymixError) as err:
        render_chat(tok, msgs, True)
    assert err.value.param == "messages" and "tools are not supported" in str(err.value)


def test_smollm2_template_has_no_tool_support():
    """SmolLM2-135M-Instruct's template renders neither tools nor tool calls: auto is a 400 naming
    tool_choice, and an assistant tool call in the conversation a 400 naming messages."""
    from transformers import AutoTokenizer

    from policymix.embedded import smollm2_dir

    try:
        tok = AutoTokenizer.from_pretrained(smollm2_dir())
    except Exception as exc:  # the embedded model is fetched once per machine
        pytest.skip(f"SmolLM2 is not available here: {exc}")
    with pytest.raises(ApiError) as err:
        check_auto_template(tok, [WEATHER])
    assert err.value.param == "tool_choice" and "does not render tools" in str(err.value)
    with pytest.raises(PolicymixError) as err:
        render_chat(tok, [ChatMessage.model_validate(m).as_dict() for m in TURNS], True)
    assert err.value.param == "messages"


# -------------------------------------------------------------------------- the tiny model, live server


@pytest.fixture(scope="module")
def tiny_tools_server(tiny_dir, tool_tokenizer):
    from policymix.config import parse_config
    from policymix.engine.native import NativeEngine
    from policymix.registry import load_registry

    config = parse_config({"policies": {"hermes": {"path": str(tiny_dir / "base"), "tokenizer": str(tool_tokenizer)},
                                        "plain": {"path": str(tiny_dir / "base")},
                                        "rm": {"path": str(tiny_dir / "rm"), "kind": "reward"},
                                        "hermes-rm": {"path": str(tiny_dir / "rm"), "kind": "reward",
                                                      "tokenizer": str(tool_tokenizer)}},
                           "server": {"max_num_seqs": 8, "max_queue": 16}})
    engine = NativeEngine(load_registry(config))
    with LiveServer(build_app(engine, config, env={})) as srv:
        yield srv, engine


def test_auto_renders_the_tools_through_the_template(tiny_tools_server):
    srv, engine = tiny_tools_server
    sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
    kw = dict(model="hermes", messages=CHAT, tools=[WEATHER, TIME], max_tokens=4, temperature=0, seed=1)
    auto = sdk.chat.completions.create(**kw)  # no tool_choice: OpenAI's default, auto
    none = sdk.chat.completions.create(tool_choice="none", **kw)  # tools not rendered
    assert auto.choices[0].finish_reason in ("length", "stop") and auto.choices[0].message.tool_calls is None
    tok = engine.tokenizer("hermes")
    rendered = render_chat(tok, CHAT, True, [WEATHER, TIME])
    assert '"name": "weather"' in rendered and '"description": "The weather of a city"' in rendered
    assert auto.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    assert auto.usage.prompt_tokens > none.usage.prompt_tokens + 20
    # a template without tool support: auto is refused, naming tool_choice
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**{**kw, "model": "plain"}, tool_choice="auto")
    assert err.value.body["param"] == "tool_choice"
    # a mixture where one policy's template would not see the tools: refused too
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**kw, extra_body={"mixture": {"weights": {"hermes": 0.5, "plain": 0.5}}})
    assert err.value.body["param"] == "tool_choice"


def test_tool_turns_render_through_the_template(tiny_tools_server):
    srv, engine = tiny_tools_server
    sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
    r = sdk.chat.completions.create(model="hermes", messages=TURNS, tools=[WEATHER], max_tokens=3, temperature=0)
    tok = engine.tokenizer("hermes")
    msgs = [ChatMessage.model_validate(m).as_dict() for m in TURNS]
    rendered = render_chat(tok, msgs, True, [WEATHER])
    assert '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>' in rendered
    assert "<tool_response>sunny, 21C</tool_response>" in rendered
    assert r.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    import httpx

    tokenized = httpx.post(f"{srv.url}/tokenize", json={"model": "hermes", "messages": TURNS}).json()
    assert tokenized["count"] == len(tok(render_chat(tok, msgs, True), add_special_tokens=False).input_ids)
    # the plain template drops the call: a 400 naming messages, not a silently different conversation
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(model="plain", messages=TURNS, max_tokens=3)
    assert err.value.body["param"] == "messages"


def test_reward_model_reranking_renders_tool_turns(tiny_tools_server):
    srv, _ = tiny_tools_server
    sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=120)
    kw = dict(model="hermes", messages=TURNS, tools=[WEATHER], max_tokens=3, temperature=1.0, seed=3)
    r = sdk.chat.completions.create(**kw, extra_body={"best_of": 2, "rerank": {"reward_model": "hermes-rm"}})
    assert len(r.policymix["candidates"]) == 2
    # a reward model whose template drops the call: refused before generating, naming messages
    with pytest.raises(openai.BadRequestError) as err:
        sdk.chat.completions.create(**kw, extra_body={"best_of": 2, "rerank": {"reward_model": "rm"}})
    assert err.value.body["param"] == "messages"


# ------------------------------------------------------------------------ the scripted engine writes calls


CALL = '<tool_call>{"name": "weather", "arguments": {"city": "Paris"}}</tool_call>'


@pytest.fixture()
def scripted():
    eng = FakeEngine()
    eng.tokenizers[0] = CharTokenizer(tools=True)
    eng.max_len = 512
    with live_fake(eng) as srv:
        yield eng, openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)


def _check(choice, calls, content):
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == content
    got = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls]
    assert got == calls
    assert all(c.id.startswith("call_") and c.type == "function" for c in choice.message.tool_calls)
    assert len({c.id for c in choice.message.tool_calls}) == len(calls)


@pytest.mark.parametrize("stream", [False, True])
def test_sdk_receives_parsed_tool_calls(scripted, stream):
    eng, sdk = scripted
    eng.script = "Let me look. " + CALL + '<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    kw = dict(model="base", messages=CHAT, tools=[WEATHER, TIME], tool_choice="auto", max_tokens=300)
    if not stream:
        r = sdk.chat.completions.create(**kw)
        _check(r.choices[0], [("weather", {"city": "Paris"}), ("time", {})], "Let me look.")
    else:
        with sdk.chat.completions.stream(**kw) as s:
            events = list(s)
            final = s.get_final_completion()  # the SDK reassembled the tool-call deltas
        _check(final.choices[0], [("weather", {"city": "Paris"}), ("time", {})], "Let me look.")
        deltas = "".join(e.delta for e in events if e.type == "content.delta")
        assert deltas == "Let me look." and "tool_call" not in deltas
    # the tools were rendered by the template into the prompt the engine ran
    prompt = eng.tokenizers[0].decode(next(iter(eng.plans[-1].prompts.values())))
    assert prompt.startswith("<tools>weather,time</tools>")


@pytest.mark.parametrize("stream", [False, True])
def test_parallel_tool_calls_false_stops_after_one_call(scripted, stream):
    eng, sdk = scripted
    eng.script = CALL + '<tool_call>{"name": "time", "arguments": {}}</tool_call>'
    kw = dict(model="base", messages=CHAT, tools=[WEATHER, TIME], parallel_tool_calls=False, max_tokens=300)
    if stream:
        with sdk.chat.completions.stream(**kw) as s:
            r = s.get_final_completion()
    else:
        r = sdk.chat.completions.create(**kw)
    _check(r.choices[0], [("weather", {"city": "Paris"})], None)
    assert "</tool_call>" in eng.requests[-1].sampling.stop


@pytest.mark.parametrize("stream", [False, True])
def test_text_without_calls_is_content(scripted, stream):
    eng, sdk = scripted
    eng.script = "It is <b>sunny</b> <tool_ca"
    kw = dict(model="base", messages=CHAT, tools=[WEATHER], max_tokens=300)
    if stream:
        with sdk.chat.completions.stream(**kw) as s:
            r = s.get_final_completion()
    else:
        r = sdk.chat.completions.create(**kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.tool_calls is None
    assert r.choices[0].message.content == eng.script


def test_auto_without_a_tools_template_is_400_naming_tool_choice():
    eng = FakeEngine()  # CharTokenizer's template renders no tools
    with live_fake(eng) as srv:
        sdk = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="x", max_retries=0, timeout=60)
        for extra in ({}, {"tool_choice": "auto"}):
            with pytest.raises(openai.BadRequestError) as err:
                sdk.chat.completions.create(model="base", messages=CHAT, tools=[WEATHER], **extra)
            assert err.value.body["param"] == "tool_choice"


@pytest.mark.parametrize("stream", [False, True])
def test_responses_api_auto_returns_function_calls(scripted, stream):
    eng, sdk = scripted
    eng.script = "Checking. " + CALL
    tools = [{"type": "function", "name": "weather", "parameters": WEATHER["function"]["parameters"]}]
    if stream:
        with sdk.responses.stream(model="base", input="Weather in Paris?", tools=tools) as s:
            r = s.get_final_response()
    else:
        r = sdk.responses.create(model="base", input="Weather in Paris?", tools=tools)
    (item,) = r.output
    assert item.type == "function_call" and item.name == "weather" and json.loads(item.arguments) == {"city": "Paris"}
    assert r.tool_choice == "auto"


# ------------------------------------------------------------------------------- "required", streamed


def test_required_scanner_reads_calls_as_they_are_written():
    text = ('[ {"name": "weather", "parameters": {"city": "Pa\\"r}is", "days": [1, {"a": 2}]}} ,'
            '{"parameters": {}, "name": "time"}]')
    items = json.loads(text)
    for step in (1, 2, 5, len(text)):
        scan, events = RequiredScanner(), []
        for i in range(0, len(text), step):
            events += scan.feed(text[i:i + step])
        names = [(k, n) for k, n, _ in events if n is not None]
        assert names == [(0, "weather"), (1, "time")]
        for k, item in enumerate(items):
            args = "".join(p for j, n, p in events if j == k and p is not None)
            assert json.loads(args) == item["parameters"] and args == scan.args[k]
            # a call's arguments never go out before its name
            assert events.index((k, item["name"], None)) < min(i for i, e in enumerate(events) if e[0] == k and e[2])


def test_required_streams_arguments_in_pieces(scripted):
    eng, sdk = scripted
    eng.script = '[{"name": "weather", "parameters": {"city": "Paris"}}, {"name": "time", "parameters": {}}]'
    kw = dict(model="base", messages=CHAT, tools=[WEATHER, TIME], tool_choice="required", max_tokens=300)
    whole = sdk.chat.completions.create(**kw)
    with sdk.chat.completions.stream(**kw) as s:
        events = list(s)
        final = s.get_final_completion()
    for r in (whole, final):
        _check(r.choices[0], [("weather", {"city": "Paris"}), ("time", {})], None)
    assert [c.function.arguments for c in final.choices[0].message.tool_calls] == [
        c.function.arguments for c in whole.choices[0].message.tool_calls] == ['{"city": "Paris"}', "{}"]
    deltas = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    assert len(deltas) > 10 and {e.index for e in deltas} == {0, 1}

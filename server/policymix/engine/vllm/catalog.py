"""What the vLLM engine knows of its policies without loading their weights in this process.

A :class:`~policymix.registry.Registry` whose causal policies carry no model (vLLM loads those
in its own processes): tokenizers, tokenizer families, context lengths, betas and references, so
recipes compile and prompts render exactly as under the native engine. Reward models (best-of-n
reranking) are loaded here with transformers, as the native engine does.
"""

from __future__ import annotations

from typing import Callable

from ...config import Config
from ...errors import ConfigError
from ...registry import Registry, load_registry


def vllm_ready_path(name: str, source: tuple[str, str | None, str | None]) -> str:
    """The folder vLLM loads ``name`` from; GGUF files and PEFT adapters are refused at start."""
    path, gguf, adapter = source
    if gguf:
        raise ConfigError(f"policies.{name}: the vLLM engine loads HF folders with safetensors, not GGUF files "
                          "(convert once with transformers, or use --engine native)")
    if adapter:
        raise ConfigError(f"policies.{name}: PEFT adapters are not supported by the vLLM engine "
                          "(merge the adapter into a folder first, or use --engine native)")
    return path


def load_catalog(cfg: Config, progress: Callable[[str], None] | None = None) -> tuple[Registry, dict[str, str]]:
    """The registry (causal policies without models) and each causal policy's weights folder."""
    reg = load_registry(cfg, progress=progress, load_causal=False)
    paths = {name: vllm_ready_path(name, p.source) for name, p in reg.policies.items() if p.kind == "causal"}
    return reg, paths

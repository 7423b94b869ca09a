"""What the vLLM engine knows of its policies without loading their weights in this process.

A :class:`~policymix.registry.Registry` whose causal policies carry no model (vLLM loads those
in its own processes): tokenizers, tokenizer families, context lengths, betas and references, so
recipes compile and prompts render exactly as under the native engine. Reward models (best-of-n
reranking) are loaded here with transformers, as the native engine does.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from ...config import Config
from ...errors import ConfigError
from ...registry import (LoadedPolicy, Registry, _check_mixtures, _device, _load_model, _load_tokenizer,
                         _read_metadata, _torch_dtype, _weights_source)


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


def _hf_config(path: str) -> dict:
    f = Path(path, "config.json")
    if f.is_file():
        return json.loads(f.read_text())
    from transformers import AutoConfig  # a hub id: transformers fetches the config

    return AutoConfig.from_pretrained(path).to_dict()


def load_catalog(cfg: Config, progress: Callable[[str], None] | None = None) -> tuple[Registry, dict[str, str]]:
    """The registry (causal policies without models) and each causal policy's weights folder."""
    reg = Registry(cfg)
    paths: dict[str, str] = {}
    tokenizers: dict[tuple, object] = {}
    vocabs: list[dict[str, int]] = []
    for i, (name, spec) in enumerate(cfg.policies.items()):
        if progress:
            progress(f"[{i + 1}/{len(cfg.policies)}] reading policy {name} from {spec.path}")
        try:
            source = _weights_source(cfg, spec)
            tkey = (source, spec.tokenizer)
            if tkey not in tokenizers:
                tokenizers[tkey] = _load_tokenizer(cfg, spec, source)
            tok = tokenizers[tkey]
            model = None
            if spec.kind == "reward":
                device = _device(spec.device)
                model = _load_model(source, spec, _torch_dtype(spec.dtype, device), device, spec.revision)
                hf = model.config.to_dict()
            else:
                paths[name] = vllm_ready_path(name, source)
                hf = _hf_config(source[0])
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - any load failure becomes one clear line
            msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise ConfigError(f"policies.{name}: cannot load {spec.path!r}: {msg}") from None
        vocab = tok.get_vocab()
        family = next((f for f, v in enumerate(vocabs) if v == vocab), None)
        if family is None:
            family = len(vocabs)
            vocabs.append(vocab)
        out_vocab = int(hf.get("vocab_size") or len(tok))
        if spec.kind == "causal" and out_vocab < len(tok):
            raise ConfigError(f"policies.{name}: the model's vocabulary ({out_vocab}) is smaller than its "
                              f"tokenizer's ({len(tok)})")
        meta = _read_metadata(source)
        reg.policies[name] = LoadedPolicy(
            name=name, spec=spec, model=model, tokenizer=tok, family=family, vocab_size=len(tok),
            max_len=int(hf.get("max_position_embeddings") or 2048), device=spec.device, dtype=spec.dtype,
            beta=spec.beta if spec.beta is not None else meta.get("beta"),
        )
    for name, spec in cfg.policies.items():
        if spec.reference and reg.policies[spec.reference].family != reg.policies[name].family:
            raise ConfigError(f"policies.{name}: its reference {spec.reference!r} uses a different tokenizer "
                              "(tokenizers must map every token to the same id)")
    _check_mixtures(reg)
    return reg, paths

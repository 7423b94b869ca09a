"""The policy registry: loads every policy of a config once and groups them into tokenizer families.

Policies that name the same weights (a "prompted policy" is the same model with its own system
prompt) share one loaded model; each still gets its own KV cache in the engine.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable

from .config import Config, PolicySpec
from .request_types import ImplicitRewardSpec, Prompt
from .errors import ConfigError, ContextTooLong, PolicymixError
from .mixing.recipes import PolicyInfo

log = logging.getLogger("policymix.registry")

METADATA_FILE = "policymix.json"  # {"beta": ..., "reference": ...} written next to trained weights


@dataclass
class LoadedPolicy:
    name: str
    spec: PolicySpec
    model: Any  # torch.nn.Module (causal LM or sequence classifier), shared between prompted policies
    tokenizer: Any
    family: int
    vocab_size: int  # tokenizer length: logits are cut to it (checkpoints often pad the lm_head)
    max_len: int  # context length of the model
    device: Any
    dtype: Any
    beta: float | None = None
    source: tuple[str, str | None, str | None] | None = None  # (weights path or hub id, gguf file, adapter)
    eos_ids: frozenset[int] = frozenset()  # the tokenizer's EOS and the generation config's (HF generate stops on both)
    # adapter policies and their base share one model holding every adapter (adapters.py): ``weights`` is
    # that model, whose forward the engine runs with per-row adapters, and ``adapter`` this policy's adapter
    # in it (None: the base); ``model`` is then a view that applies this policy's adapter alone
    weights: Any = None
    adapter: str | None = None

    @property
    def forward_model(self) -> Any:
        """What the engine's runner calls: the shared weights (per-row adapters), else the model."""
        return self.weights if self.weights is not None else self.model

    @property
    def kind(self) -> str:
        return self.spec.kind

    @property
    def system_prompt(self) -> str | None:
        return self.spec.system_prompt

    def info(self) -> PolicyInfo:
        return PolicyInfo(self.name, self.kind, self.family, self.spec.reference, self.beta,
                          self.spec.protected, self.spec.floor, bool(self.spec.system_prompt))

    def render(self, prompt: Prompt, with_system_prompt: bool = True, system_prompt: str | None = None) -> list[int]:
        """Token ids of ``prompt`` as this policy sees it: its own system prompt included (unless not asked),
        or ``system_prompt`` instead."""
        tok = self.tokenizer
        sp = system_prompt if system_prompt is not None else self.system_prompt if with_system_prompt else None
        if prompt.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise PolicymixError(f"model `{self.name}` has no chat template; use /v1/completions",
                                     param="messages", code="no_chat_template")
            messages = [dict(m) for m in prompt.messages]
            if sp:
                if messages and messages[0].get("role") in ("system", "developer"):
                    messages[0]["content"] = f"{sp}\n\n{messages[0]['content']}"
                else:
                    messages.insert(0, {"role": "system", "content": sp})
            text = render_chat(tok, messages, prompt.add_generation_prompt, prompt.tools, self.name)
            return list(tok(text, add_special_tokens=False).input_ids)
        if prompt.token_ids is not None:
            ids = list(prompt.token_ids)
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise PolicymixError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})",
                                     param="prompt")
            if sp:
                prefix = list(tok(sp + "\n\n").input_ids)
                bos = tok.bos_token_id
                if ids and bos is not None and ids[0] == bos and prefix and prefix[0] == bos:
                    ids = ids[1:]
                ids = prefix + ids
            return ids
        text = prompt.text if prompt.text is not None else ""
        if sp:
            text = f"{sp}\n\n{text}"
        return list(tok(text).input_ids)


@dataclass
class Registry:
    config: Config
    policies: dict[str, LoadedPolicy] = field(default_factory=dict)

    def runner_key(self, name: str) -> str:
        """The name of the runner that computes policy ``name``'s forwards: the first causal policy holding the
        same loaded weights (prompted policies share their model's runner, each context a lane of its forward)."""
        return self._runner_keys.get(name, name)

    @cached_property  # the policies are loaded once
    def _runner_keys(self) -> dict[str, str]:
        first: dict[int, str] = {}
        return {n: first.setdefault(id(p.forward_model), n) if p.model is not None else n
                for n, p in self.policies.items() if p.kind == "causal"}

    def runner_policies(self, runner: str) -> list[str]:
        """The policies a runner computes (``runner_key`` inverted)."""
        return [n for n in self.policies if self.policies[n].kind == "causal" and self.runner_key(n) == runner]

    def infos(self) -> dict[str, PolicyInfo]:
        return {name: p.info() for name, p in self.policies.items()}

    def default_signal_pair(self, recipe) -> ImplicitRewardSpec | None:
        """The (policy, reference, beta) of token signals when a request names none: the recipe's own
        tuned policy and reference (DeRa, MOD), else the first policy of the recipe with a registered
        reference."""
        for name in ([recipe.tuned] if recipe.tuned else []) + list(recipe.active):
            p = self.policies.get(name)
            ref = recipe.reference if name == recipe.tuned and recipe.reference else (p.spec.reference if p else None)
            if p is not None and ref is not None:
                return ImplicitRewardSpec(name, ref, p.beta or 1.0)
        return None

    def family_members(self, family: int) -> list[LoadedPolicy]:
        return [p for p in self.policies.values() if p.family == family]

    def max_model_len(self, family: int) -> int:
        cap = self.config.server.max_model_len
        lens = [p.max_len for p in self.family_members(family) if p.kind == "causal"]
        m = min(lens) if lens else 2048
        return min(m, cap) if cap else m

    def check_length(self, family: int, prompt_len: int, max_tokens: int) -> None:
        limit = self.max_model_len(family)
        if prompt_len + max_tokens > limit:
            raise ContextTooLong(
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_len + max_tokens} tokens ({prompt_len} in the prompt, {max_tokens} for the completion).",
                param="max_tokens" if prompt_len < limit else "prompt",
            )


def _torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available")
    return name


def weights_source(cfg: Config, spec: PolicySpec) -> tuple[str, str | None, str | None]:
    """(model path or hub id, gguf file name, adapter path)."""
    path = cfg.resolve(spec.path)
    adapter = cfg.resolve(spec.adapter) if spec.adapter else None
    gguf = spec.gguf_file
    p = Path(path)
    if gguf is None and path.endswith(".gguf"):
        if not p.is_file():
            raise ValueError(f"GGUF file {path} does not exist")
        return str(p.parent), p.name, adapter
    if adapter is None and (p / "adapter_config.json").is_file():
        # a PEFT adapter directory given as the path: its base comes from the adapter config
        base = json.loads((p / "adapter_config.json").read_text())["base_model_name_or_path"]
        return cfg.resolve(base), None, path
    looks_local = path.startswith(("/", ".", "~")) or p.exists()
    if looks_local and not p.exists():
        raise ValueError(f"path {path} does not exist")
    return path, gguf, adapter


def _load_model(source: tuple[str, str | None, str | None], spec: PolicySpec, dtype, device: str, revision):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    path, gguf, adapter = source
    cls = AutoModelForSequenceClassification if spec.kind == "reward" else AutoModelForCausalLM
    kwargs: dict[str, Any] = {"dtype": dtype}
    if gguf:
        kwargs["gguf_file"] = gguf
    if revision:
        kwargs["revision"] = revision
    model = cls.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel  # optional: only configs with adapters need peft

        model = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    model.to(device)
    model.eval()
    model.requires_grad_(False)
    return model


def _load_tokenizer(cfg: Config, spec: PolicySpec, source: tuple[str, str | None, str | None]):
    from transformers import AutoTokenizer

    path, gguf, adapter = source
    if spec.tokenizer:
        return AutoTokenizer.from_pretrained(cfg.resolve(spec.tokenizer))
    if adapter and Path(adapter, "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(adapter)
    kwargs = {"gguf_file": gguf} if gguf else {}
    return AutoTokenizer.from_pretrained(path, **kwargs)


def _read_metadata(source: tuple[str, str | None, str | None]) -> dict:
    for d in (source[2], source[0]):
        if d and Path(d, METADATA_FILE).is_file():
            return json.loads(Path(d, METADATA_FILE).read_text())
    return {}


def _eos_ids(tokenizer, model, path: str) -> frozenset[int]:
    """The tokenizer's EOS plus the generation config's: the loaded model's, else the files in ``path``
    (an engine that loads weights in its own processes reads the same ids)."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if model is None:
        for name in ("generation_config.json", "config.json"):
            f = Path(path, name)
            if f.is_file():
                gen = json.loads(f.read_text()).get("eos_token_id")
                break
    ids.update(gen if isinstance(gen, list) else [gen] if gen is not None else [])
    return frozenset(ids)


def _hf_config(path: str) -> dict:
    """A model's config without loading its weights (local folder, or a hub id through transformers)."""
    f = Path(path, "config.json")
    if f.is_file():
        return json.loads(f.read_text())
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path).to_dict()


def load_registry(cfg: Config, progress: Callable[[str], None] | None = None,
                  load_causal: bool = True) -> Registry:
    """Load every policy; raise ConfigError with one line naming the policy and the cause.

    ``load_causal=False`` reads causal policies' configs and tokenizers only (their ``model`` stays
    None, ``source`` says where the weights are): for an engine that loads them in its own processes.
    """
    reg = Registry(cfg)
    models: dict[tuple, Any] = {}
    adapters: dict[tuple, dict[str, str]] = {}  # base model key -> {policy: adapter path}, served unmerged
    base_of: dict[str, tuple] = {}
    tokenizers: dict[tuple, Any] = {}
    vocabs: list[dict[str, int]] = []  # one per family
    for i, (name, spec) in enumerate(cfg.policies.items()):
        if progress:
            progress(f"[{i + 1}/{len(cfg.policies)}] loading policy {name} from {spec.path}")
        try:
            device = _device(spec.device)
            dtype = _torch_dtype(spec.dtype, device)
            source = weights_source(cfg, spec)
            model = None
            if load_causal or spec.kind != "causal":
                # an adapter's base is loaded once, as the base policy's own weights (no merged copy)
                serve_unmerged = spec.kind == "causal" and source[2] is not None
                base = (*source[:2], None) if serve_unmerged else source
                key = (base, spec.kind, str(dtype), device, spec.revision)
                if key not in models:
                    models[key] = _load_model(base, spec, dtype, device, spec.revision)
                model = models[key]
                base_of[name] = key
                if serve_unmerged:
                    from .adapters import check_adapter

                    check_adapter(name, source[2])
                    adapters.setdefault(key, {})[name] = source[2]
                hf = model.config.to_dict()
            else:
                hf = _hf_config(source[0])
            tkey = (source, spec.tokenizer)
            if tkey not in tokenizers:
                tokenizers[tkey] = _load_tokenizer(cfg, spec, source)
            tok = tokenizers[tkey]
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
            max_len=int(hf.get("max_position_embeddings") or 2048),
            device=device, dtype=dtype, beta=spec.beta if spec.beta is not None else meta.get("beta"),
            source=source, eos_ids=_eos_ids(tok, model, source[0]),
        )
    if adapters:
        _serve_adapters(reg, adapters, base_of)
    for name, spec in cfg.policies.items():
        if spec.reference and reg.policies[spec.reference].family != reg.policies[name].family:
            raise ConfigError(f"policies.{name}: its reference {spec.reference!r} uses a different tokenizer "
                              "(tokenizers must map every token to the same id)")
    _check_mixtures(reg)
    return reg


def _serve_adapters(reg: Registry, adapters: dict[tuple, dict[str, str]], base_of: dict[str, tuple]) -> None:
    """Every adapter of a base into one model; each policy on that base (the base itself, its prompted
    policies, its adapters) gets the shared model as its ``weights`` and a view of its own as ``model``."""
    from .adapters import AdapterView, attach_adapters

    for key, group in adapters.items():
        try:
            shared = attach_adapters(reg.policies[next(iter(group))].model, group)
        except ConfigError:
            raise
        except Exception as err:  # noqa: BLE001 - one clear line naming the adapters
            raise ConfigError(f"policies.{', '.join(group)}: cannot load the adapters: {err}") from None
        shared.to(reg.policies[next(iter(group))].device)
        for name, k in base_of.items():
            if k == key:
                p = reg.policies[name]
                p.weights, p.adapter = shared, (name if name in group else None)
                p.model = AdapterView(shared, p.adapter)


def _check_mixtures(reg: Registry) -> None:
    from .mixing.recipes import compile_recipe

    infos = reg.infos()
    for name, recipe in reg.config.mixtures.items():
        try:
            compile_recipe(recipe, next(iter(infos)), infos, reg.config.mixtures)
        except PolicymixError as err:
            raise ConfigError(f"mixtures.{name}: {err.message}") from None


def render_chat(tok: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
                tools: list[dict[str, Any]] | None = None, name: str = "the model") -> str:
    """The chat template's text of ``messages`` (and ``tools``), or a 400 naming ``messages`` when the template
    fails on them or drops a tool turn (a template without tool support renders a call or a result as nothing)."""
    kwargs: dict[str, Any] = {"tools": tools} if tools else {}
    try:
        text = tok.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False,
                                       **kwargs)
    except Exception as exc:  # a template's own raise_exception, or one that cannot read these fields
        raise PolicymixError(f"messages: the chat template of `{name}` cannot render this conversation "
                             f"({type(exc).__name__}: {exc})", param="messages") from None
    if not isinstance(text, str):
        raise PolicymixError(f"messages: the chat template of `{name}` did not render text", param="messages")
    for i, m in enumerate(messages):
        dropped = [c["function"]["name"] for c in m.get("tool_calls") or () if c["function"]["name"] not in text]
        result = str(m.get("content") or "").strip()
        if m.get("role") == "tool" and result and result not in text and json.dumps(result)[1:-1] not in text:
            dropped.append("the tool result")  # (as written, or JSON-escaped by a template's tojson)
        if dropped:
            raise PolicymixError(f"messages.{i}: the chat template of `{name}` does not render tool turns "
                                 f"({dropped[0]} is missing from the rendered prompt)", param="messages")
    return text

"""The config file: policies, named mixtures and server settings (pydantic-validated).

The keys documented in the README are a contract with users' scripts: add keys, never rename them.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError
from .messages import ChatMessage

DTYPES = ("auto", "float32", "float16", "bfloat16")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PolicySpec(_Strict):
    """One registered model. ``kind: reward`` is a sequence classifier, never mixed."""

    path: str  # local HF directory, hub id, a .gguf file, or a PEFT adapter directory
    kind: Literal["causal", "reward"] = "causal"
    gguf_file: str | None = None  # file name inside ``path`` (a hub repo or folder) when not a .gguf path
    adapter: str | None = None  # PEFT adapter directory applied on top of ``path``
    tokenizer: str | None = None  # defaults to ``path`` (or the adapter's base)
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    system_prompt: str | None = None  # a "prompted policy": same weights, its own instructions
    reference: str | None = None  # the policy this one was tuned from (DeRa, implicit reward)
    beta: float | None = Field(default=None, gt=0)  # the KL coefficient it was trained with
    protected: bool = False  # safety-tuned: the mixing guard keeps its weight >= floor
    floor: float = 0.0
    revision: str | None = None

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r} (choose one of {', '.join(DTYPES)})")
        return v

    @field_validator("floor")
    @classmethod
    def _finite_floor(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError("floor must be a finite number")
        return v


class ProxySpec(_Strict):
    base: str
    tuned: str
    untuned: str
    alpha: float = 1.0


class VariantSpec(_Strict):
    """A served policy under another context, for one request: exactly one of the three sources."""

    policy: str
    prompt: str | list[int] | None = None  # a completions prompt (text or token ids)
    messages: list[ChatMessage] | None = None  # a chat conversation (chat requests only)
    system_prompt: str | None = None  # the request's own prompt under this system prompt


class GuidanceSpec(_Strict):
    """Classifier-free guidance: ``policy: scale`` plus its negative-prompt variant at ``1 - scale``."""

    policy: str
    scale: float
    negative_prompt: str | list[ChatMessage] | None = None  # None or "": the unconditional context


class ContextAwareSpec(_Strict):
    """Context-aware decoding: ``policy: 1 + alpha`` plus its variant without the context at ``-alpha``."""

    policy: str
    alpha: float
    drop: Literal["system", "context"] = "context"  # context: every message but the last user turn


class ArmSpec(_Strict):
    """GenARM guidance: ``base: 1`` plus each autoregressive reward model at ``weight / beta``."""

    base: str
    arms: dict[str, float]  # ARM policy -> weight (several: multi-objective guidance)
    beta: float  # the decoding KL coefficient: samples from pi_base * prod_i pi_arm_i^(weight_i / beta)


class Recipe(_Strict):
    """A mixing recipe as written in a request's ``mixture`` or under ``mixtures:`` in the config.

    Exactly one form: ``weights``; ``reference`` + ``objectives`` (MOD, optionally with ``beta`` and
    ``beta_prime``); ``reference`` + ``policy`` + ``beta`` + ``beta_prime`` (DeRa); ``proxy``;
    ``guidance``; ``context_aware``; ``arm``. ``prompt_variants`` names served policies under other contexts,
    usable like policies in ``weights``, ``objectives`` and ``proxy``.
    Forms are checked by :func:`policymix.mixing.recipes.compile_recipe`, which names the field.
    """

    weights: dict[str, float] | None = None
    reference: str | None = None
    objectives: dict[str, float] | None = None
    policy: str | None = None
    beta: float | None = None
    beta_prime: float | None = None
    proxy: ProxySpec | None = None
    prompt_variants: dict[str, VariantSpec] | None = None
    guidance: GuidanceSpec | None = None
    context_aware: ContextAwareSpec | None = None
    arm: ArmSpec | None = None


class ApiKeySpec(_Strict):
    """An API key, stored as the SHA-256 of the key (hex), with its scopes and limits."""

    key_sha256: str
    name: str | None = None
    policies: list[str] | None = None  # policies and named mixtures it may use; None: all
    allow_inline_recipes: bool = True
    allow_inversion: bool = False  # may pass the mixing guard
    max_tokens: int | None = Field(default=None, ge=1)
    max_best_of: int | None = Field(default=None, ge=1)
    max_concurrent: int | None = Field(default=None, ge=1)

    @field_validator("key_sha256")
    @classmethod
    def _hex(cls, v: str) -> str:
        v = v.lower()
        if len(v) != 64 or any(c not in "0123456789abcdef" for c in v):
            raise ValueError("key_sha256 must be 64 hex characters (sha256 of the key)")
        return v


class GuardSpec(_Strict):
    """Bounds of the mixing guard (see docs/guard.md for the attacks they block)."""

    max_abs_weight: float = Field(default=8.0, gt=0)
    max_sum_abs_weight: float = Field(default=16.0, gt=0)
    min_beta: float = Field(default=1e-3, gt=0)
    max_beta: float = Field(default=100.0, gt=0)


class SpeculativeConfig(_Strict):
    """The default of requests that set no ``speculative`` field (docs/api.md, speculative decoding)."""

    draft: str  # a served policy of the mixture's tokenizer family, or "ngram" (prompt lookup)
    num_tokens: int = Field(default=4, ge=1, le=16)  # drafted per round
    max_concurrency: int = Field(default=8, ge=1)  # above this many running sequences, no drafting
    adaptive: bool = True  # each step drafts the k (0..num_tokens) with the most tokens per measured second


class VllmSpec(_Strict):
    """``server.vllm``: settings of ``--engine vllm`` (docs/vllm.md), each overridable by ``POLICYMIX_VLLM_<FIELD>``.

    Field names are vLLM's own engine arguments, so a vLLM user reads them without a table.
    """

    tensor_parallel_size: int = Field(default=1, ge=1)  # devices (CPU: worker processes) that shard each layer
    pipeline_parallel_size: int = Field(default=1, ge=1)  # stages of consecutive layers
    distributed_executor_backend: Literal["mp", "ray", "uni"] | None = None  # None: vLLM's (mp on one node)
    gpu_memory_utilization: float | None = Field(default=None, gt=0, le=1)  # None: vLLM's 0.9
    max_model_len: int | None = Field(default=None, ge=8)  # None: server.max_model_len, else the family's context
    enforce_eager: bool = True  # False: torch.compile and CUDA graphs (the compile cache is then off)
    kv_cache_memory_bytes: int | None = Field(default=None, ge=1)  # per worker; None: sized from kv_budget_tokens
    # CPU only: vLLM's VLLM_CPU_OMP_THREADS_BIND ("0-3|4-7": one CPU list per worker, "auto", "nobind");
    # None: split this process's CPUs between the workers when there are several (auto needs a NUMA node each)
    cpu_threads_bind: str | None = None


class ServerSpec(_Strict):
    host: str | None = None  # flags and POLICYMIX_* variables override these three
    port: int | None = Field(default=None, ge=0, le=65535)
    engine: Literal["native", "vllm"] | None = None
    api_keys: list[ApiKeySpec] = Field(default_factory=list)
    open_health: bool = True  # /health and /metrics without a key
    open_metrics: bool = True
    max_num_seqs: int = Field(default=32, ge=1)  # sequences stepped together
    max_model_len: int | None = Field(default=None, ge=8)  # default: the smallest policy context
    max_queue: int = Field(default=64, ge=0)  # waiting requests before 503
    kv_budget_tokens: int | None = Field(default=None, ge=1)  # cached tokens per policy; None: auto
    max_best_of: int = Field(default=16, ge=1)
    request_timeout_s: float = Field(default=600.0, gt=0)  # a request queued longer is dropped
    torch_threads: int | None = Field(default=None, ge=1)
    # decode-only steps: auto = CUDA graphs on a GPU (static shapes), the dynamic path on CPU
    decode: Literal["auto", "dynamic", "static", "graphs"] = "auto"
    # linear layers of float32 policies on CPU: onednn = prepacked once for oneDNN (faster GEMMs at
    # decode shapes; falls back to torch where unavailable), torch = nn.Linear as loaded
    cpu_linear: Literal["onednn", "torch"] = "onednn"
    guard: GuardSpec = Field(default_factory=GuardSpec)
    log_prompts: bool = False
    speculative: SpeculativeConfig | None = None
    # the forwards of one step's policies at the same time, one thread each (CPU: one intra-op thread per
    # forward on its own core); auto: on CPU when there are cores for it (engine/core.py)
    policy_parallel: Literal["auto", "on", "off"] = "auto"
    playground: bool = True  # the browser playground at /playground (static files; calls this API)
    vllm: VllmSpec = Field(default_factory=VllmSpec)


class Config(_Strict):
    policies: dict[str, PolicySpec]
    mixtures: dict[str, Recipe] = Field(default_factory=dict)
    server: ServerSpec = Field(default_factory=ServerSpec)
    base_dir: Path = Field(default=Path("."), exclude=True)  # relative paths resolve against this

    @model_validator(mode="after")
    def _cross_refs(self) -> "Config":
        if not self.policies:
            raise ValueError("policies: at least one policy is needed")
        for name, spec in self.policies.items():
            if spec.reference is not None and spec.reference not in self.policies:
                raise ValueError(f"policies.{name}.reference: unknown policy {spec.reference!r}")
            if spec.protected and spec.reference is None:
                raise ValueError(f"policies.{name}: a protected policy needs a reference")
        spec = self.server.speculative
        if spec is not None and spec.draft != "ngram" and spec.draft not in self.policies:
            raise ValueError(f"server.speculative.draft: unknown policy {spec.draft!r} (a policy name or 'ngram')")
        for name in self.mixtures:
            if name in self.policies:
                raise ValueError(f"mixtures.{name}: a policy already has this name")
        return self

    def resolve(self, path: str) -> str:
        """A relative local path resolves against the config file's folder; hub ids stay as they are."""
        p = Path(path).expanduser()
        if p.is_absolute():
            return str(p)
        candidate = (self.base_dir / p).resolve()
        if candidate.exists() or path.startswith((".", "~")):
            return str(candidate)
        return path


def _first_error_line(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    return f"{where}: {first['msg']}"


def parse_config(data: dict, base_dir: Path | str = ".") -> Config:
    """Validate a config mapping; raise ConfigError with one line naming the field."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_first_error_line(err)) from None
    cfg.base_dir = Path(base_dir)
    return cfg


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with a 'policies' key")
    return parse_config(data, base_dir=path.parent.resolve())

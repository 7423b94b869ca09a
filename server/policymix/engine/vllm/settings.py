"""The vLLM engine's settings: the config's ``server.vllm`` with ``POLICYMIX_VLLM_*`` overrides applied.

Each field of :class:`~policymix.config.VllmSpec` has a variable ``POLICYMIX_VLLM_<FIELD>`` (an empty one
is unset) that wins over the file, as the other ``POLICYMIX_*`` variables do. Two older names keep
working: ``POLICYMIX_VLLM_KV_CACHE_BYTES`` (= ``kv_cache_memory_bytes``) and ``POLICYMIX_VLLM_COMPILE=1``
(= ``enforce_eager: false``). A bad value ends the start with one line naming the variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from ...config import VllmSpec
from ...errors import ConfigError

PREFIX = "POLICYMIX_VLLM_"
ALIASES = {"POLICYMIX_VLLM_KV_CACHE_BYTES": "kv_cache_memory_bytes"}  # names from before server.vllm


def env_overrides(environ: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    """``{field: (variable, raw value)}`` for every ``POLICYMIX_VLLM_*`` variable that is set."""
    found: dict[str, tuple[str, str]] = {}
    for var, name in ALIASES.items():
        if environ.get(var):
            found[name] = (var, environ[var])
    compile_var = PREFIX + "COMPILE"
    if environ.get(compile_var):
        if environ[compile_var] not in ("0", "1"):
            raise ConfigError(f"{compile_var}: must be 1 (compile) or 0 (eager), not {environ[compile_var]!r}")
        found["enforce_eager"] = (compile_var, "false" if environ[compile_var] == "1" else "true")
    for name in VllmSpec.model_fields:
        var = PREFIX + name.upper()
        if environ.get(var):  # the field's own name wins over an alias
            found[name] = (var, environ[var])
    return found


def apply_env(spec: VllmSpec, environ: Mapping[str, str]) -> VllmSpec:
    """``spec`` with the environment's overrides, each checked like the config field it replaces."""
    for name, (var, raw) in env_overrides(environ).items():
        try:
            spec = VllmSpec.model_validate({**spec.model_dump(exclude_unset=True), name: raw})
        except ValidationError as err:
            raise ConfigError(f"{var}: {err.errors()[0]['msg']}") from None
    return spec


@dataclass
class VllmSettings:
    """What :class:`~.engine.VllmEngine` starts vLLM with."""

    spec: VllmSpec = field(default_factory=VllmSpec)
    cache_dir: Path | None = None  # composite checkpoints; default $POLICYMIX_CACHE/vllm

    @classmethod
    def resolve(cls, spec: VllmSpec, environ: Mapping[str, str] = os.environ,
                cache_dir: Path | None = None) -> "VllmSettings":
        return cls(apply_env(spec, environ), cache_dir)

    @property
    def world_size(self) -> int:
        return self.spec.tensor_parallel_size * self.spec.pipeline_parallel_size


def cpu_threads_bind(workers: int, cpus: list[int]) -> str:
    """vLLM's ``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers: this process's CPUs in as many
    contiguous lists ("0|1" for two workers on two cores). vLLM's own "auto" binds one NUMA node per
    worker and refuses to start with more workers than nodes (one node on most machines)."""
    cpus = sorted(cpus)
    if len(cpus) < workers:
        return "nobind"  # fewer CPUs than workers: let the OS schedule them
    per = len(cpus) // workers
    return "|".join(",".join(str(c) for c in cpus[i * per:(i + 1) * per]) for i in range(workers))

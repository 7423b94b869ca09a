"""The per-request weight table: a vLLM logits processor that only keeps books.

vLLM tells logits processors how its persistent batch changes (requests added, removed, moved,
swapped) in ``update_state``, which runs before each forward. This one keeps a
``[max_num_seqs, K]`` table of the batch's mixing weights (from ``SamplingParams.extra_args``) and
publishes it; the composite model's ``compute_logits`` reads it to mix. Mixing there, rather
than in ``apply``, keeps the logits ``[rows, V]`` for vLLM's own processors (min_tokens,
logit_bias, penalties) and never multiplies a weight of 0 by ``-inf``. ``apply`` changes nothing,
so the processor is argmax-invariant. Works with vLLM's legacy model runner (the one the CPU
build uses); on GPU the engine pins ``VLLM_USE_V2_MODEL_RUNNER=0`` (see docs/vllm.md).
"""

from __future__ import annotations

import math

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from .plugin import POLICIES_KEY, WEIGHTS_ARG, register

register()  # this module is imported in every vLLM process that holds the engine's config

_TABLES: dict[str, "WeightTable"] = {}  # composite folder -> the table of this process's batch


def published(key: str) -> "WeightTable | None":
    return _TABLES.get(key)


def _weights_of(params, k: int) -> list[float]:
    w = (params.extra_args or {}).get(WEIGHTS_ARG)
    if w is None or len(w) != k:  # a plain vLLM request (policymix always sends K): the first policy alone
        return [1.0] + [0.0] * (k - 1)
    return [float(x) for x in w]


class WeightTable(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        w = (sampling_params.extra_args or {}).get(WEIGHTS_ARG)
        if w is None:
            return
        if not isinstance(w, (list, tuple)) or not w or not all(
                isinstance(x, (int, float)) and math.isfinite(x) for x in w):
            raise ValueError(f"extra_args.{WEIGHTS_ARG} must be a non-empty list of finite numbers")
        if all(x == 0 for x in w):
            raise ValueError(f"extra_args.{WEIGHTS_ARG}: all weights are zero")

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.k = len(getattr(vllm_config.model_config.hf_config, POLICIES_KEY))
        rows = vllm_config.scheduler_config.max_num_seqs
        self.cpu = torch.zeros(rows, self.k, dtype=torch.float32)  # [max_num_seqs, K]
        self.weights = self.cpu if device.type == "cpu" else torch.zeros_like(self.cpu, device=device)
        self.num_reqs = 0
        self.used = [True] * self.k  # policies with a nonzero weight in the current batch
        _TABLES[vllm_config.model_config.model] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        t = self.cpu
        for i in batch_update.removed:
            t[i] = 0.0
        for i, params, _, _ in batch_update.added:
            t[i] = torch.tensor(_weights_of(params, self.k), dtype=torch.float32)
        for a, b, kind in batch_update.moved:
            if kind == MoveDirectionality.SWAP:
                t[[a, b]] = t[[b, a]]
            else:
                t[b] = t[a]
                t[a] = 0.0
        self.num_reqs = batch_update.batch_size
        self.used = t[: self.num_reqs].ne(0).any(0).tolist()
        if self.weights is not t:
            self.weights.copy_(t, non_blocking=True)

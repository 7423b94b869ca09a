"""The per-request weight table: a vLLM logits processor that only keeps books.

vLLM tells logits processors how its persistent batch changes (requests added, removed, moved,
swapped) in ``update_state``, which runs before each forward. This one keeps a
``[max_num_seqs, K]`` table of the batch's mixing weights (from ``SamplingParams.extra_args``) and
publishes it; the composite model's ``compute_logits`` reads it to mix. Mixing there, rather
than in ``apply``, keeps the logits ``[rows, V]`` for vLLM's own processors (min_tokens,
logit_bias, penalties) and never multiplies a weight of 0 by ``-inf``. ``apply`` changes nothing,
so the processor is argmax-invariant. Works with vLLM's legacy model runner (the one the CPU
build uses); on GPU the engine pins ``VLLM_USE_V2_MODEL_RUNNER=0`` (see docs/vllm.md).

Requests that want per-policy logprobs (token signals, implicit rerank) also name their policies
to observe (weight 0, computed anyway) and a key. ``compute_logits`` hands this table the step's
distributions; at the next ``update_state`` (before the batch changes) the table reads each such
row's sampled token from the request's output list and sends the policies' logprobs of it, and
``KL(q || pi_ref)`` of that step, through :mod:`.channel`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from ...mixing.signals import kl_to_reference
from .channel import CHANNEL_KEY, Sender
from .plugin import KEY_ARG, OBSERVE_ARG, POLICIES_KEY, REFERENCE_ARG, WEIGHTS_ARG, register

register()  # this module is imported in every vLLM process that holds the engine's config

_TABLES: dict[str, "WeightTable"] = {}  # composite folder -> the table of this process's batch


def published(key: str) -> "WeightTable | None":
    return _TABLES.get(key)


def _first_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except Exception:  # noqa: BLE001 - no parallel groups yet (or ever): a single worker
        return True


def _weights_of(params, k: int) -> list[float]:
    w = (params.extra_args or {}).get(WEIGHTS_ARG)
    if w is None or len(w) != k:  # a plain vLLM request (policymix always sends K): the first policy alone
        return [1.0] + [0.0] * (k - 1)
    return [float(x) for x in w]


@dataclass
class _Watch:
    """A row whose per-policy logprobs go back to the client."""

    key: str
    outputs: list[int]  # vLLM's live list of the request's generated tokens
    reference: int | None  # policy index for KL(q || pi_ref)


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
        self.need = torch.zeros(rows, self.k, dtype=torch.bool)  # weight != 0, or observed
        self.watch: list[_Watch | None] = [None] * rows
        self.prompt_rows = [False] * rows  # rows whose requests asked for prompt logprobs
        self.num_reqs = 0
        self.used = [True] * self.k  # policies that some request of the current batch needs
        self._kept: tuple[dict[int, torch.Tensor], torch.Tensor, list[tuple[int, _Watch, int]]] | None = None
        address = getattr(vllm_config.model_config.hf_config, CHANNEL_KEY, None)
        self.sender = Sender(address) if address and _first_rank() else None
        _TABLES[vllm_config.model_config.model] = self

    def is_argmax_invariant(self) -> bool:
        return True

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    @property
    def watching(self) -> bool:
        return any(w is not None for w in self.watch[: self.num_reqs])

    def keep(self, logps: dict[int, torch.Tensor], mixed: torch.Tensor) -> None:
        """The step's per-policy log-probs ``{k: [B, V]}`` and mixed scores ``[B, V]`` (watched rows only read)."""
        rows = [(i, w, len(w.outputs)) for i, w in enumerate(self.watch[: self.num_reqs]) if w is not None]
        self._kept = (logps, mixed, rows) if rows else None

    def _send_kept(self) -> None:
        """Each watched row's sampled token (now in its output list): its policies' logprobs and the KL."""
        if self._kept is None:
            return
        logps, mixed, rows = self._kept
        self._kept = None
        out = []
        for i, w, n in rows:
            if len(w.outputs) != n + 1 or w.outputs[-1] < 0:  # no token sampled for it (a prefill chunk)
                continue
            tok = w.outputs[-1]
            values = [float(logps[k][i, tok]) if k in logps else None for k in range(self.k)]
            kl = None
            if w.reference is not None and w.reference in logps:
                logq = torch.log_softmax(mixed[i].float(), dim=-1)  # [V]
                kl = float(kl_to_reference(logq, logps[w.reference][i]))
            out.append([w.key, n, values, kl])
        if self.sender is not None:
            self.sender.send(out)

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        self._send_kept()  # row indices of the kept step hold until the batch changes below
        if batch_update is None:
            return
        t, need, watch = self.cpu, self.need, self.watch
        prompts = self.prompt_rows
        for i in batch_update.removed:
            t[i], need[i], watch[i], prompts[i] = 0.0, False, None, False
        for i, params, _, outputs in batch_update.added:
            t[i] = torch.tensor(_weights_of(params, self.k), dtype=torch.float32)
            prompts[i] = params.prompt_logprobs is not None
            need[i] = t[i] != 0
            extra = params.extra_args or {}
            for k in extra.get(OBSERVE_ARG) or ():
                if 0 <= k < self.k:
                    need[i, k] = True
            key = extra.get(KEY_ARG)
            watch[i] = _Watch(key, outputs, extra.get(REFERENCE_ARG)) if key is not None and outputs is not None \
                else None
        for a, b, kind in batch_update.moved:
            if kind == MoveDirectionality.SWAP:
                t[[a, b]] = t[[b, a]]
                need[[a, b]] = need[[b, a]]
                watch[a], watch[b] = watch[b], watch[a]
                prompts[a], prompts[b] = prompts[b], prompts[a]
            else:
                t[b], need[b], watch[b], prompts[b] = t[a], need[a], watch[a], prompts[a]
                t[a], need[a], watch[a], prompts[a] = 0.0, False, None, False
        self.num_reqs = batch_update.batch_size
        self.used = need[: self.num_reqs].any(0).tolist()
        if self.weights is not t:
            self.weights.copy_(t, non_blocking=True)

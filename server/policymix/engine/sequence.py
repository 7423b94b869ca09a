"""Request and sequence state. Only the scheduler and the engine core change it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .detokenizer import IncrementalDetokenizer
from .protocol import GenerationRequest, ImplicitRewardSpec, TokenEvent


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    """One sampled continuation. ``feeds`` holds, per policy, the tokens not yet in its cache."""

    seq_id: int
    request: "RequestState"
    index: int  # 0..best_of-1 within the request
    generator: torch.Generator
    detok: IncrementalDetokenizer
    feeds: dict[str, list[int]] = field(default_factory=dict)
    output_ids: list[int] = field(default_factory=list)
    cum_logprob: float = 0.0
    kl_sum: float = 0.0
    reward_sum: float = 0.0
    policy_logprob_sums: dict[str, float] = field(default_factory=dict)
    events: list[TokenEvent] = field(default_factory=list)  # buffered when best_of > n
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    row: int = -1  # row in this step's mixed-score matrix

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestState:
    """A request inside the engine: its sequences, rendered prompts and where its events go."""

    req: GenerationRequest
    emit: Callable[[Any], None]  # thread-safe sink for TokenEvent / RequestDone
    prompts: dict[str, list[int]]  # policy -> rendered prompt ids (every policy the sequences run)
    weights: dict[str, float]  # policy -> weight (0 for observers: signals, implicit rerank)
    signal_pair: ImplicitRewardSpec | None
    eos_ids: set[int]
    status: Status = Status.WAITING
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False  # siblings created (after the leader's prefill)

    @property
    def best_of(self) -> int:
        return self.req.sampling.candidates

    @property
    def prompt_len(self) -> int:
        return max(len(p) for p in self.prompts.values())

    def reserved_tokens(self, policy: str) -> int:
        """KV cells this request may need in ``policy``'s cache (admission control)."""
        return self.best_of * (len(self.prompts[policy]) + self.req.sampling.max_tokens)

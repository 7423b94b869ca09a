"""Request and sequence state. Only the scheduler and the output processor change it.

:class:`SequenceOutput` and :func:`finish_request` are what a sampled token and a finished request
turn into; the vLLM engine (vllm/jobs.py) uses them too, so both engines answer alike.
"""

from __future__ import annotations

import enum
import random
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..rerank import kl_bound, soft_choose, soft_probabilities
from .detokenizer import IncrementalDetokenizer, finish_reason
from .protocol import (Candidate, GenerationRequest, ImplicitRewardSpec, RequestDone, RequestPlan, RerankSpec,
                       SamplingParams, SequenceResult, TokenEvent)


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SCORING = "scoring"  # every candidate finished, its cache freed; a reward model ranks them
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceOutput:
    """What one sampled continuation has produced so far."""

    index: int  # 0..best_of-1 within the request
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    cum_logprob: float = 0.0
    kl_sum: float = 0.0
    reward_sum: float = 0.0
    policy_logprob_sums: dict[str, float] = field(default_factory=dict)
    events: list[TokenEvent] = field(default_factory=list)  # buffered when best_of > n
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    drafted: int = 0  # speculative decoding: tokens drafted for it, and how many of them were accepted
    accepted: int = 0

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def observe(self, ev: TokenEvent, req: GenerationRequest, policy_logprobs: dict[str, float],
                pair: ImplicitRewardSpec | None, kl: float | None) -> None:
        """Each policy's logprob of the token, its implicit reward and the step's KL(q || pi_ref)."""
        for name, v in policy_logprobs.items():
            self.policy_logprob_sums[name] = self.policy_logprob_sums.get(name, 0.0) + v
        if req.return_policy_logprobs or req.return_token_signals:
            ev.policy_logprobs = policy_logprobs
        if pair is not None:
            ev.implicit_reward = pair.beta * (policy_logprobs[pair.policy] - policy_logprobs[pair.reference])
            ev.kl = kl
            self.kl_sum += kl or 0.0
            self.reward_sum += ev.implicit_reward

    def add_token(self, tok: int, ev: TokenEvent, sp: SamplingParams, eos_ids: frozenset[int],
                  emit: Callable[[Any], None]) -> None:
        """Record a sampled token: finish checks, text release, the event out (buffered while best-of
        candidates wait to be ranked)."""
        self.output_ids.append(tok)
        self.cum_logprob += ev.logprob or 0.0
        self.finish_reason, self.stop_reason = finish_reason(tok, len(self.output_ids), eos_ids, sp, self.detok)
        ev.text = self.detok.release(final=self.finished)
        ev.finish_reason = self.finish_reason
        if sp.reranked:
            self.events.append(ev)
        else:
            emit(ev)


def rerank_scores(seqs: list[SequenceOutput], rerank: RerankSpec | None) -> list[float]:
    """Best-of scores without a reward model: the implicit reward, else the mean mixed logprob."""
    if rerank is not None and rerank.kind == "implicit":
        spec = rerank.implicit
        sums = [s.policy_logprob_sums for s in seqs]
        return [spec.beta * (x.get(spec.policy, 0.0) - x.get(spec.reference, 0.0)) for x in sums]
    return [s.cum_logprob / max(1, len(s.output_ids)) for s in seqs]


def finish_request(seqs: list[SequenceOutput], plan: RequestPlan, scores: list[float] | None,
                   emit: Callable[[Any], None], generated: int | None = None) -> RequestDone:
    """Emit best-of candidates' buffered events in rank order (``scores``: one per sequence, when
    reranked; a pruned candidate's is its score where it stopped, and it is never returned); return the
    closing RequestDone. ``rerank.soft`` draws the returned ones ~ exp(score / temperature) instead."""
    sp, signals, rr = plan.sampling, plan.signal_pair is not None, plan.request.rerank
    chosen, candidates = seqs[: sp.n], None
    if sp.reranked:
        eligible = [i for i, s in enumerate(seqs) if s.finish_reason != "pruned"]
        probs: list[float | None] = [None] * len(seqs)
        if rr is not None and rr.soft_temperature is not None:
            p = soft_probabilities([scores[i] for i in eligible], rr.soft_temperature)
            probs = [0.0] * len(seqs)  # pruned candidates are never drawn
            for i, q in zip(eligible, p):
                probs[i] = q
            seed = plan.seed(plan.candidates)  # a stream no candidate samples from
            rng = random.Random(seed) if seed is not None else random.SystemRandom()
            order = [eligible[k] for k in soft_choose(p, sp.n, rng)]
        else:
            order = sorted(eligible, key=lambda i: -scores[i])[: sp.n]
        candidates = [Candidate(s.detok.text, list(s.output_ids), sc, s.finish_reason, probs[i])
                      for i, (s, sc) in enumerate(zip(seqs, scores))]
        chosen = [seqs[i] for i in order]
        for new_index, s in enumerate(chosen):
            for ev in s.events:
                ev.index = new_index
                emit(ev)
    results = [SequenceResult(index=i, text=s.detok.text, token_ids=list(s.output_ids), finish_reason=s.finish_reason,
                              stop_reason=s.stop_reason, kl_to_reference=s.kl_sum if signals else None,
                              implicit_reward=s.reward_sum if signals else None,
                              speculative=_speculative(plan, s))
               for i, s in enumerate(chosen)]
    if generated is None:  # (beam branches share their parents' tokens: the engine counts them itself)
        generated = sum(len(s.output_ids) for s in seqs)
    return RequestDone(prompt_tokens=plan.prompt_len, completion_tokens=generated,
                       sequences=results, weights=dict(plan.request.recipe.weights), candidates=candidates,
                       kl_bound=kl_bound(len(seqs)) if sp.reranked else None,
                       generated_tokens=generated if sp.reranked else None)


def _speculative(plan: RequestPlan, s: SequenceOutput) -> dict[str, Any] | None:
    spec = plan.speculative
    return None if spec is None else {"draft": spec.draft, "drafted": s.drafted, "accepted": s.accepted}


@dataclass(kw_only=True, eq=False)
class Sequence(SequenceOutput):
    """A native-engine continuation: one lane (context, cache slot) per policy or prompt variant it runs."""

    seq_id: int
    request: "RequestState"
    generator: torch.Generator
    lanes: dict[str, "Lane"] = field(default_factory=dict)  # stream (policy or variant name) -> its lane
    row: int = -1  # row in this step's mixed-score matrix
    score_prompt: bool = False  # its prefill is being scored (prompt logprobs): not sampled until it ends
    score_left: int = 0  # scored tokens whose predictors are still unfed (the same at every policy's end)
    chunk_end: int = 0  # tokens this step leaves unfed at the end of every policy's context
    rejected: int = 0  # speculative rounds that ended on a rejected draft (with ``accepted``: its acceptance rate)
    matcher: Any = None  # structured outputs: its own grammar matcher (engine/structured.py), advanced per token


@dataclass(eq=False)
class Lane:
    """One context of a sequence inside a policy's runner: the policy's own, or a prompt variant's."""

    seq: Sequence
    stream: str  # the plan's name for this context: a policy, or a variant of the runner's policy
    feed: list[int] = field(default_factory=list)  # tokens not yet in this context's cache
    verify: int = 0  # this step feeds k drafted tokens: the runner keeps the logits of its last k + 1 positions

    def step_feed(self) -> list[int]:
        """The tokens the runner takes this step (all pending, unless a scored prefill is chunked)."""
        c = self.seq.chunk_end
        return self.feed[: len(self.feed) - c] if c else self.feed


@dataclass(eq=False)
class RequestState:
    """A request inside the native engine: its plan, its sequences and where its events go."""

    plan: RequestPlan
    emit: Callable[[Any], None] = lambda ev: None  # thread-safe sink for TokenEvent / RequestDone
    status: Status = Status.WAITING
    sequences: list[Sequence] = field(default_factory=list)
    forked: bool = False  # siblings created (after the leader's prefill)
    live: int = 0  # sequences not yet finished
    prompt_mix: Any = None  # scored prefill: this step's mixed logits of the positions scored [n, V]
    prompt_entries: list = field(default_factory=list)  # scored prefill: the prompt's logprobs so far
    generated: int = 0  # tokens sampled for the request (every candidate, pruned and beam branches included)

    @property
    def req(self) -> GenerationRequest:
        return self.plan.request

    @property
    def sampling(self) -> SamplingParams:
        return self.plan.sampling

    @property
    def prompts(self) -> dict[str, list[int]]:
        """Stream (policy or prompt variant) -> its rendered prompt."""
        return self.plan.prompts

    @property
    def weights(self) -> dict[str, float]:
        return self.plan.weights

    @property
    def best_of(self) -> int:
        return self.plan.candidates

    def reserved_tokens(self, policy: str) -> int:
        return self.plan.reserved_tokens(policy)

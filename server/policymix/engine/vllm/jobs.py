"""One request inside the vLLM engine: its sequences, and what each generated token turns into.

vLLM samples; the rest follows the native engine token for token (engine/core.py ``_advance``):
EOS and stop ids end a sequence, stop strings are found by the same incremental detokenizer (so
text, held-back stop prefixes and the completion's leading space are identical), ``max_tokens``
gives "length". vLLM is asked for token ids only and never stops on a string itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ...rerank import kl_bound
from ..detokenizer import IncrementalDetokenizer, finish_reason
from ..protocol import Candidate, GenerationRequest, ImplicitRewardSpec, RequestDone, SequenceResult, TokenEvent


@dataclass
class Seq:
    index: int  # 0..best_of-1
    detok: IncrementalDetokenizer
    output_ids: list[int] = field(default_factory=list)
    cum_logprob: float = 0.0
    kl_sum: float = 0.0
    reward_sum: float = 0.0
    policy_logprob_sums: dict[str, float] = field(default_factory=dict)
    events: list[TokenEvent] = field(default_factory=list)  # buffered when best_of > n
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Job:
    req: GenerationRequest
    prompt: list[int]  # the one rendering every policy of the family sees
    weights: list[float]  # one per policy of the composite, 0 for those the recipe does not use
    eos_ids: set[int]
    tokenizer: Any
    policies: dict[str, int] = field(default_factory=dict)  # policies whose logprobs are reported -> index
    signal_pair: ImplicitRewardSpec | None = None
    emit: Callable[[Any], None] = lambda ev: None
    seqs: list[Seq] = field(default_factory=list)

    @property
    def best_of(self) -> int:
        return self.req.sampling.candidates

    def observe(self, ev: TokenEvent, seq: Seq, values: list[float | None], kl: float | None) -> None:
        """Per-policy logprobs of the token (from the worker), its implicit reward and the step's KL."""
        pl = {name: values[k] for name, k in self.policies.items()}
        for name, v in pl.items():
            seq.policy_logprob_sums[name] = seq.policy_logprob_sums.get(name, 0.0) + v
        if self.req.return_policy_logprobs or self.req.return_token_signals:
            ev.policy_logprobs = pl
        pair = self.signal_pair
        if pair is not None:
            ev.implicit_reward = pair.beta * (pl[pair.policy] - pl[pair.reference])
            ev.kl = kl
            seq.kl_sum += kl or 0.0
            seq.reward_sum += ev.implicit_reward

    def scores(self) -> list[float]:
        """Best-of scores without a reward model: the implicit reward, else the mean mixed logprob."""
        rr = self.req.rerank
        if rr is not None and rr.kind == "implicit":
            spec = rr.implicit
            sums = [s.policy_logprob_sums for s in self.seqs]
            return [spec.beta * (x.get(spec.policy, 0.0) - x.get(spec.reference, 0.0)) for x in sums]
        return [s.cum_logprob / max(1, len(s.output_ids)) for s in self.seqs]

    def new_seq(self, index: int) -> Seq:
        sp = self.req.sampling
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt, sp.stop, sp.include_stop_str_in_output,
                                       sp.skip_special_tokens)
        seq = Seq(index, detok)
        self.seqs.append(seq)
        return seq

    def advance(self, seq: Seq, tok: int, ev: TokenEvent) -> None:
        """Record one sampled token: finish checks, text release, event out (or into the buffer)."""
        sp = self.req.sampling
        seq.output_ids.append(tok)
        seq.cum_logprob += ev.logprob or 0.0
        seq.finish_reason, seq.stop_reason = finish_reason(tok, len(seq.output_ids), self.eos_ids, sp, seq.detok)
        ev.text = seq.detok.release(final=seq.finished)
        ev.finish_reason = seq.finish_reason
        if self.req.sampling.reranked:
            seq.events.append(ev)
        else:
            self.emit(ev)

    def done(self, scores: list[float] | None = None) -> RequestDone:
        """Emit buffered best-of events in rank order; the closing RequestDone."""
        req = self.req
        chosen, candidates = self.seqs[: req.sampling.n], None
        if self.req.sampling.reranked:
            scores = scores if scores is not None else self.scores()
            candidates = [Candidate(s.detok.text, list(s.output_ids), sc, s.finish_reason)
                          for s, sc in zip(self.seqs, scores)]
            order = sorted(range(len(self.seqs)), key=lambda i: -scores[i])[: req.sampling.n]
            chosen = [self.seqs[i] for i in order]
            for new_index, s in enumerate(chosen):
                for ev in s.events:
                    ev.index = new_index
                    self.emit(ev)
        signals = self.signal_pair is not None
        results = [SequenceResult(index=i, text=s.detok.text, token_ids=list(s.output_ids),
                                  finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                                  kl_to_reference=s.kl_sum if signals else None,
                                  implicit_reward=s.reward_sum if signals else None)
                   for i, s in enumerate(chosen)]
        return RequestDone(prompt_tokens=len(self.prompt), completion_tokens=sum(len(s.output_ids) for s in self.seqs),
                           sequences=results, weights=dict(req.recipe.weights), candidates=candidates,
                           kl_bound=kl_bound(len(self.seqs)) if self.req.sampling.reranked else None)

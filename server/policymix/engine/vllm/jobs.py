"""One request inside the vLLM engine: its sequences, and what each generated token turns into.

vLLM samples; the rest is the native engine's own code (engine/sequence.py ``SequenceOutput``,
``finish_request``): EOS and stop ids end a sequence, stop strings are found by the same incremental
detokenizer (so text, held-back stop prefixes and the completion's leading space are identical),
``max_tokens`` gives "length". vLLM is asked for token ids only and never stops on a string itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from ..detokenizer import IncrementalDetokenizer
from ..protocol import GenerationRequest, RequestDone, RequestPlan, TokenEvent
from ..sequence import SequenceOutput, finish_request, rerank_scores


@dataclass(eq=False)
class Job:
    plan: RequestPlan
    weights: list[float]  # one per policy of the composite, 0 for those the plan does not run
    tokenizer: Any
    policies: dict[str, int] = field(default_factory=dict)  # policies whose logprobs are reported -> index
    emit: Callable[[Any], None] = lambda ev: None
    seqs: list[SequenceOutput] = field(default_factory=list)
    prompt_sent: bool = False  # prompt logprobs: the PromptEvent went out

    @property
    def req(self) -> GenerationRequest:
        return self.plan.request

    @property
    def prompt(self) -> list[int]:
        """The one rendering every policy of the family sees."""
        return self.plan.prompts[self.plan.leader]

    @property
    def best_of(self) -> int:
        return self.plan.candidates

    def observe(self, ev: TokenEvent, seq: SequenceOutput, values: list[float | None], kl: float | None) -> None:
        """Per-policy logprobs of the token (from the worker), its implicit reward and the step's KL."""
        seq.observe(ev, self.req, {name: values[k] for name, k in self.policies.items()}, self.plan.signal_pair, kl)

    def new_seq(self, index: int) -> SequenceOutput:
        sp = self.plan.sampling
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt, sp.stop, sp.include_stop_str_in_output,
                                       sp.skip_special_tokens)
        seq = SequenceOutput(index, detok)
        self.seqs.append(seq)
        return seq

    def advance(self, seq: SequenceOutput, tok: int, ev: TokenEvent) -> None:
        """Record one sampled token: finish checks, text release, event out (or into the buffer)."""
        seq.add_token(tok, ev, self.plan.sampling, self.plan.eos_ids, self.emit)

    def done(self, scores: list[float] | None = None) -> RequestDone:
        """Emit buffered best-of events in rank order (``scores`` from a reward model, else the implicit
        reward or the mean logprob); the closing RequestDone."""
        if self.plan.sampling.reranked and scores is None:
            scores = rerank_scores(self.seqs, self.req.rerank)
        return finish_request(self.seqs, self.plan, scores, self.emit)

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
from ..protocol import GenerationRequest, ImplicitRewardSpec, RequestDone, TokenEvent
from ..sequence import SequenceOutput, finish_request, rerank_scores


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
    seqs: list[SequenceOutput] = field(default_factory=list)

    @property
    def best_of(self) -> int:
        return self.req.sampling.candidates

    def observe(self, ev: TokenEvent, seq: SequenceOutput, values: list[float | None], kl: float | None) -> None:
        """Per-policy logprobs of the token (from the worker), its implicit reward and the step's KL."""
        seq.observe(ev, self.req, {name: values[k] for name, k in self.policies.items()}, self.signal_pair, kl)

    def new_seq(self, index: int) -> SequenceOutput:
        sp = self.req.sampling
        detok = IncrementalDetokenizer(self.tokenizer, self.prompt, sp.stop, sp.include_stop_str_in_output,
                                       sp.skip_special_tokens)
        seq = SequenceOutput(index, detok)
        self.seqs.append(seq)
        return seq

    def advance(self, seq: SequenceOutput, tok: int, ev: TokenEvent) -> None:
        """Record one sampled token: finish checks, text release, event out (or into the buffer)."""
        seq.add_token(tok, ev, self.req.sampling, self.eos_ids, self.emit)

    def done(self, scores: list[float] | None = None) -> RequestDone:
        """Emit buffered best-of events in rank order (``scores`` from a reward model, else the implicit
        reward or the mean logprob); the closing RequestDone."""
        if self.req.sampling.reranked and scores is None:
            scores = rerank_scores(self.seqs, self.req.rerank)
        return finish_request(self.seqs, self.req, scores, self.emit, signals=self.signal_pair is not None,
                              prompt_tokens=len(self.prompt))

"""Step outputs and the output processor: what a sampled token turns into once the forward is done.

:class:`StepOutput` is plain data (a sequence, its token and the numbers the request asked for); the
core's ``step()`` returns a list of them. :class:`OutputProcessor` then does the per-token work that
needs no tensors, as vLLM's OutputProcessor does: detokenization, stop strings, signals, events, and
closing finished requests. Reward-model reranking runs on its own thread, so scoring one best-of
request never stalls the other streams' steps.
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from ..registry import Registry
from ..rerank import reward_model_scores
from .protocol import ErrorKind, TokenEvent
from .scheduler import Scheduler, failure_of
from .sequence import RequestState, Sequence, Status, finish_request, rerank_scores
from .structured import advance

log = logging.getLogger("policymix.engine")


@dataclass(eq=False)
class StepOutput:
    """One sequence's sampled token of a step."""

    seq: Sequence
    token: int
    logprob: float | None = None  # log_softmax(mixed)[token], when the request needs it
    top_logprobs: list[tuple[int, float]] | None = None
    policy_logprobs: dict[str, float] | None = None  # each policy's log pi_k(token), when asked for
    kl: float | None = None  # KL(q || pi_ref) of the step, with token signals
    fed: bool = False  # a speculative round's token: the core already placed it in the caches and feeds


class OutputProcessor:
    def __init__(self, registry: Registry, scheduler: Scheduler):
        self.registry = registry
        self.scheduler = scheduler
        self._scoring: dict[RequestState, Future] = {}  # reward-model reranks in flight
        self._pool: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()  # a scored request ends once: by its result, an abort or a failure

    def process(self, outputs: list[StepOutput]) -> None:
        """Record every output's token (finish checks, text, event), then let the scheduler feed it on or
        free the slots; a request whose candidates have all finished is closed. Best-of requests with
        ``rerank.prune`` drop their worst running candidates every ``every`` tokens."""
        pruning: dict[RequestState, None] = {}
        for out in outputs:
            seq = out.seq
            state = seq.request
            if state.status == Status.FINISHED or seq.finished:  # a sibling failed; a round's tokens past a stop
                continue
            state.generated += 1
            try:
                ev = TokenEvent(index=seq.index, token_id=out.token, text="", logprob=out.logprob,
                                top_logprobs=out.top_logprobs)
                if out.policy_logprobs is not None:
                    seq.observe(ev, state.req, out.policy_logprobs, state.plan.signal_pair, out.kl)
                if seq.matcher is not None and not advance(seq.matcher, out.token):
                    raise RuntimeError(f"the grammar refused token {out.token}, which its mask allowed")
                seq.add_token(out.token, ev, state.sampling, state.plan.eos_ids, state.emit)
                self.scheduler.update(seq, out.token, out.fed)
                if seq.finished and self.scheduler.done(state):
                    self._close(state)
                elif state.forked and (state.req.search is not None or (
                        state.req.rerank is not None and state.req.rerank.prune_every)):
                    pruning[state] = None
            except Exception as err:  # noqa: BLE001 - e.g. a detokenizer error: only this request fails
                log.exception("post-processing failed for request %s", state.req.request_id)
                self.scheduler.fail(state, *failure_of(err, "post-processing"))
        for state in pruning:
            if state.status == Status.RUNNING:
                try:
                    self._search_round(state) if state.req.search is not None else self._prune(state)
                except Exception as err:  # noqa: BLE001 - e.g. the reward model failed: this request only
                    log.exception("pruning failed for request %s", state.req.request_id)
                    self.scheduler.fail(state, *failure_of(err, "pruning"))

    def _prune(self, state: RequestState) -> None:
        """Every ``every`` tokens (the candidates decode in lockstep), score the running ones on their text so
        far, with the request's own scorer, and stop all but the best ``keep`` fraction (``finish_reason``
        "pruned"; their cache is freed now). At least one runs on, and enough to return ``n``."""
        rr, sp = state.req.rerank, state.sampling
        live = [s for s in state.sequences if not s.finished]
        if not live or len(live[0].output_ids) % rr.prune_every or len(live[0].output_ids) >= sp.max_tokens:
            return
        done = sum(1 for s in state.sequences if s.finished and s.finish_reason != "pruned")
        keep = max(math.ceil(rr.prune_keep * len(live)), sp.n - done, 1)
        if keep >= len(live):
            return
        scores = self._scores(state, live)
        for i in sorted(range(len(live)), key=lambda i: -scores[i])[keep:]:
            seq = live[i]
            seq.finish_reason = "pruned"
            self.scheduler.update(seq, -1)
        if self.scheduler.done(state):
            self._close(state)

    def _search_round(self, state: RequestState) -> None:
        """Chunk-level beam search: when the running branches have sampled a chunk, score them on their text so
        far; the best ``beam_width`` continue, each as ``expand`` branches; the rest stop ("pruned")."""
        search, sp = state.req.search, state.sampling
        live = [s for s in state.sequences if not s.finished]
        if not live or len(live[0].output_ids) % search.chunk or len(live[0].output_ids) >= sp.max_tokens:
            return
        scores = self._scores(state, live)
        order = sorted(range(len(live)), key=lambda i: -scores[i])
        for i in order[search.beam_width:]:
            live[i].finish_reason = "pruned"
            self.scheduler.update(live[i], -1)
        for i in order[: search.beam_width]:
            for _ in range(search.expand - 1):
                self.scheduler.branch(live[i])

    def _scores(self, state: RequestState, seqs: list[Sequence]) -> list[float]:
        rr = state.req.rerank
        if rr is not None and rr.kind == "reward_model":  # partial texts: scored here, on the step thread
            rm = self.registry.policies[rr.reward_model]
            with torch.inference_mode():
                return reward_model_scores(rm, state.req.prompt, [s.detok.text for s in seqs])
        return rerank_scores(seqs, rr)

    def finish_unsampled(self, seq: Sequence) -> None:
        """A sequence that ends before its first token (max_tokens 0: the prompt was only scored)."""
        seq.finish_reason = "length"
        self.scheduler.update(seq, -1)
        if self.scheduler.done(seq.request):
            self._close(seq.request)

    def _close(self, state: RequestState) -> None:
        """Free the request's cache now; rank its candidates (a reward model: off this thread) and end it."""
        self.scheduler.release(state)
        rr = state.req.rerank
        if not (state.sampling.reranked and rr is not None and rr.kind == "reward_model"):
            scores = rerank_scores(state.sequences, rr) if state.sampling.reranked else None
            state.emit(finish_request(state.sequences, state.plan, scores, state.emit, state.generated))
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="policymix-rerank")
        state.status = Status.SCORING
        self._scoring[state] = self._pool.submit(self._score_and_finish, state)

    def _score_and_finish(self, state: RequestState) -> None:
        try:
            rm = self.registry.policies[state.req.rerank.reward_model]
            with torch.inference_mode():
                scores = reward_model_scores(rm, state.req.prompt, [s.detok.text for s in state.sequences])
            done = finish_request(state.sequences, state.plan, scores, state.emit, state.generated)
        except Exception as err:  # noqa: BLE001 - this request fails, the engine goes on
            log.exception("reward-model scoring failed for request %s", state.req.request_id)
            done = state.plan.failure(*failure_of(err, "reward-model scoring"))
        self._end(state, done)

    def _end(self, state: RequestState, done) -> None:
        with self._lock:
            if state.status != Status.SCORING:  # aborted or failed meanwhile
                return
            state.status = Status.FINISHED
        if done is not None:
            state.emit(done)

    def reap(self) -> None:
        """Forget finished scoring jobs (called between steps)."""
        for state in [s for s, f in self._scoring.items() if f.done()]:
            del self._scoring[state]

    def wait(self, timeout: float) -> None:
        """Until a scoring job ends, at most ``timeout`` seconds (at once when none runs)."""
        self.reap()
        if self._scoring:
            wait(list(self._scoring.values()), timeout=timeout, return_when=FIRST_COMPLETED)

    def has_work(self) -> bool:
        self.reap()
        return bool(self._scoring)

    def abort(self, request_id: str) -> None:
        for state in list(self._scoring):
            if state.req.request_id == request_id:
                self._end(state, None)  # its result is dropped when it comes

    def fail_all(self, message: str) -> None:
        for state in list(self._scoring):
            self._end(state, state.plan.failure(ErrorKind.OVERLOADED, message, "engine_stopped"))
        self._scoring.clear()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)


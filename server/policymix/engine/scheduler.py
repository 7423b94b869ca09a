"""The native engine's scheduler: who waits, who runs, and the cache slots they hold.

It admits, forks, branches and frees; the output processor tells it when a sequence ends.
Admission takes waiting requests in order while they fit the sequence limit (``max_num_seqs``) and
every policy's KV budget; a request that waited past its deadline fails instead. A request of
``best_of`` candidates is admitted as its leader, which runs the shared prefill; :meth:`fork` then
copies the leader's cache to the siblings, and :meth:`branch` continues a beam from any sequence.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from itertools import count
from typing import Callable

import torch

from ..errors import PolicymixError
from .detokenizer import IncrementalDetokenizer
from .protocol import ErrorKind
from .runner import PolicyRunner
from .sequence import Lane, RequestState, Sequence, Status
from .structured import new_matcher

log = logging.getLogger("policymix.engine")


class QueueFull(Exception):
    """The waiting queue is at ``max_queue``."""


def is_oom(err: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def failure_of(err: BaseException, what: str) -> tuple[ErrorKind, str, str]:
    """(kind, message, code) of an exception inside a step: out of memory is retryable, the rest internal."""
    if is_oom(err):
        return ErrorKind.OUT_OF_MEMORY, f"out of memory {what}; retry later", "out_of_memory"
    return ErrorKind.INTERNAL, f"{what} failed: {type(err).__name__}: {err}", "engine_error"


class Scheduler:
    def __init__(self, runners: dict[str, PolicyRunner], kv_budget: dict[str, int], max_num_seqs: int,
                 max_queue: int, tokenizer_of: Callable[[str], object]):
        self.runners = runners
        self.kv_budget = kv_budget
        self.max_num_seqs = max_num_seqs
        self.max_queue = max_queue
        self._tokenizer_of = tokenizer_of  # policy -> tokenizer (the detokenizer's)
        self.waiting: deque[RequestState] = deque()
        self.running: dict[RequestState, None] = {}  # insertion-ordered set
        self.reserved: dict[str, int] = defaultdict(int)  # KV cells promised per policy
        self.running_seqs = 0  # candidates of the running requests (each admitted with all of its best_of)
        self._seq_ids = count()
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns() % (2**31)))

    # ----- requests in and out -----------------------------------------------------------------

    def check_budget(self, state: RequestState) -> None:
        """A request that could never fit its policies' KV budgets is bad input, not a wait."""
        for p in state.plan.budgeted:
            if state.reserved_tokens(p) > self.kv_budget[p]:
                raise PolicymixError(
                    f"the request needs {state.reserved_tokens(p)} KV-cache tokens of policy {p} "
                    f"(best_of x (prompt + max_tokens)), more than its budget of {self.kv_budget[p]}",
                    param="max_tokens")

    def add(self, state: RequestState) -> None:
        self.admit()  # what fits runs now: a burst on an idle engine is not refused for want of a step
        if len(self.waiting) >= self.max_queue:
            raise QueueFull(f"the server queue is full ({self.max_queue} waiting requests)")
        self.check_budget(state)
        self.waiting.append(state)

    def abort(self, request_id: str) -> list[RequestState]:
        """Drop a waiting request or free a running one at once; return what was dropped."""
        dropped = [s for s in self.waiting if s.req.request_id == request_id]
        for state in dropped:
            self.waiting.remove(state)
            state.status = Status.FINISHED
        for state in [s for s in self.running if s.req.request_id == request_id]:
            for seq in state.sequences:
                if not seq.finished:
                    seq.finish_reason = "abort"
            self.release(state)
            dropped.append(state)
        return dropped

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- admission -------------------------------------------------------------------------

    def admit(self) -> None:
        now = time.monotonic()
        while self.waiting:
            state = self.waiting[0]
            if state.req.deadline is not None and now > state.req.deadline:
                self.waiting.popleft()
                self.fail(state, ErrorKind.OVERLOADED, "the request waited in the queue longer than its deadline",
                          "queue_timeout")
                continue
            fits = all(self.reserved[p] + state.reserved_tokens(p) <= self.kv_budget[p] for p in state.plan.budgeted)
            if self.running_seqs + state.best_of > self.max_num_seqs or not fits:
                break
            self.waiting.popleft()
            if not self._grow_caches(state):
                continue
            self.running_seqs += state.best_of
            for p in state.plan.budgeted:
                self.reserved[p] += state.reserved_tokens(p)
            state.status = Status.RUNNING
            leader = self._new_sequence(state, 0)
            if state.plan.scored is not None:
                leader.score_prompt, leader.score_left = True, len(state.plan.scored)
            for stream, prompt in state.prompts.items():
                lane = leader.lanes[stream] = Lane(leader, stream, list(prompt))
                self.runners[state.plan.runner(stream)].add(lane)
            self.running[state] = None

    def _grow_caches(self, state: RequestState) -> bool:
        """Allocate the joining request's cache rows now (slots for best_of, room for its prompt), so that
        running out of memory refuses this request instead of failing a step everyone shares."""
        try:
            for p in state.plan.runners:
                lanes = [prompt for stream, prompt in state.prompts.items() if state.plan.runner(stream) == p]
                runner = self.runners[p]
                runner.cache.reserve(len(runner.slots) + state.best_of * len(lanes),
                                     max(runner.lengths, default=0) + max(len(x) for x in lanes))
        except Exception as err:  # noqa: BLE001 - only allocation failures are expected here
            if not is_oom(err):
                raise
            log.warning("out of memory admitting request %s: %s", state.req.request_id, err)
            self.fail(state, *failure_of(err, "while admitting the request"))
            return False
        return True

    def _new_sequence(self, state: RequestState, index: int) -> Sequence:
        seed = state.plan.seed(index)
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), generator=self._seed_rng))
        sp = state.sampling
        leader = state.plan.leader
        detok = IncrementalDetokenizer(self._tokenizer_of(state.plan.policy_of(leader)), state.prompts[leader], sp.stop,
                                       sp.include_stop_str_in_output, sp.skip_special_tokens)
        seq = Sequence(index, detok, seq_id=next(self._seq_ids), request=state,
                       generator=torch.Generator().manual_seed(seed))
        if state.plan.grammar is not None:  # each candidate its own matcher (a branch forks its parent's)
            seq.matcher = new_matcher(state.plan.grammar)
        state.sequences.append(seq)
        state.live += 1
        return seq

    def fork(self, state: RequestState) -> list[Sequence]:
        """The siblings of a request whose leader just ran the prefill: each joins every policy with a copy
        of the leader's cache (n > 1 and best-of share the prompt's prefill)."""
        state.forked = True
        leader = state.sequences[0]
        siblings = []
        search = state.req.search
        for i in range(1, search.expand if search is not None else state.best_of):
            sib = self._new_sequence(state, i)
            for stream, src in leader.lanes.items():
                lane = sib.lanes[stream] = Lane(sib, stream)
                self.runners[state.plan.runner(stream)].fork(src, lane)
            siblings.append(sib)
        return siblings

    def branch(self, seq: Sequence) -> Sequence:
        """A new sequence that continues from ``seq`` as it is now (beam search): its tokens, text, signal
        sums and buffered events copied, its caches forked; it samples with a generator of its own."""
        state = seq.request
        child = self._new_sequence(state, len(state.sequences))
        child.detok = seq.detok.clone()
        child.output_ids = list(seq.output_ids)
        child.cum_logprob, child.kl_sum, child.reward_sum = seq.cum_logprob, seq.kl_sum, seq.reward_sum
        child.policy_logprob_sums = dict(seq.policy_logprob_sums)
        child.events = list(seq.events)
        if seq.matcher is not None:
            child.matcher = seq.matcher.fork()
        for stream, src in seq.lanes.items():
            lane = child.lanes[stream] = Lane(child, stream, list(src.feed))
            self.runners[state.plan.runner(stream)].fork(src, lane)
        return child

    # ----- after a step ----------------------------------------------------------------------

    def update(self, seq: Sequence, token: int, fed: bool = False) -> None:
        """A sequence's sampled token was recorded: feed it on (unless a speculative round already placed it:
        ``fed``), or free the slots of a finished sequence."""
        state = seq.request
        if seq.finished:
            for lane in seq.lanes.values():
                self.runners[state.plan.runner(lane.stream)].remove(lane)
            state.live -= 1
        elif not fed:
            for lane in seq.lanes.values():
                lane.feed.append(token)

    def done(self, state: RequestState) -> bool:
        """Every candidate of the request has finished (its siblings were created: they fork after the
        leader's first step)."""
        return state.live == 0 and (state.forked or len(state.sequences) >= state.best_of)

    def release(self, state: RequestState) -> None:
        """Free every cache slot and reservation of a request at once."""
        for seq in state.sequences:
            for lane in seq.lanes.values():
                runner = self.runners[state.plan.runner(lane.stream)]
                if runner.holds(lane):
                    runner.remove(lane)
        if state in self.running:
            del self.running[state]
            self.running_seqs -= state.best_of
            for p in state.plan.budgeted:
                self.reserved[p] -= state.reserved_tokens(p)
        state.status = Status.FINISHED

    def fail(self, state: RequestState, kind: ErrorKind, message: str, code: str | None = None) -> None:
        if state.status == Status.FINISHED:
            return
        try:
            self.release(state)
        finally:  # the client hears of it even if releasing fails
            state.status = Status.FINISHED
            state.emit(state.plan.failure(kind, message, code))

    def fail_all(self, message: str, code: str = "engine_stopped") -> None:
        """Answer every request inside with an error (shutdown, or a dead loop: the core may be broken)."""
        for state in [*self.running, *self.waiting]:
            try:
                self.fail(state, ErrorKind.OVERLOADED, message, code)
            except Exception:  # noqa: BLE001 - the error event went out; a broken cache must not stop the rest
                log.exception("releasing request %s failed", state.req.request_id)
        self.waiting.clear()


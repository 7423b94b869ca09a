"""The synchronous engine core: ``step()`` = admit, forward every policy, mix, sample, post-process.

It knows nothing of threads or HTTP; :mod:`policymix.engine.native` drives it from one thread.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from itertools import count

import torch

from ..errors import Overloaded, PolicymixError
from ..rerank import reward_model_scores
from ..registry import Registry
from .detokenizer import IncrementalDetokenizer
from .protocol import GenerationRequest, RequestDone, TokenEvent
from .requests import check_request
from .runner import PolicyRunner
from .sampler import apply_penalties, argmax_rows, sample_token
from .sequence import RequestState, Sequence, Status, finish_request, rerank_scores

log = logging.getLogger("policymix.engine")


def _decode_mode(setting: str, device) -> str:
    """auto: CUDA graphs on a GPU, the general dynamic path elsewhere (graphs need CUDA: static there)."""
    on_gpu = str(device).startswith("cuda")
    if setting == "auto":
        return "graphs" if on_gpu else "dynamic"
    return "static" if setting == "graphs" and not on_gpu else setting


def _has_penalties(sp) -> bool:
    return bool(sp.logit_bias or sp.presence_penalty or sp.frequency_penalty or sp.repetition_penalty != 1.0)


def is_oom(err: BaseException) -> bool:
    """An allocation failure: CUDA's OutOfMemoryError, Python's MemoryError, or the CPU allocator's RuntimeError."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(err, RuntimeError) and "can't allocate memory" in str(err)


def _failure(err: BaseException, what: str) -> tuple[str, str, int]:
    """(message, code, status) of an exception inside a step: out of memory is 503 (retry), the rest 500."""
    if is_oom(err):
        return f"out of memory {what}; retry later", "out_of_memory", 503
    return f"{what} failed: {type(err).__name__}: {err}", "engine_error", 500


@dataclass
class PolicyLogits:
    """One policy's next-token logits of a step, a row per cache slot (``slots``: the sequence in each)."""

    logits: torch.Tensor  # [B_p, V] float32
    slots: list[Sequence]
    slot_of: dict[int, int] = field(init=False)  # seq_id -> row
    _logprobs: torch.Tensor | None = field(default=None, init=False)

    def __post_init__(self):
        self.slot_of = {seq.seq_id: i for i, seq in enumerate(self.slots)}

    def logprobs(self, seq: Sequence) -> torch.Tensor:
        """log_softmax of ``seq``'s logits [V] (a sibling's first step reads its leader's row). The
        batch's log_softmax is computed once, and only when a request asks for per-policy logprobs."""
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self.logits, dim=-1)
        row = self.slot_of.get(seq.seq_id)
        return self._logprobs[self.slot_of[seq.request.sequences[0].seq_id] if row is None else row]


class EngineCore:
    def __init__(self, registry: Registry):
        self.registry = registry
        srv = registry.config.server
        self.max_num_seqs = srv.max_num_seqs
        self.max_queue = srv.max_queue
        self.runners: dict[str, PolicyRunner] = {}
        for name, p in registry.policies.items():
            if p.kind != "causal":
                continue
            tok = p.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            self.runners[name] = PolicyRunner(name, p.model, p.vocab_size, pad, p.device, p.dtype,
                                              decode=_decode_mode(srv.decode, p.device), cpu_linear=srv.cpu_linear)
        self.kv_budget = {n: srv.kv_budget_tokens or srv.max_num_seqs * registry.max_model_len(p.family)
                          for n, p in registry.policies.items()}
        self.reserved: dict[str, int] = defaultdict(int)
        self.waiting: deque[RequestState] = deque()
        self.running: list[RequestState] = []
        self._seq_ids = count()
        self._seed_rng = torch.Generator().manual_seed(int(time.time_ns() % (2**31)))
        self.timers: dict[str, float] = defaultdict(float)  # cumulative seconds per phase
        self.steps = 0

    # ----- requests in and out -----------------------------------------------------------------

    def render(self, req: GenerationRequest) -> RequestState:
        """Resolve the policies a request runs and render its prompt for each (raises on bad input)."""
        reg = self.registry
        pair, observers = check_request(reg, req)
        weights = dict(req.recipe.active)
        for name in observers:
            weights.setdefault(name, 0.0)
        prompts = {name: reg.policies[name].render(req.prompt) for name in weights}
        first = reg.policies[next(iter(weights))]
        eos = set()
        for p in weights:
            t = reg.policies[p].tokenizer.eos_token_id
            if t is not None:
                eos.add(t)
            gen_eos = getattr(getattr(reg.policies[p].model, "generation_config", None), "eos_token_id", None)
            eos.update(gen_eos if isinstance(gen_eos, list) else [gen_eos] if gen_eos is not None else [])
        state = RequestState(req=req, emit=lambda e: None, prompts=prompts, weights=weights,
                             signal_pair=pair if req.return_token_signals else None, eos_ids=eos)
        reg.check_length(first.family, state.prompt_len, req.sampling.max_tokens)
        self._check_budget(state)
        return state

    def _check_budget(self, state: RequestState) -> None:
        """A request that could never fit its policies' KV budgets is bad input (400), not a wait."""
        for p in state.prompts:
            if state.reserved_tokens(p) > self.kv_budget[p]:
                raise PolicymixError(
                    f"the request needs {state.reserved_tokens(p)} KV-cache tokens of policy {p} "
                    f"(best_of x (prompt + max_tokens)), more than its budget of {self.kv_budget[p]}",
                    param="max_tokens")

    def add(self, state: RequestState) -> None:
        self._admit()  # what fits runs now: a burst on an idle engine is not refused for want of a step
        if len(self.waiting) >= self.max_queue:
            raise Overloaded(f"the server queue is full ({self.max_queue} waiting requests)", status=503)
        self._check_budget(state)
        self.waiting.append(state)

    def abort(self, request_id: str) -> None:
        for state in list(self.waiting):
            if state.req.request_id == request_id:
                self.waiting.remove(state)
        for state in list(self.running):
            if state.req.request_id == request_id:
                for seq in state.sequences:
                    if not seq.finished:
                        seq.finish_reason = "abort"
                self._release(state)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def fail_all(self, message: str, status: int = 503, code: str = "engine_stopped") -> None:
        """Answer every request inside with an error (shutdown, or a dead loop: the core may be broken)."""
        for state in list(self.running) + list(self.waiting):
            try:
                self._fail(state, message, code=code, status=status)
            except Exception:  # noqa: BLE001 - the error event went out; a broken cache must not stop the rest
                log.exception("releasing request %s failed", state.req.request_id)
        self.waiting.clear()

    # ----- scheduling --------------------------------------------------------------------------

    def _admit(self) -> None:
        now = time.monotonic()
        running_seqs = sum(s.best_of for s in self.running)
        while self.waiting:
            state = self.waiting[0]
            if state.req.deadline is not None and now > state.req.deadline:
                self.waiting.popleft()
                self._fail(state, "the request waited in the queue longer than its deadline", code="queue_timeout",
                           status=503)
                continue
            fits = all(self.reserved[p] + state.reserved_tokens(p) <= self.kv_budget[p] for p in state.prompts)
            if running_seqs + state.best_of > self.max_num_seqs or not fits:
                break
            self.waiting.popleft()
            if not self._grow_caches(state):
                continue
            running_seqs += state.best_of
            for p in state.prompts:
                self.reserved[p] += state.reserved_tokens(p)
            state.status = Status.RUNNING
            leader = self._new_sequence(state, 0)
            for p in state.prompts:
                leader.feeds[p] = list(state.prompts[p])
                self.runners[p].add(leader)
            self.running.append(state)

    def _grow_caches(self, state: RequestState) -> bool:
        """Allocate the joining request's cache rows now (slots for best_of, room for its prompt), so that
        running out of memory refuses this request with a 503 instead of failing a step everyone shares."""
        try:
            for p, prompt in state.prompts.items():
                runner = self.runners[p]
                runner.cache.reserve(len(runner.slots) + state.best_of, max(runner.lengths, default=0) + len(prompt))
        except Exception as err:  # noqa: BLE001 - only allocation failures are expected here
            if not is_oom(err):
                raise
            log.warning("out of memory admitting request %s: %s", state.req.request_id, err)
            self._fail(state, *_failure(err, "while admitting the request"))
            return False
        return True

    def _new_sequence(self, state: RequestState, index: int) -> Sequence:
        req = state.req
        seed = req.sampling.seed
        gen = torch.Generator()
        if seed is not None:
            gen.manual_seed((seed * 1_000_003 + index) % (2**63))  # siblings differ, repeatably
        else:
            gen.manual_seed(int(torch.randint(0, 2**62, (), generator=self._seed_rng)))
        first = next(iter(state.prompts))
        detok = IncrementalDetokenizer(self.registry.policies[first].tokenizer, state.prompts[first],
                                       req.sampling.stop, req.sampling.include_stop_str_in_output,
                                       req.sampling.skip_special_tokens)
        seq = Sequence(index, detok, seq_id=next(self._seq_ids), request=state, generator=gen)
        state.sequences.append(seq)
        return seq

    def _release(self, state: RequestState) -> None:
        """Free every cache slot and reservation of a request at once."""
        for seq in state.sequences:
            for p in state.prompts:
                runner = self.runners[p]
                if seq in runner.slots:
                    runner.remove(seq)
        if state in self.running:
            self.running.remove(state)
            for p in state.prompts:
                self.reserved[p] -= state.reserved_tokens(p)
        state.status = Status.FINISHED

    def _fail(self, state: RequestState, message: str, code: str = "engine_error", status: int = 500) -> None:
        if state.status == Status.FINISHED:
            return
        try:
            self._release(state)
        finally:  # the client hears of it even if releasing fails
            state.status = Status.FINISHED
            state.emit(RequestDone(prompt_tokens=state.prompt_len, completion_tokens=0, sequences=[],
                                   weights=dict(state.req.recipe.weights), error=message, error_status=status,
                                   error_code=code))

    # ----- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        t0 = time.perf_counter()
        self._admit()
        self.timers["schedule"] += time.perf_counter() - t0
        if not self.running:
            return
        self.steps += 1
        # forward every policy that has sequences, once, over exactly those sequences
        logits: dict[str, PolicyLogits] = {}
        for name, runner in self.runners.items():
            if not runner.slots:
                continue
            t = time.perf_counter()
            try:
                lp = runner.forward()  # [B_p, V] logits
            except Exception as err:  # noqa: BLE001 - fail the requests in this batch, keep serving
                log.exception("forward of policy %s failed", name)
                for state in {id(seq.request): seq.request for seq in runner.slots}.values():  # (unhashable)
                    self._fail(state, *_failure(err, f"in the forward of policy {name}"))
                continue
            logits[name] = PolicyLogits(lp, list(runner.slots))
            self.timers[f"forward:{name}"] += time.perf_counter() - t
        for family_states in self._by_family().values():
            try:
                self._mix_and_sample(family_states, logits)
            except Exception as err:  # noqa: BLE001 - a bug or OOM while mixing fails these requests, not the loop
                log.exception("mixing failed")
                for state in family_states:
                    self._fail(state, *_failure(err, "while mixing"))

    @staticmethod
    def _mix(seqs: list[Sequence], policies: set[str], logits: dict[str, PolicyLogits]) -> torch.Tensor:
        """mixed [S, V] = sum_k w_k * l_k over the raw logits, a row per sequence (``seq.row``).

        The design's score is sum_k w_k * log_softmax(l_k); the two differ by sum_k w_k * log Z_k, one
        constant per row, which q = softmax(mixed) and every sampling rule but the repetition penalty
        ignore (that one reads signs: its rows use the design's score, ``_weighted_logprobs``). Mixing
        logits saves a log_softmax per policy per step; logprobs are normalised only for the requests
        that ask for them. A policy whose slots are the rows in order is added without a gather."""
        row_of = {s.seq_id: s.row for s in seqs}
        every_row = tuple(range(len(seqs)))
        terms = []  # (logits of the contributing rows [n, V], their rows, a scalar weight)
        for p in policies:
            pl = logits[p]
            members = [(i, row_of[s.seq_id], w) for i, s in enumerate(pl.slots)
                       if s.seq_id in row_of and (w := s.request.weights.get(p, 0.0)) != 0.0]
            if not members:
                continue
            slots, rows, ws = zip(*members)
            x = pl.logits
            if len(slots) != x.shape[0]:
                x = x.index_select(0, torch.tensor(slots, device=x.device))
            alpha = ws[0]
            if any(w != alpha for w in ws):  # per-row weights (requests with different recipes)
                x, alpha = x * torch.tensor(ws, dtype=x.dtype, device=x.device)[:, None], 1.0
            terms.append((x, rows, alpha))
        if len(terms) == 1 and terms[0][1] == every_row and terms[0][2] == 1.0:
            return terms[0][0]  # one policy at weight 1 over every row: its logits as they are
        first = next((i for i, t in enumerate(terms) if t[1] == every_row), None)
        if first is not None:
            x, _, alpha = terms.pop(first)
            mixed = torch.mul(x, alpha)  # a new tensor: the policies' logits stay untouched
        else:
            some = logits[next(iter(policies))].logits
            mixed = torch.zeros(len(seqs), some.shape[1], dtype=torch.float32, device=some.device)
        for x, rows, alpha in terms:
            if rows == every_row:
                mixed.add_(x, alpha=alpha)
            else:
                mixed.index_add_(0, torch.tensor(rows, device=x.device), x, alpha=alpha)
        return mixed

    def _by_family(self) -> dict[int, list[RequestState]]:
        groups: dict[int, list[RequestState]] = defaultdict(list)
        for state in self.running:
            groups[state.req.recipe.family].append(state)
        return groups

    def _mix_and_sample(self, states: list[RequestState], logits: dict[str, PolicyLogits]) -> None:
        t = time.perf_counter()
        seqs = [s for st in states for s in st.sequences if not s.finished]
        if not seqs:
            return
        policies = {p for st in states for p in st.weights if p in logits}
        # rows follow the slot order of the largest policy batch, so that its logits (and those of every
        # policy whose slots hold the same sequences, as in one-recipe traffic) need no gather
        anchor = logits[max(policies, key=lambda p: len(logits[p].slots))].slot_of
        seqs.sort(key=lambda s: anchor.get(s.seq_id, len(anchor)))
        for row, seq in enumerate(seqs):
            seq.row = row
        mixed = self._mix(seqs, policies, logits)
        # n > 1: siblings join now with the leader's prompt cache and its first-step scores
        sources = [s.row for s in seqs]
        for st in states:
            if not st.forked:
                st.forked = True
                leader = st.sequences[0]
                for i in range(1, st.best_of):
                    sib = self._new_sequence(st, i)
                    for p in st.prompts:
                        self.runners[p].fork(leader, sib)
                        sib.feeds[p] = []
                    sib.row = len(sources)
                    sources.append(leader.row)
                    seqs.append(sib)
        if len(sources) > mixed.shape[0]:
            mixed = mixed.index_select(0, torch.tensor(sources, device=mixed.device))
        finite = torch.isfinite(mixed.amax(dim=-1))  # a NaN or +inf anywhere, or a row all -inf
        device = mixed.device
        self.timers["mix"] += time.perf_counter() - t

        t = time.perf_counter()
        bad = (~finite).tolist()  # one host sync, not one per row
        tokens: list[int | None] = [None] * len(seqs)
        errors: dict[int, BaseException] = {}  # row -> exception while sampling it (fails only its request)
        plain = []  # greedy rows with nothing to apply: one batched argmax
        for i, seq in enumerate(seqs):
            if bad[seq.row]:
                continue
            sp = seq.request.req.sampling
            blocked = []
            if len(seq.output_ids) < sp.min_tokens:
                blocked = sorted(seq.request.eos_ids | set(sp.stop_token_ids))
            if sp.temperature == 0.0 and not blocked and not _has_penalties(sp):
                plain.append(i)
                continue
            try:
                # the repetition penalty scales by sign: it reads the design's score, not the logits
                row = self._weighted_logprobs(seq, logits) if sp.repetition_penalty != 1.0 else mixed[seq.row]
                s = apply_penalties(row, sp, seq.request.prompts[next(iter(seq.request.prompts))],
                                    seq.output_ids, blocked)
                tokens[i] = sample_token(s, sp, seq.generator)
            except Exception as err:  # noqa: BLE001 - this request fails, the batch goes on
                log.exception("sampling failed for request %s", seq.request.req.request_id)
                errors[i] = err
        if plain:
            rows = [seqs[i].row for i in plain]
            greedy = mixed if rows == list(range(mixed.shape[0])) else mixed.index_select(
                0, torch.tensor(rows, device=device))
            for i, tok in zip(plain, argmax_rows(greedy).tolist()):
                tokens[i] = tok
        self.timers["sample"] += time.perf_counter() - t

        t = time.perf_counter()
        ok = [(seq, tok) for seq, tok in zip(seqs, tokens) if tok is not None]
        for i, (seq, tok) in enumerate(zip(seqs, tokens)):
            if i in errors:
                self._fail(seq.request, *_failure(errors[i], "sampling"))
            elif tok is None and seq.request.status != Status.FINISHED:
                self._fail(seq.request, "the mixed distribution is not finite (NaN or infinite log-probabilities)",
                           code="nan")
        ok = [(seq, tok) for seq, tok in ok if seq.request.status != Status.FINISHED]
        if ok:
            self._record(ok, mixed, logits)
        self.timers["detok"] += time.perf_counter() - t

    @staticmethod
    def _weighted_logprobs(seq: Sequence, logits: dict[str, PolicyLogits]) -> torch.Tensor:
        """sum_k w_k * log_softmax(l_k) [V] of one sequence."""
        terms = [w * logits[p].logprobs(seq) for p, w in seq.request.weights.items() if w != 0.0 and p in logits]
        return sum(terms[1:], terms[0])

    def _record(self, ok, mixed, logits: dict[str, PolicyLogits]) -> None:
        """Logprobs and signals of the chosen tokens, then stop checks and events."""
        # q = log_softmax(mixed), only over the rows whose requests need it
        need = [k for k, (seq, _) in enumerate(ok) if seq.request.req.needs_logprob]
        logq_of: dict[int, int] = {}  # seq.row -> row of logq
        logq = chosen = None
        if need:
            rows = [ok[k][0].row for k in need]
            logq_of = {r: i for i, r in enumerate(rows)}
            logq = torch.log_softmax(mixed.index_select(0, torch.tensor(rows, device=mixed.device)), dim=-1)
            toks = torch.tensor([ok[k][1] for k in need], device=mixed.device)
            chosen = logq.gather(1, toks[:, None])[:, 0].tolist()
        for seq, tok in ok:
            if seq.request.status == Status.FINISHED:  # a sibling failed just before
                continue
            try:
                i = logq_of.get(seq.row)
                self._record_one(seq, tok, None if i is None else logq[i], None if i is None else chosen[i], logits)
            except Exception as err:  # noqa: BLE001 - e.g. a detokenizer or reward-model error: only this request
                log.exception("post-processing failed for request %s", seq.request.req.request_id)
                self._fail(seq.request, *_failure(err, "post-processing"))

    def _record_one(self, seq: Sequence, tok: int, logq: torch.Tensor | None, chosen: float | None,
                    logits: dict[str, PolicyLogits]) -> None:
        """One sequence's token: its logprobs (``logq`` [V], when the request needs them) and signals,
        then stop checks and the event."""
        state = seq.request
        req = state.req
        sp = req.sampling
        ev = TokenEvent(index=seq.index, token_id=tok, text="", logprob=chosen)
        if sp.logprobs:
            top = torch.topk(logq, min(sp.logprobs, logq.shape[0]))
            ev.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
        if req.needs_policy_logprobs:
            pl = {p: float(logits[p].logprobs(seq)[tok]) for p in state.weights}
            pair = state.signal_pair
            kl = None
            if pair is not None:
                kl = float((logq.exp() * (logq - logits[pair.reference].logprobs(seq))).sum().clamp_min(0.0))
            seq.observe(ev, req, pl, pair, kl)
        self._advance(seq, tok, ev)

    def _advance(self, seq: Sequence, tok: int, ev: TokenEvent) -> None:
        state = seq.request
        seq.add_token(tok, ev, state.req.sampling, state.eos_ids, state.emit)
        if seq.finished:
            for p in state.prompts:
                self.runners[p].remove(seq)
            if all(s.finished for s in state.sequences) and len(state.sequences) == state.best_of:
                self._finish(state)
        else:
            for p in state.prompts:
                seq.feeds[p].append(tok)

    def _finish(self, state: RequestState) -> None:
        scores = self._scores(state) if state.req.sampling.reranked else None
        done = finish_request(state.sequences, state.req, scores, state.emit, signals=state.signal_pair is not None,
                              prompt_tokens=state.prompt_len)
        self._release(state)
        state.emit(done)

    def _scores(self, state: RequestState) -> list[float]:
        rr = state.req.rerank
        if rr is not None and rr.kind == "reward_model":
            rm = self.registry.policies[rr.reward_model]
            return reward_model_scores(rm, state.req.prompt, [s.detok.text for s in state.sequences])
        return rerank_scores(state.sequences, rr)

"""The synchronous engine core. ``step()`` = schedule, forward every policy, mix and sample, process.

It knows nothing of threads or HTTP; :mod:`policymix.engine.native` drives it from one thread. The
scheduler (who runs), the runners (forwards), the sampler and the output processor (text, stops,
events) each live in their own module; this one turns the policies' logits into step outputs.
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

import torch

from ..mixing.signals import kl_to_reference
from ..registry import Registry
from .outputs import OutputProcessor, StepOutput
from .plan import make_plan
from . import prompt_scoring
from .protocol import ErrorKind, GenerationRequest
from .runner import PolicyRunner
from .sampler import RowSampling, apply_penalties, filtered_logits, sample_rows
from .scheduler import Scheduler, failure_of
from .sequence import Lane, RequestState, Sequence, Status
from .speculative import DEFAULT_MAX_CONCURRENCY, Draft, Speculator, accept, drafter_key
from .structured import mask_positions, mask_rows

log = logging.getLogger("policymix.engine")


def _decode_mode(setting: str, device) -> str:
    """auto: CUDA graphs on a GPU, the general dynamic path elsewhere (graphs need CUDA: static there)."""
    on_gpu = str(device).startswith("cuda")
    if setting == "auto":
        return "graphs" if on_gpu else "dynamic"
    return "static" if setting == "graphs" and not on_gpu else setting


@dataclass
class PolicyLogits:
    """One policy's next-token logits of a step, a row per cache slot (``slots``: the lane in each: a
    sequence's context in this policy, its own or a prompt variant's)."""

    logits: torch.Tensor  # [B_p, V] float32
    slots: list[Lane]
    positions: dict[Lane, torch.Tensor] = field(default_factory=dict)  # verifying lanes: [k + 1, V] logits
    _logprobs: torch.Tensor | None = field(default=None, init=False)

    @cached_property
    def slot_of(self) -> dict[tuple[int, str], int]:
        """(seq_id, stream) -> row; built only when a request asks for per-policy logprobs."""
        return {(lane.seq.seq_id, lane.stream): i for i, lane in enumerate(self.slots)}

    def logprobs(self, seq: Sequence, stream: str) -> torch.Tensor:
        """log_softmax of ``seq``'s logits in context ``stream`` [V] (a sibling's first step reads its
        leader's row). The batch's log_softmax is computed once, and only when a request asks for it."""
        if self._logprobs is None:
            self._logprobs = torch.log_softmax(self.logits, dim=-1)
        row = self.slot_of.get((seq.seq_id, stream))
        if row is None:
            row = self.slot_of[(seq.request.sequences[0].seq_id, stream)]
        return self._logprobs[row]


class EngineCore:
    def __init__(self, registry: Registry):
        self.registry = registry
        srv = registry.config.server
        # one runner per set of weights: policies that share a loaded model (prompted policies) are lanes of
        # one forward, named after the first of them (registry.runner_key)
        self.runners: dict[str, PolicyRunner] = {}
        for name, p in registry.policies.items():
            if p.kind != "causal" or registry.runner_key(name) != name:
                continue
            tok = p.tokenizer
            pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
            adapters = {n: registry.policies[n].adapter for n in registry.runner_policies(name)
                        if registry.policies[n].adapter is not None}
            self.runners[name] = PolicyRunner(name, p.forward_model, p.vocab_size, pad, p.device, p.dtype,
                                              decode=_decode_mode(srv.decode, p.device), cpu_linear=srv.cpu_linear,
                                              adapters=adapters)
        # speculative decoding: each set of weights can draft, on a cache of its own that starts small
        self.drafters = {drafter_key(name): PolicyRunner(drafter_key(name), r.model, r.vocab_size, r.pad_id, r.device,
                                                         r.dtype, cpu_linear=srv.cpu_linear, slots=1, capacity=16,
                                                         adapters=r.adapters)
                         for name, r in self.runners.items()}
        spec = srv.speculative
        self.speculator = Speculator(self.drafters, spec.max_concurrency if spec else DEFAULT_MAX_CONCURRENCY,
                                     spec.adaptive if spec else True)
        # KV budgets are per policy (a shared runner's cache holds the cells of each of its policies)
        kv_budget = {n: srv.kv_budget_tokens or srv.max_num_seqs * registry.max_model_len(p.family)
                     for n, p in registry.policies.items()}
        self.scheduler = Scheduler({**self.runners, **self.drafters}, kv_budget,
                                   srv.max_num_seqs, srv.max_queue, lambda name: registry.policies[name].tokenizer)
        self.parallel = _parallel_forwards(srv.policy_parallel, self.runners)
        self.outputs = OutputProcessor(registry, self.scheduler)
        self.timers: dict[str, float] = defaultdict(float)  # cumulative seconds per phase
        self.steps = 0

    # what tests and /metrics read of the scheduler
    @property
    def waiting(self):
        return self.scheduler.waiting

    @property
    def running(self) -> list[RequestState]:
        return list(self.scheduler.running)

    @property
    def reserved(self) -> dict[str, int]:
        return self.scheduler.reserved

    @property
    def max_num_seqs(self) -> int:
        return self.scheduler.max_num_seqs

    @max_num_seqs.setter
    def max_num_seqs(self, value: int) -> None:  # benchmarks cap the batch of a loaded engine
        self.scheduler.max_num_seqs = value

    @property
    def max_queue(self) -> int:
        return self.scheduler.max_queue

    @max_queue.setter
    def max_queue(self, value: int) -> None:
        self.scheduler.max_queue = value

    # ----- requests in and out -----------------------------------------------------------------

    def render(self, req: GenerationRequest) -> RequestState:
        """Plan a request (raises on bad input, a budget it could never fit included) and wrap it."""
        state = RequestState(make_plan(self.registry, req))
        self.scheduler.check_budget(state)
        return state

    def add(self, state: RequestState) -> None:
        """Queue a request (raises scheduler.QueueFull when the queue is full)."""
        self.scheduler.add(state)

    def abort(self, request_id: str) -> None:
        self.scheduler.abort(request_id)
        self.outputs.abort(request_id)

    def has_work(self) -> bool:
        return self.scheduler.has_work() or self.outputs.has_work()

    def close(self) -> None:
        """Stop the helper threads (reward-model scoring, policy-parallel forwards)."""
        self.outputs.close()
        if self.parallel is not None:
            self.parallel.shutdown(wait=False)

    def fail_all(self, message: str) -> None:
        """Answer every request inside with an error (shutdown, or a dead loop: the core may be broken)."""
        self.scheduler.fail_all(message)
        self.outputs.fail_all(message)

    # ----- one step ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[StepOutput]:
        """Schedule, run every policy's forward once, mix and sample, then process the outputs."""
        t0 = time.perf_counter()
        self.scheduler.admit()
        self.timers["schedule"] += time.perf_counter() - t0
        if not self.scheduler.running:
            self.outputs.wait(0.005)  # only reward-model scoring left: let it finish without spinning
            return []
        self.steps += 1
        prompt_scoring.plan_chunks(self.scheduler.running)
        drafts = self._draft()
        drafted = time.perf_counter()
        logits = self._forward()
        outputs: list[StepOutput] = []
        for states in self._by_family().values():
            try:
                outputs += self._mix_and_sample(states, logits, drafts)
            except Exception as err:  # noqa: BLE001 - a bug or OOM while mixing fails these requests, not the loop
                log.exception("mixing failed")
                for state in states:
                    self.scheduler.fail(state, *failure_of(err, "while mixing"))
        t = time.perf_counter()
        self.outputs.process(outputs)
        self.timers["detok"] += time.perf_counter() - t
        # the step's cost without its drafting, for the choice of how many tokens to draft
        if self.speculator.timed:
            self.speculator.costs.step(time.perf_counter() - drafted, verified=bool(drafts))
        return outputs

    def _draft(self) -> dict[Sequence, Draft]:
        """Speculative decoding: this step's drafts (the draft policies' steps run here), lanes marked to verify."""
        t = time.perf_counter()
        try:
            drafts = self.speculator.propose(list(self.scheduler.running))
        except Exception as err:  # noqa: BLE001 - drafting failed: its requests fail, the engine goes on
            log.exception("drafting failed")
            for state in [s for s in self.scheduler.running if s.plan.speculative is not None]:
                self.scheduler.fail(state, *failure_of(err, "drafting"))
            return {}
        self.speculator.rounds += bool(drafts)
        self.timers["draft"] += time.perf_counter() - t
        return drafts

    def _forward(self) -> dict[str, PolicyLogits]:
        """Every policy that has sequences, once, over exactly those sequences (at the same time, one thread
        each, when ``server.policy_parallel`` allows: the forwards are independent)."""
        active = [(name, runner) for name, runner in self.runners.items() if runner.slots]
        if self.parallel is not None and len(active) > 1:
            results = list(self.parallel.map(_timed_forward, [runner for _, runner in active]))
        else:
            results = [_timed_forward(runner) for _, runner in active]
        # each batch's lanes as its rows hold them: failing a request below frees its lanes in every runner
        slots = {name: list(runner.slots) for name, runner in active}
        logits: dict[str, PolicyLogits] = {}
        for (name, runner), (lp, err, seconds) in zip(active, results):
            self.timers[f"forward:{name}"] += seconds
            if err is not None:  # find the rows that fail: only their requests end, the others keep their step
                log.error("forward of policy %s failed; running its rows one by one", name, exc_info=err)
                t = time.perf_counter()
                lp, failed = runner.forward_alone()
                self.timers[f"forward:{name}"] += time.perf_counter() - t
                for lane, row_err in failed.items():
                    self.scheduler.fail(lane.seq.request, *failure_of(row_err, f"in the forward of policy {name}"))
            positions = {}
            for lane, full in runner.position_logits.items():
                if lane.seq.score_prompt:  # scored prefills: into one mixed buffer each
                    prompt_scoring.fold(lane, full)
                else:  # a verification: read by _verify
                    positions[lane] = full
            runner.position_logits.clear()
            logits[name] = PolicyLogits(lp, slots[name], positions)
        return logits

    @staticmethod
    def _mix(seqs: list[Sequence], policies: set[str], logits: dict[str, PolicyLogits]) -> torch.Tensor:
        """mixed [S, V] = sum_k w_k * l_k over the raw logits, a row per sequence (``seq.row``).

        The design's score is sum_k w_k * log_softmax(l_k); the two differ by sum_k w_k * log Z_k, one
        constant per row, which q = softmax(mixed), logprobs and every filter ignore. The repetition
        penalty reads signs, and it reads these raw logits, as vLLM and HF do for one model (design.md).
        Mixing logits saves a log_softmax per policy per step; logprobs are normalised only for the
        requests that ask for them. A policy whose slots are the rows in order is added without a gather."""
        row_of = {s.seq_id: s.row for s in seqs}
        every_row = tuple(range(len(seqs)))
        terms = []  # (logits of the contributing rows [n, V], their rows, a scalar weight)
        for p in policies:
            pl = logits[p]
            # a lane's weight is its stream's: a sequence with a prompt variant of p has two lanes here
            members = [(i, row_of[lane.seq.seq_id], w) for i, lane in enumerate(pl.slots)
                       if lane.seq.seq_id in row_of and (w := lane.seq.request.weights.get(lane.stream, 0.0)) != 0.0]
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
        for state in self.scheduler.running:
            groups[state.req.recipe.family].append(state)
        return groups

    def _mix_and_sample(self, states: list[RequestState], logits: dict[str, PolicyLogits],
                        drafts: dict[Sequence, Draft]) -> list[StepOutput]:
        for st in states:
            leader = st.sequences[0]
            if leader.score_prompt:  # a chunk of its scored prefill ran: its positions, the event at the end
                event = prompt_scoring.take_scored(st)
                if event is not None:
                    st.emit(event)
                    if st.sampling.max_tokens == 0:  # scoring only: done, no token and no decoding slot
                        self.outputs.finish_unsampled(leader)
        seqs = [s for st in states for s in st.sequences if not s.finished and not s.score_prompt and s not in drafts]
        verifying = [s for st in states for s in st.sequences if s in drafts and not s.finished] if drafts else []
        outputs = self._sample(states, seqs, logits) if seqs else []
        if verifying:
            t = time.perf_counter()
            outputs += self._verify(verifying, drafts, logits)
            self.timers["verify"] += time.perf_counter() - t
        return outputs

    def _sample(self, states: list[RequestState], seqs: list[Sequence], logits: dict[str, PolicyLogits]) -> list[StepOutput]:
        """One token per sequence from this step's last-position logits (and siblings forked after a prefill)."""
        t = time.perf_counter()
        policies = {p for st in states for p in st.plan.runners if p in logits}
        # rows follow the slot order of the largest policy batch, so that its logits (and those of every
        # policy whose slots hold the same sequences, as in one-recipe traffic) need no gather
        big = max(policies, key=lambda p: len(logits[p].slots))
        anchor: dict[int, int] = {}
        for i, lane in enumerate(logits[big].slots):  # a sequence's first lane there (a runner may hold several)
            anchor.setdefault(lane.seq.seq_id, i)
        seqs.sort(key=lambda s: anchor.get(s.seq_id, len(anchor)))
        for row, seq in enumerate(seqs):
            seq.row = row
        mixed = self._mix(seqs, policies, logits)
        # n > 1: siblings join now with the leader's prompt cache and its first-step scores
        sources = [s.row for s in seqs]
        for st in states:
            if not st.forked and not st.sequences[0].score_prompt:
                for sib in self.scheduler.fork(st):
                    sib.row = len(sources)
                    sources.append(st.sequences[0].row)
                    seqs.append(sib)
        if len(sources) > mixed.shape[0]:
            mixed = mixed.index_select(0, torch.tensor(sources, device=mixed.device))
        constrained = [(s.row, s.matcher) for s in seqs if s.matcher is not None]
        if constrained:  # structured outputs: the grammar's mask on the mixed scores (a copy, never a policy's logits)
            g = time.perf_counter()
            if any(mixed is pl.logits for pl in logits.values()):
                mixed = mixed.clone()
            try:
                mask_rows(mixed, constrained)
            except Exception:  # noqa: BLE001 - a matcher that fails ends its request alone
                log.exception("a grammar mask failed; masking the rows one by one")
                for seq in [s for s in seqs if s.matcher is not None]:
                    try:
                        mask_rows(mixed, [(seq.row, seq.matcher)])
                    except Exception as err:  # noqa: BLE001
                        self.scheduler.fail(seq.request, *failure_of(err, "applying the output's grammar"))
            self.timers["grammar"] += time.perf_counter() - g
        bad = (~torch.isfinite(mixed.amax(dim=-1))).tolist()  # a NaN or +inf, or a row all -inf; one host sync
        self.timers["mix"] += time.perf_counter() - t

        t = time.perf_counter()
        for seq in seqs:
            if bad[seq.row]:
                self.scheduler.fail(seq.request, ErrorKind.INTERNAL,
                                    "the mixed distribution is not finite (NaN or infinite log-probabilities)", "nan")
        seqs = [seq for seq in seqs if seq.request.status != Status.FINISHED]
        rows = [self._row_sampling(seq) for seq in seqs]
        try:
            tokens = sample_rows(mixed, rows)
        except Exception:  # noqa: BLE001 - find the rows that fail: only their requests end
            log.exception("sampling a batch failed; sampling its rows one by one")
            seqs, tokens = self._sample_alone(seqs, mixed, rows)
        self.timers["sample"] += time.perf_counter() - t
        t = time.perf_counter()
        outputs = [StepOutput(seq, tok) for seq, tok in zip(seqs, tokens)]
        self._annotate(outputs, mixed, [s.row for s in seqs],
                       lambda i, stream: logits[seqs[i].request.plan.runner(stream)].logprobs(seqs[i], stream))
        self.timers["detok"] += time.perf_counter() - t
        return outputs

    def _sample_alone(self, seqs: list[Sequence], mixed: torch.Tensor,
                      rows: list[RowSampling]) -> tuple[list[Sequence], list[int]]:
        """Each row sampled by itself (after a batch failed): a row that raises fails its request, the others
        get the token the batch would have given them (a row's draw depends on that row alone; the batch drew
        nothing from any generator before it failed, since draws come last)."""
        kept, tokens = [], []
        for seq, row in zip(seqs, rows):
            if seq.request.status == Status.FINISHED:  # a sibling's row failed first
                continue
            try:
                tokens.append(sample_rows(mixed, [row])[0])
            except Exception as err:  # noqa: BLE001 - this request fails, the engine goes on
                self.scheduler.fail(seq.request, *failure_of(err, "sampling"))
                continue
            kept.append(seq)
        alive = [i for i, seq in enumerate(kept) if seq.request.status != Status.FINISHED]
        return [kept[i] for i in alive], [tokens[i] for i in alive]

    def _verify(self, seqs: list[Sequence], drafts: dict[Sequence, Draft],
                logits: dict[str, PolicyLogits]) -> list[StepOutput]:
        """Speculative rounds: q at the k + 1 verified positions of each sequence, the drafts accepted or
        replaced (speculative.accept), every lane settled on the accepted prefix; one output per token."""
        outputs: list[StepOutput] = []
        for seq in seqs:
            state, draft = seq.request, drafts[seq]
            if state.status == Status.FINISHED:  # failed in a forward of this step
                continue
            plan, sp = state.plan, state.sampling
            try:
                mixed = None  # [k + 1, V] = sum_k w_k * l_k at every verified position
                for stream, w in plan.weights.items():
                    if w != 0.0:
                        x = logits[plan.runner(stream)].positions[seq.lanes[stream]]
                        mixed = x * w if mixed is None else mixed.add_(x, alpha=w)
                if seq.matcher is not None:  # each verified position masked as the grammar stands after the drafts
                    mask_positions(mixed, seq.matcher, draft.tokens)
                if not torch.isfinite(mixed.amax(dim=-1)).all():
                    self.scheduler.fail(state, ErrorKind.INTERNAL, "the mixed distribution is not finite (NaN or "
                                        "infinite log-probabilities)", "nan")
                    continue
                # each position processed as its own step would be: penalties see the drafts before it
                rows = [self._row_sampling(seq, j, draft.tokens[:j]) for j in range(len(draft.tokens) + 1)]
                x = mixed if all(r.plain for r in rows) else apply_penalties(mixed.clone(), rows)
                greedy = sp.temperature == 0.0
                if not greedy:
                    x = filtered_logits(x, [sp] * x.shape[0])
                emitted, accepted = accept(x, draft.tokens, draft.probs, greedy, seq.generator)
                if not state.forked:  # its prefill step (n = 1: no sibling shares the prompt's cache)
                    self.scheduler.fork(state)
                self.speculator.settle(seq, draft, emitted, accepted, self.runners)
                outs = [StepOutput(seq, tok, fed=True) for tok in emitted]
                lanes = {stream: logits[plan.runner(stream)].positions[lane] for stream, lane in seq.lanes.items()
                         if stream in plan.weights}
                normalised: dict[str, torch.Tensor] = {}

                def policy_logprobs(i: int, stream: str) -> torch.Tensor:
                    if stream not in normalised:
                        normalised[stream] = torch.log_softmax(lanes[stream], dim=-1)
                    return normalised[stream][i]

                self._annotate(outs, mixed, list(range(len(outs))), policy_logprobs)
            except Exception as err:  # noqa: BLE001 - this request fails, the engine goes on
                log.exception("verification failed for request %s", state.req.request_id)
                self.scheduler.fail(state, *failure_of(err, "verifying drafted tokens"))
                continue
            outputs += outs
        return outputs

    @staticmethod
    def _row_sampling(seq: Sequence, row: int | None = None, drafted: list[int] = ()) -> RowSampling:
        """Sampling of ``seq``'s row (a verified position: after the ``drafted`` tokens before it)."""
        plan = seq.request.plan
        sp = plan.sampling
        output = [*seq.output_ids, *drafted] if drafted else seq.output_ids
        blocked = sorted(plan.eos_ids | set(sp.stop_token_ids)) if len(output) < sp.min_tokens else []
        return RowSampling(seq.row if row is None else row, sp, plan.prompts[plan.leader], output, blocked,
                           seq.generator)

    @staticmethod
    def _annotate(outputs: list[StepOutput], mixed: torch.Tensor, rows: list[int], policy_logprobs) -> None:
        """The logprobs and signals each request asked for: ``outputs[i]``'s mixed scores are ``mixed[rows[i]]``,
        ``policy_logprobs(i, stream)`` [V] is that stream's log-probabilities at ``outputs[i]``'s position."""
        # q = log_softmax(mixed), only over the rows whose requests need it
        need = [i for i, out in enumerate(outputs) if out.seq.request.req.needs_logprob]
        if need:
            logq = torch.log_softmax(mixed.index_select(0, torch.tensor([rows[i] for i in need], device=mixed.device)),
                                     dim=-1)  # [N, V]
            toks = torch.tensor([outputs[i].token for i in need], device=mixed.device)
            chosen = logq.gather(1, toks[:, None])[:, 0].tolist()
            for n, i in enumerate(need):
                out = outputs[i]
                out.logprob = chosen[n]
                k = out.seq.request.plan.sampling.logprobs
                if k:
                    top = torch.topk(logq[n], min(k, logq.shape[1]))
                    out.top_logprobs = list(zip(top.indices.tolist(), top.values.tolist()))
                pair = out.seq.request.plan.signal_pair
                if pair is not None:  # (token signals need the logprob: logq is there)
                    out.kl = float(kl_to_reference(logq[n], policy_logprobs(i, pair.reference)))
        for i, out in enumerate(outputs):
            plan = out.seq.request.plan
            if plan.request.needs_policy_logprobs:
                out.policy_logprobs = {s: float(policy_logprobs(i, s)[out.token]) for s in plan.weights}


def _timed_forward(runner: PolicyRunner) -> tuple[torch.Tensor | None, BaseException | None, float]:
    """A runner's forward, its error and its seconds (run on a worker thread with policy-parallel steps)."""
    t = time.perf_counter()
    try:
        return runner.forward(), None, time.perf_counter() - t
    except Exception as err:  # noqa: BLE001 - the core fails that policy's requests
        return None, err, time.perf_counter() - t


def _parallel_forwards(setting: str, runners: dict[str, PolicyRunner]) -> ThreadPoolExecutor | None:
    """Threads for policy-parallel steps: one per policy, as many as the cores hold at torch's thread count.

    On CPU each forward then runs its ops on its own core (torch releases the GIL inside them). ``auto``
    leaves GPUs alone: their forwards share one CUDA stream, so threads would only add contention."""
    if setting == "off" or len(runners) < 2:
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    workers = min(len(runners), cores // max(1, torch.get_num_threads()))
    on_cpu = all(r.device.type == "cpu" for r in runners.values())
    if setting == "auto" and (not on_cpu or workers < 2):
        return None
    # each worker keeps torch's thread count (OpenMP's is per thread: a new thread would take the default)
    return ThreadPoolExecutor(max(2, workers), thread_name_prefix="policymix-forward",
                              initializer=torch.set_num_threads, initargs=(torch.get_num_threads(),))
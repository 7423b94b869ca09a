"""Lossless speculative decoding of a mixture: cheap drafts, verified against q in one forward per policy.

A round, for a sequence whose request sets ``speculative`` (Leviathan et al. 2023; Chen et al. 2023):

1. **Draft** k tokens: prompt lookup (``ngram``: the continuation of the latest earlier occurrence of the
   context's last n tokens, as vLLM's ``ngram`` method) or k one-token steps of a draft policy, run on a
   cache of its own (a ``drafter`` runner: the policy's weights, its own slots), in lane ``DRAFT_STREAM``.
2. **Verify**: every lane of the sequence (each policy, prompt variant and observer) feeds its last token
   plus the k drafts in one forward that keeps every position's logits (``runner.py``), batched with the
   sequences that do not speculate; the core mixes them into q at the k + 1 positions, each position
   processed as a normal step would be (penalties and min_tokens see the drafts before it).
3. **Accept** (:func:`accept`): draft token x at position j is kept with probability min(1, q(x) / p(x));
   the first rejected one is replaced by a draw from norm(max(0, q - p)); when all k are kept, one more
   token is drawn from q. Greedy keeps drafts while each is argmax q. Every token is thus a draw from q
   (the chi-square tests in tests/test_speculative.py).
4. **Caches**: each lane keeps its accepted prefix (``runner.truncate``: the slot's length goes back, the
   rejected cells are overwritten later, nothing is copied); the drafter keeps what it computed of it.

An n-gram draft is a point mass p = 1{x}: the rule keeps x with probability q(x) and otherwise draws from q
without x. It is applied as one inverse-CDF draw y ~ q with the sequence's next uniform (accept iff y = x,
else y is the replacement), which is that rule exactly and consumes one uniform per token, like a step
without speculation: a seeded request gives the same tokens with n-gram drafting on or off, under any load.
With a draft policy the draws differ from a step's, so the adaptive switch (no drafting above
``max_concurrency`` running sequences) leaves seeded sequences speculating: their tokens never depend on load.

How many tokens to draft (``CostModel``): a round of k drafts emits (1 - a^(k+1)) / (1 - a) tokens on
average, a = the sequence's acceptance rate so far (Leviathan et al.), and costs k draft steps plus one
verification step, measured online against a plain step. Each step drafts the k that maximises tokens per
second, or nothing when no k beats a plain step by 10% (prefill steps are not timed; a plain step runs
at least every 32 steps to keep its time current): a draft policy as costly as the mixture's own policies
is then not used, and speculation is never much slower than none. (Seeded sequences with a draft policy
always draft ``num_tokens``: a k chosen from timings would make their tokens depend on the machine.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .protocol import DRAFT_STREAM, SamplingParams  # noqa: F401 - DRAFT_STREAM re-exported
from .runner import PolicyRunner
from .sampler import argmax_rows, draw, filtered_logits
from .sequence import Lane, RequestState, Sequence

NGRAM_MAX, NGRAM_MIN = 4, 2  # prompt lookup: the longest suffix of 4 down to 2 tokens that occurred before
DEFAULT_MAX_CONCURRENCY = 8  # when requests ask for speculation and the config sets no default
EXPLORE_EVERY = 32  # steps: a plain step (no drafts) at least this often keeps the plain-step time current
MARGIN = 1.1  # drafting must promise this many times a plain step's tokens per second (timings are noisy)


def drafter_key(policy: str) -> str:
    """The scheduler's name of a policy's drafter runner."""
    return f"{policy}{DRAFT_STREAM}"


@dataclass(eq=False)
class Draft:
    """A sequence's drafted tokens of this round."""

    tokens: list[int]
    probs: torch.Tensor | None  # [k, V] the draft policy's distribution at each token (None: n-gram, a point mass)
    cached: int = 0  # drafts the drafter has in its cache (k - 1: the last one was never fed)
    base: int = 0  # the drafter's cache length before the first draft (the context through the last token)


def ngram_propose(tokens: list[int], k: int, n_max: int = NGRAM_MAX, n_min: int = NGRAM_MIN) -> list[int]:
    """Up to ``k`` tokens that followed the latest earlier occurrence of the longest suffix of ``tokens`` of
    ``n_max`` down to ``n_min`` tokens; [] when none occurred before."""
    last = len(tokens) - 1
    if last < n_min:
        return []
    ends = [i for i in range(last - 1, -1, -1) if tokens[i] == tokens[last]]  # latest first
    for n in range(min(n_max, last), n_min - 1, -1):
        suffix = tokens[last - n + 1:]
        for i in ends:
            if i >= n - 1 and tokens[i - n + 1: i + 1] == suffix:
                return tokens[i + 1: i + 1 + k]
    return []


def accept(x: torch.Tensor, drafts: list[int], draft_probs: torch.Tensor | None, greedy: bool,
           generator: torch.Generator) -> tuple[list[int], int]:
    """The tokens a round emits (the accepted drafts, then one more) and how many drafts were accepted.

    ``x`` [k + 1, V]: the processed target scores at each position (penalties applied; for sampling also
    temperature and top-k / top-p / min-p, -inf outside), so that q_j = softmax(x_j)."""
    k = len(drafts)
    if greedy:
        target = argmax_rows(x).tolist()
        for j, d in enumerate(drafts):
            if target[j] != d:
                return [*drafts[:j], target[j]], j
        return [*drafts, target[k]], k
    q = torch.softmax(x.float(), dim=-1)
    for j, d in enumerate(drafts):
        if draft_probs is None:  # a point mass: one inverse-CDF draw from q decides (module docstring)
            y = draw(x[j: j + 1], [generator])[0]
            if y != d:
                return [*drafts[:j], y], j
            continue
        p = draft_probs[j]
        u = torch.rand((), generator=generator).item()
        if u * float(p[d]) < float(q[j, d]):  # u < q(d) / p(d), without dividing by a tiny p(d)
            continue
        residual = (q[j] - p).clamp_min(0.0)
        if not float(residual.sum()) > 0.0:  # q <= p everywhere only when q == p (up to rounding): draw from q
            residual = q[j]
        return [*drafts[:j], draw(residual.log()[None], [generator])[0]], j
    return [*drafts, draw(x[k: k + 1], [generator])[0]], k


def draft_scores(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """A draft policy's proposal distribution [R, V] at the request's temperature and filters."""
    return torch.softmax(filtered_logits(logits, params), dim=-1)


class _Ema:
    def __init__(self, weight: float = 0.2):
        self.value: float | None = None
        self.weight = weight

    def add(self, x: float) -> None:
        self.value = x if self.value is None else self.value + self.weight * (x - self.value)


class CostModel:
    """Online step costs: a plain step, a verifying step (both whole steps, drafting excluded) and each
    drafter's one-token step."""

    def __init__(self):
        self.plain, self.verify = _Ema(), _Ema()  # seconds of a whole step, its drafting excluded
        self.draft: dict[str, _Ema] = {}  # weights (their runner) -> seconds of one drafting step
        self.since_plain = 0  # steps since the last plain one

    def step(self, seconds: float, verified: bool) -> None:
        (self.verify if verified else self.plain).add(seconds)
        self.since_plain = self.since_plain + 1 if verified else 0

    def explore(self) -> bool:
        """Time for a plain step, to keep its cost current (while verifying steps are what runs)."""
        return self.plain.value is None or self.since_plain >= EXPLORE_EVERY

    def best_k(self, accepted: int, rejected: int, k_max: int, drafter: str | None) -> int:
        """The k in 0..k_max with the most expected tokens per second (0: draft nothing now)."""
        plain, verify = self.plain.value, self.verify.value
        draft = 0.0 if drafter is None else self.draft.get(drafter, _Ema()).value
        if plain is None or verify is None or draft is None:
            return min(1, k_max)  # not measured yet: draft one token (the cheapest round), and measure
        a = min((accepted + 1) / (accepted + rejected + 2), 0.99)  # acceptance per drafted token, prior 1/2
        best, rate = 0, MARGIN / plain
        for k in range(1, k_max + 1):
            r = (1 - a ** (k + 1)) / (1 - a) / (k * draft + verify)
            if r > rate:
                best, rate = k, r
        return best


class Speculator:
    """Decides who speculates this step and drafts for them (the core verifies and accepts)."""

    def __init__(self, drafters: dict[str, PolicyRunner], max_concurrency: int, adaptive: bool = True):
        self.drafters = drafters  # drafter key -> the drafter runner of a set of weights (own cache, same weights)
        self.max_concurrency = max_concurrency
        self.adaptive = adaptive  # choose k by the measured costs (CostModel); else always num_tokens
        self.costs = CostModel()
        self.timed = False  # this step's cost goes to the cost model (set by ``propose``)
        self.rounds = 0  # steps that verified drafts, and the draft tokens verified and accepted (metrics)
        self.drafted = 0
        self.accepted = 0

    def propose(self, states: list[RequestState]) -> dict[Sequence, Draft]:
        """Draft for every sequence that speculates this step and mark its lanes for verification."""
        speculative = [st for st in states if st.plan.speculative is not None]
        # the step's cost is timed for the cost model when someone may draft and no prompt is prefilled
        self.timed = bool(speculative) and all(st.forked for st in states)
        if not speculative:
            return {}
        live = sum(1 for st in states for s in st.sequences if not s.finished)
        explore = self.adaptive and self.costs.explore()
        todo: dict[Sequence, int] = {}  # sequence -> tokens to draft
        for st in speculative:
            spec = st.plan.speculative
            # the prefill step drafts too, unless the leader's cache is forked to siblings after it
            if not (st.forked or st.best_of == 1):
                continue
            exempt = st.sampling.seed is not None and not spec.ngram  # module docstring: seeded, policy drafts
            if (live > self.max_concurrency or explore) and not exempt:
                continue
            for seq in st.sequences:
                k = min(spec.num_tokens, st.sampling.max_tokens - len(seq.output_ids) - 1)
                if self.adaptive and not exempt and k > 0:
                    drafter = None if spec.ngram else st.plan.runner(DRAFT_STREAM).removesuffix(DRAFT_STREAM)
                    k = self.costs.best_k(seq.accepted, seq.rejected, k, drafter)
                if not (seq.finished or seq.score_prompt or k < 1):
                    todo[seq] = k
        drafts: dict[Sequence, Draft] = {}
        by_drafter: dict[str, list[Sequence]] = {}
        for seq, k in todo.items():
            spec = seq.request.plan.speculative
            if spec.ngram:
                tokens = ngram_propose([*seq.request.plan.prompts[seq.request.plan.leader], *seq.output_ids], k)
                if tokens:
                    drafts[seq] = Draft(tokens, None)
            else:
                by_drafter.setdefault(seq.request.plan.runner(DRAFT_STREAM), []).append(seq)
        for key, seqs in by_drafter.items():
            drafts.update(self._draft_policy(self.drafters[key], seqs, todo))
        for seq, draft in drafts.items():
            for stream, lane in seq.lanes.items():
                if stream != DRAFT_STREAM:
                    lane.feed += draft.tokens
                    lane.verify = len(draft.tokens) + 1
        return drafts

    def _draft_policy(self, runner: PolicyRunner, seqs: list[Sequence], todo: dict[Sequence, int]) -> dict[Sequence, Draft]:
        """k one-token steps of the draft policy over every lane of its drafter runner (a lane whose
        sequence does not speculate now just catches up on its pending tokens and drops its drafts)."""
        for seq in seqs:
            if DRAFT_STREAM not in seq.lanes:  # its first round: the draft policy reads the whole context
                plan = seq.request.plan
                lane = seq.lanes[DRAFT_STREAM] = Lane(seq, DRAFT_STREAM, [*plan.draft_prompt, *seq.output_ids])
                runner.add(lane)
        lanes = list(runner.slots)
        base = [runner.lengths[i] + len(lane.feed) for i, lane in enumerate(lanes)]
        steps = max(todo[s] for s in seqs)
        tokens: dict[Sequence, list[int]] = {s: [] for s in seqs}
        probs: dict[Sequence, list[torch.Tensor]] = {s: [] for s in seqs}
        start = time.perf_counter()
        for j in range(steps):
            logits = runner.forward()  # [B, V], slot order (lanes do not move within a step)
            # a sequence draws its own k tokens only (the uniforms it consumes must not depend on its batch)
            rows = [i for i, lane in enumerate(lanes) if lane.seq in tokens and len(tokens[lane.seq]) < todo[lane.seq]]
            greedy = [i for i in rows if lanes[i].seq.request.sampling.temperature == 0.0]
            drawn = [i for i in rows if lanes[i].seq.request.sampling.temperature != 0.0]
            picked: dict[int, int] = {}
            if greedy:
                picked.update(zip(greedy, argmax_rows(logits[greedy]).tolist()))
            if drawn:
                p = draft_scores(logits[drawn], [lanes[i].seq.request.sampling for i in drawn])
                toks = draw(p.log(), [lanes[i].seq.generator for i in drawn])
                for r, i in enumerate(drawn):
                    picked[i] = toks[r]
                    probs[lanes[i].seq].append(p[r])
            for i, lane in enumerate(lanes):
                if i in picked:
                    tokens[lane.seq].append(picked[i])
                    lane.feed = [picked[i]] if len(tokens[lane.seq]) < todo[lane.seq] else []
        # a drafting step's cost: its forward and sampling (the first forward also feeds the accepted tokens)
        self.costs.draft.setdefault(runner.name.removesuffix(DRAFT_STREAM), _Ema()).add(
            (time.perf_counter() - start) / steps)
        out = {}
        for i, lane in enumerate(lanes):
            lane.feed = []
            seq = lane.seq
            if seq in tokens:  # ``settle`` keeps the accepted drafts of its cache once they are known
                k = todo[seq]
                out[seq] = Draft(tokens[seq], torch.stack(probs[seq]) if probs[seq] else None, cached=k - 1,
                                 base=base[i])
        return out

    def settle(self, seq: Sequence, draft: Draft, emitted: list[int], accepted: int,
               runners: dict[str, PolicyRunner]) -> None:
        """After acceptance: every lane keeps the accepted prefix and is fed the round's last token."""
        seq.drafted += len(draft.tokens)
        seq.accepted += accepted
        seq.rejected += accepted < len(draft.tokens)
        self.drafted += len(draft.tokens)
        self.accepted += accepted
        plan = seq.request.plan
        final = emitted[-1]
        for stream, lane in seq.lanes.items():
            if stream == DRAFT_STREAM:
                runner = self.drafters[plan.runner(DRAFT_STREAM)]
                keep = min(accepted, draft.cached)
                runner.truncate(lane, draft.base + keep)
                lane.feed = [*draft.tokens[keep:accepted], final]
                continue
            runner = runners[plan.runner(stream)]
            lane.verify = 0
            # the forward fed the last token and k drafts: keep the last token and the accepted drafts
            runner.truncate(lane, runner.lengths[runner.slot_of(lane)] - len(draft.tokens) + accepted)
            lane.feed = [final]

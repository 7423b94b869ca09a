"""Prompt log-probabilities: a request's prompt tokens scored under its mixture, chunk by chunk.

Every policy's prompt ends with the scored tokens x (a prompted policy's system prompt comes first), so
the logits that predict a token sit at the same distance from the end of every policy's context. A
scored prefill runs as a forward of its own that keeps every position's logits (``runner.py``); each
policy's rows are folded into one mixed score as soon as its forward returns (one [positions, V]
buffer per request, not one per policy), and a step's positions are normalised together.

While other sequences decode, a scored prefill advances ``CHUNK_TOKENS`` tokens per step, the same
count at the end of every policy's context, so that a long prompt delays the running streams by a
chunk per step rather than by its whole prefill; alone, it runs in one forward.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .protocol import PromptEvent, PromptLogprob
from .sequence import Lane, RequestState

CHUNK_TOKENS = 16  # a scored prefill's tokens per step while other sequences decode (CPU: about a decode step's cost)


def plan_chunks(states: Iterable[RequestState]) -> None:
    """Set this step's ``chunk_end`` (tokens left unfed at the end of every policy's context) of each
    scored prefill: the whole rest when nothing else decodes, else ``CHUNK_TOKENS`` more."""
    scored = [st.sequences[0] for st in states if st.sequences and st.sequences[0].score_prompt]
    if not scored:
        return
    decoding = any(not s.score_prompt and not s.finished for st in states for s in st.sequences)
    for seq in scored:
        seq.chunk_end = max(0, seq.score_left - CHUNK_TOKENS) if decoding else 0


def fold(lane: Lane, full: torch.Tensor) -> None:
    """Add ``w *`` the rows of ``full`` [fed positions, V] that predict this step's scored tokens."""
    seq = lane.seq
    state = seq.request
    w = state.weights.get(lane.stream, 0.0)
    r, r_next, n = seq.score_left, seq.chunk_end, full.shape[0]
    if w == 0.0:  # an observer: its logits are not part of q
        return
    # targets at distance o from the end, o in [max(1, r_next), r - 1]: their predictors are the last
    # r - r_next rows (r - 1 on the final chunk, whose last row predicts the first generated token)
    rows = full[n - (r - r_next) : n - (1 if r_next == 0 else 0)]
    state.prompt_mix = rows * w if state.prompt_mix is None else state.prompt_mix.add_(rows, alpha=w)


def take_scored(state: RequestState) -> PromptEvent | None:
    """Normalise this step's folded positions into entries; the PromptEvent once the prompt is done."""
    seq, plan = state.sequences[0], state.plan
    x, k = plan.scored, plan.sampling.prompt_logprobs
    r, r_next = seq.score_left, seq.chunk_end
    mixed, state.prompt_mix = state.prompt_mix, None
    if mixed is not None and mixed.shape[0]:
        first = len(x) - r + 1  # index of the first target of this chunk
        logq = torch.log_softmax(mixed, dim=-1)  # [targets, V]
        target = torch.tensor(x[first : first + logq.shape[0]], device=logq.device)[:, None]
        chosen = logq.gather(1, target)
        ranks = ((logq > chosen).sum(-1) + 1).tolist()
        tops: list[list[tuple[int, float]]] = [[] for _ in ranks]
        if k:
            top = torch.topk(logq, min(k, logq.shape[1]))
            tops = [list(zip(i, v)) for i, v in zip(top.indices.tolist(), top.values.tolist())]
        state.prompt_entries += [PromptLogprob(lp, rank, tp) for lp, rank, tp in zip(chosen[:, 0].tolist(), ranks, tops)]
    seq.score_left = r_next
    if r_next:
        return None
    seq.score_prompt = False
    return PromptEvent(list(x), [None, *state.prompt_entries])

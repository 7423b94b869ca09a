"""Turn mixed scores into tokens: penalties, temperature, top-k / top-p / min-p, seeded sampling.

The rows of a step are processed together as batched tensor ops; each sequence still samples with
its own ``torch.Generator`` (one uniform per step, inverse CDF), so a seeded request gives the same
tokens alone or beside any other requests.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .protocol import SamplingParams


@dataclass(eq=False)
class RowSampling:
    """What sampling one row of a step's mixed scores needs."""

    row: int  # row of the mixed-score matrix
    params: SamplingParams
    prompt_ids: list[int]  # the repetition penalty's "seen" tokens are prompt + output (vLLM, HF)
    output_ids: list[int]
    blocked: list[int]  # token ids forbidden now (EOS and stop ids before min_tokens)
    generator: torch.Generator

    @property
    def plain(self) -> bool:
        """Greedy with nothing to apply: the argmax of the mixed scores as they are."""
        p = self.params
        return p.temperature == 0.0 and not self.blocked and not has_penalties(p)


def has_penalties(p: SamplingParams) -> bool:
    return bool(p.logit_bias or p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0)


def sample_rows(mixed: torch.Tensor, rows: list[RowSampling]) -> list[int]:
    """One token per row of ``rows`` from the mixed raw logits ``mixed`` [S, V], in ``rows`` order.

    Plain greedy rows take one batched argmax; the others are processed together (penalties, then
    temperature and top-k / top-p / min-p as batched tensor ops) and each draws its uniform from its own
    generator, so a seeded row gives the same token whatever else is in the batch."""
    tokens = [0] * len(rows)
    is_plain = [r.plain for r in rows]
    plain = [i for i, p in enumerate(is_plain) if p]
    rest = [i for i, p in enumerate(is_plain) if not p]
    if plain:
        idx = [rows[i].row for i in plain]
        x = mixed if idx == list(range(mixed.shape[0])) else mixed.index_select(0, _long(idx, mixed.device))
        for i, tok in zip(plain, argmax_rows(x).tolist()):
            tokens[i] = tok
    if rest:
        todo = [rows[i] for i in rest]
        x = apply_penalties(mixed.index_select(0, _long([r.row for r in todo], mixed.device)), todo)
        greedy = [k for k, r in enumerate(todo) if r.params.temperature == 0.0]
        drawn = [k for k, r in enumerate(todo) if r.params.temperature != 0.0]
        if greedy:
            for k, tok in zip(greedy, x[_long(greedy, x.device)].argmax(-1).tolist()):
                tokens[rest[k]] = tok
        if drawn:
            sub = [todo[k] for k in drawn]
            for k, tok in zip(drawn, draw(filtered_logits(x[_long(drawn, x.device)], [r.params for r in sub]),
                                           [r.generator for r in sub])):
                tokens[rest[k]] = tok
    return tokens


def apply_penalties(x: torch.Tensor, rows: list[RowSampling]) -> torch.Tensor:
    """Processed scores [R, V] (``x`` is changed in place), in vLLM's order: logit_bias, the min_tokens
    block, then the repetition penalty (on the raw mixed logits: positive divided, negative multiplied,
    over prompt and output tokens), frequency and presence penalties (over output tokens)."""
    R, V = x.shape
    dev = x.device
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items() if 0 <= t < V]
    if bias:
        ri, ti, bv = zip(*bias)
        x.index_put_((_long(ri, dev), _long(ti, dev)), torch.tensor(bv, dtype=x.dtype, device=dev), accumulate=True)
    blocked = [(i, t) for i, r in enumerate(rows) for t in r.blocked]
    if blocked:
        ri, ti = zip(*blocked)
        x[_long(ri, dev), _long(ti, dev)] = float("-inf")
    rep = [i for i, r in enumerate(rows) if r.params.repetition_penalty != 1.0]
    if rep:
        seen = torch.zeros(len(rep), V, dtype=torch.bool, device=dev)
        ri = [k for k, i in enumerate(rep) for _ in (*rows[i].prompt_ids, *rows[i].output_ids)]
        ti = [t for i in rep for t in (*rows[i].prompt_ids, *rows[i].output_ids)]
        if ti:
            seen[_long(ri, dev), _long(ti, dev)] = True
        pen = torch.tensor([rows[i].params.repetition_penalty for i in rep], dtype=x.dtype, device=dev)[:, None]
        sub = x[_long(rep, dev)]
        sub = torch.where(seen, torch.where(sub > 0, sub / pen, sub * pen), sub)
        x[_long(rep, dev)] = sub
    pf = [i for i, r in enumerate(rows) if r.output_ids and (r.params.presence_penalty or r.params.frequency_penalty)]
    if pf:
        counts = torch.zeros(len(pf), V, dtype=x.dtype, device=dev)
        ri = [k for k, i in enumerate(pf) for _ in rows[i].output_ids]
        ti = [t for i in pf for t in rows[i].output_ids]
        counts.index_put_((_long(ri, dev), _long(ti, dev)), torch.ones(len(ti), dtype=x.dtype, device=dev),
                          accumulate=True)
        freq = torch.tensor([rows[i].params.frequency_penalty for i in pf], dtype=x.dtype, device=dev)[:, None]
        pres = torch.tensor([rows[i].params.presence_penalty for i in pf], dtype=x.dtype, device=dev)[:, None]
        x[_long(pf, dev)] -= freq * counts + pres * (counts > 0).to(x.dtype)
    return x


def filtered_logits(s: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """``s / T`` with top-k, then top-p, then min-p applied per row (-inf outside); s: [R, V], every T > 0."""
    dev, V = s.device, s.shape[1]
    temp = torch.tensor([p.temperature for p in params], dtype=s.dtype, device=dev)[:, None]
    x = s / temp
    top_k = [p.top_k if 0 < p.top_k < V else V for p in params]
    top_p = [p.top_p for p in params]
    if any(k < V for k in top_k) or any(p < 1.0 for p in top_p):
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        if any(k < V for k in top_k):  # ties with the k-th value stay in (as one row's topk/threshold did)
            kth = sorted_x.gather(1, _long(top_k, dev)[:, None] - 1)  # [R, 1]
            x = x.masked_fill(x < kth, float("-inf"))
            sorted_x = sorted_x.masked_fill(sorted_x < kth, float("-inf"))
        if any(p < 1.0 for p in top_p):  # the smallest prefix whose mass reaches top_p (crossing token in)
            probs = torch.softmax(sorted_x, dim=-1)
            drop = (probs.cumsum(-1) - probs) >= torch.tensor(top_p, dtype=probs.dtype, device=dev)[:, None]
            drop[:, 0] = False
            drop &= torch.tensor([p < 1.0 for p in top_p], device=dev)[:, None]
            x = x.masked_fill(torch.zeros_like(drop).scatter_(1, order, drop), float("-inf"))
    min_p = [p.min_p for p in params]
    if any(m > 0.0 for m in min_p):
        probs = torch.softmax(x, dim=-1)
        floor = torch.tensor(min_p, dtype=probs.dtype, device=dev)[:, None] * probs.amax(-1, keepdim=True)
        x = x.masked_fill(probs < floor, float("-inf"))
    return x


def argmax_rows(x: torch.Tensor, block: int = 256) -> torch.Tensor:
    """``x.argmax(-1)`` of a score matrix [B, V] (the first index on ties), computed in two levels on CPU.

    torch's CPU argmax is a scalar loop (about 270 us for 16 x 32k rows on one thread) while amax is
    vectorised (about 20 us): take each block's max, then the argmax of the first block that holds the
    row's max. Greedy decoding does this every step for every row.
    """
    B, V = x.shape
    n = V // block
    if x.device.type != "cpu" or n < 2:
        return x.argmax(-1)
    blocks = x[:, : n * block].reshape(B, n, block)
    block_max = blocks.amax(-1)  # [B, n]
    first = block_max.argmax(-1)  # [B]: the first block holding the row's max
    idx = blocks[torch.arange(B, device=x.device), first].argmax(-1) + first * block
    if n * block < V:  # the tail past the last whole block wins only when strictly larger
        tail_max, tail_idx = x[:, n * block:].max(-1)
        idx = torch.where(tail_max > block_max.gather(1, first[:, None])[:, 0], tail_idx + n * block, idx)
    return idx


def draw(x: torch.Tensor, generators: list[torch.Generator]) -> list[int]:
    """Inverse-CDF draws from softmax(x) [R, V], one uniform per row from that row's generator."""
    probs = torch.softmax(x.float(), dim=-1)
    cdf = probs.cumsum(-1)
    u = torch.tensor([torch.rand((), generator=g, device="cpu").item() for g in generators],
                     dtype=cdf.dtype, device=cdf.device)
    idx = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0].clamp_max(cdf.shape[1] - 1)
    out = idx.tolist()
    zero = (probs.gather(1, idx[:, None])[:, 0] == 0).tolist()
    for i, z in enumerate(zero):  # never land on a filtered token through rounding at the edge
        while z and out[i] > 0 and probs[i, out[i]] == 0:
            out[i] -= 1
    return out


def _long(values, device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long, device=device)

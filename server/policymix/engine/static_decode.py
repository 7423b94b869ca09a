"""Decode steps with static shapes, replayed as CUDA graphs on the GPU.

On a GPU an eager decode step is bound by Python and kernel launches (~870 launches per step for a
24-layer model; see benchmarks/results/gpu_check_h100_2026-11-26.md), not by the GPU. When every row
of a policy's batch feeds exactly one token, the step can run with static shapes: the batch padded
to a bucket size, the whole cache capacity as keys (masked beyond each row's length). Each bucket's
forward is then captured once as a CUDA graph and replayed. Elsewhere (and in the CPU tests) the same
static-shape forward runs eagerly, so its exactness is tested where CI runs.

Padding rows use slots [B, bucket) that no running sequence occupies; they write at cell 0 of their
own slot, which a sequence joining that slot later overwrites with its prompt before reading it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass
class _Static:
    ids: torch.Tensor  # [b, 1]
    pos: torch.Tensor  # [b, 1] positions = cache cells written
    mask: torch.Tensor  # [b, 1, 1, capacity]
    out: torch.Tensor | None = None  # [b, V] logits (the graph's output)
    graph: object | None = None


class StaticDecoder:
    def __init__(self, runner, use_graphs: bool):
        self.runner = runner
        self.use_graphs = use_graphs
        self.static: dict[int, _Static] = {}
        self.version = -1  # cache buffers the captured graphs point at
        self.pool = None
        self.captures = 0

    @staticmethod
    def applicable(feeds: list[list[int]]) -> bool:
        return len(feeds) <= BUCKETS[-1] and all(len(f) == 1 for f in feeds)

    def run(self, feeds: list[list[int]], lengths: list[int]) -> torch.Tensor:
        """Logits [B, V] of the next token for rows feeding one token each (cells at ``lengths``)."""
        r, cache = self.runner, self.runner.cache
        B = len(feeds)
        bucket = next(b for b in BUCKETS if b >= B)
        cache.reserve(bucket, max(lengths) + 1)
        if cache.version != self.version:  # buffers were reallocated: captured graphs point at old ones
            self.static.clear()
            self.version = cache.version
        st = self.static.get(bucket)
        if st is None:
            st = self.static[bucket] = self._make(bucket, cache.capacity)
        C = cache.capacity
        ids = torch.full((bucket, 1), r.pad_id, dtype=torch.long)
        ids[:B, 0] = torch.tensor([f[0] for f in feeds], dtype=torch.long)
        L = torch.zeros(bucket, dtype=torch.long)
        L[:B] = torch.tensor(lengths, dtype=torch.long)
        mask = torch.where(torch.arange(C)[None, :] <= L[:, None], 0.0, r.mask_min).to(r.dtype)
        st.ids.copy_(ids)
        st.pos.copy_(L[:, None])
        st.mask.copy_(mask[:, None, None, :])
        if not self.use_graphs:
            return self._forward(st, bucket)[:B]
        if st.graph is None:
            self._capture(st, bucket)
        st.graph.replay()
        return st.out[:B]

    def _make(self, bucket: int, capacity: int) -> _Static:
        dev = self.runner.device
        return _Static(ids=torch.zeros(bucket, 1, dtype=torch.long, device=dev),
                       pos=torch.zeros(bucket, 1, dtype=torch.long, device=dev),
                       mask=torch.zeros(bucket, 1, 1, capacity, dtype=self.runner.dtype, device=dev))

    def _forward(self, st: _Static, bucket: int) -> torch.Tensor:
        r = self.runner
        r.cache.begin_step(bucket, st.pos, r.cache.capacity)
        out = r.model(input_ids=st.ids, attention_mask=st.mask, position_ids=st.pos, use_cache=True,
                      logits_to_keep=1, **{r.cache_kw: r.cache})
        return out.logits[:, -1, : r.vocab_size].float()

    def _capture(self, st: _Static, bucket: int) -> None:
        # warm up on a side stream (the documented recipe), then capture; the warm-up writes the same
        # cells the captured step will write, with the same values
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._forward(st, bucket)
        torch.cuda.current_stream().wait_stream(side)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            st.out = self._forward(st, bucket)
        st.graph = graph
        self.captures += 1

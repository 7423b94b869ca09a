"""Per-policy KV cache with one slot per running sequence (continuous batching).

The model drives it only through ``update(key_states, value_states, layer_idx, ...)``, like any
transformers Cache. Per layer, K and V live in preallocated buffers ``[slots, kv_heads, capacity,
head_dim]``; active sequences occupy slots ``[0, n)`` so a step reads the zero-copy view
``K[:B, :, :kv_len]``. When a sequence leaves, the last slot moves into the hole (compaction).
Buffers start small and double (slots and capacity) when a step needs more, so memory follows the
longest running sequence rather than the model's context length.

Buffers are made and changed only in inference mode (the engine's steps run in it, and so do
``reserve`` and ``copy_slot``, which admission and abort call from outside a step): torch refuses
in-place updates of inference tensors outside inference mode.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    is_compileable = False  # tells transformers' mask code not to expect static shapes

    def __init__(self, num_layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, slots: int = 4, capacity: int = 128):
        self.num_layers, self.kv_heads, self.head_dim = num_layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        # zero-initialised so that reused or padding cells always hold finite values
        self.k = [torch.zeros(slots, kv_heads, capacity, head_dim, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros_like(t) for t in self.k]
        self.version = 0  # bumped when buffers are reallocated (captured CUDA graphs point at them)
        self._first = 0
        self._batch = 0
        self._kv_len = 0
        self._cells: torch.Tensor | None = None  # [B * H * Q] flat (slot, head, position) of each written cell

    @property
    def slots(self) -> int:
        return self.k[0].shape[0]

    @property
    def capacity(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @torch.inference_mode()
    def reserve(self, slots: int, capacity: int) -> None:
        """Grow (by doubling) so that ``slots`` rows of ``capacity`` positions fit."""
        new_s, new_c = self.slots, self.capacity
        while new_s < slots:
            new_s *= 2
        while new_c < capacity:
            new_c *= 2
        if (new_s, new_c) == (self.slots, self.capacity):
            return
        s, c = self.slots, self.capacity
        grown = []
        for old in self.k + self.v:  # allocate everything first: an OOM here leaves the cache as it was
            new = torch.zeros(new_s, self.kv_heads, new_c, self.head_dim, dtype=self.dtype, device=self.device)
            new[:s, :, :c] = old
            grown.append(new)
        self.k, self.v = grown[: self.num_layers], grown[self.num_layers:]
        self.version += 1

    def begin_step(self, batch: int, write_pos: torch.Tensor, kv_len: int, first: int = 0) -> None:
        """Set where the next forward writes: rows are slots [first, first + batch), ``write_pos`` [B, Q]
        their cache positions."""
        self._first = first
        self._batch = batch
        self._kv_len = kv_len
        # cell (b, h, q) is row ((first + b) * H + h) * capacity + write_pos[b, q] of a buffer viewed as
        # [slots * H * capacity, D]: one index_copy_ per buffer writes every key (no advanced indexing)
        dev = write_pos.device
        slot_head = (torch.arange(first, first + batch, device=dev)[:, None] * self.kv_heads
                     + torch.arange(self.kv_heads, device=dev)[None, :])  # [B, H]
        self._cells = (slot_head[:, :, None] * self.capacity + write_pos[:, None, :]).reshape(-1)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        # key_states: [B, H, Q, D], flattened in (b, h, q) order like ``_cells``
        k, v = self.k[layer_idx], self.v[layer_idx]
        k.view(-1, self.head_dim).index_copy_(0, self._cells, key_states.reshape(-1, self.head_dim))
        v.view(-1, self.head_dim).index_copy_(0, self._cells, value_states.reshape(-1, self.head_dim))
        rows = slice(self._first, self._first + self._batch)
        return k[rows, :, : self._kv_len], v[rows, :, : self._kv_len]

    @torch.inference_mode()
    def copy_slot(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into ``dst`` (compaction, n > 1 forks)."""
        if length == 0 or src == dst:
            return
        for buf in (self.k, self.v):
            for t in buf:
                t[dst, :, :length] = t[src, :, :length]

    # transformers may ask these of a cache; explicit positions and a 4D mask make them unused.
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    def __len__(self) -> int:
        return self.num_layers

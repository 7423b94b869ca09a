"""One policy's batched forward over exactly the sequences that use it.

Prefill and decode share one forward: a joining sequence feeds its prompt, the others their last
token. Rows are left-padded to the longest feed Q; each row gets explicit positions and an additive
4D mask, and writes its keys at its own cache positions (padding lands in future cells that are
masked now and overwritten later).
"""

from __future__ import annotations

import inspect

import torch

from .kv_cache import SlotKVCache
from .static_decode import StaticDecoder


def _cache_keyword(model) -> str:
    # transformers >= 5.24 names it `cache`; 5.17 `past_key_values` (accepted until 5.40)
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PolicyRunner:
    def __init__(self, name: str, model, vocab_size: int, pad_id: int, device, dtype, decode: str = "dynamic"):
        self.name = name
        self.model = model
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.device = torch.device(device)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = SlotKVCache(cfg.num_hidden_layers, kv_heads, head_dim, dtype, self.device)
        self.mask_min = torch.finfo(dtype).min  # never -inf: an all-masked padding row would give NaN
        self.dtype = dtype
        self.cache_kw = _cache_keyword(model)
        self.slots: list = []  # sequences in slot order
        self.lengths: list[int] = []  # tokens cached per slot
        self.forwards = 0  # forward passes run (metrics)
        # decode-only steps: "dynamic" (the general path below), "static" (static shapes, eager) or
        # "graphs" (static shapes replayed as CUDA graphs)
        self.static = StaticDecoder(self, use_graphs=decode == "graphs") if decode != "dynamic" else None

    def __len__(self) -> int:
        return len(self.slots)

    def slot_of(self, seq) -> int:
        return self.slots.index(seq)

    def add(self, seq, length: int = 0) -> int:
        self.slots.append(seq)
        self.lengths.append(length)
        return len(self.slots) - 1

    def fork(self, src_seq, dst_seq) -> None:
        """``dst_seq`` joins with a copy of ``src_seq``'s cache (n > 1 share the prompt's prefill)."""
        src = self.slot_of(src_seq)
        dst = self.add(dst_seq, self.lengths[src])
        self.cache.reserve(len(self.slots), self.cache.capacity)
        self.cache.copy_slot(src, dst, self.lengths[src])

    def remove(self, seq) -> None:
        """Free ``seq``'s slot at once; the last slot moves into the hole."""
        hole = self.slot_of(seq)
        last = len(self.slots) - 1
        if hole != last:
            self.cache.copy_slot(last, hole, self.lengths[last])
            self.slots[hole], self.lengths[hole] = self.slots[last], self.lengths[last]
        self.slots.pop()
        self.lengths.pop()

    @torch.no_grad()  # not inference_mode: cache buffers made here are updated in place later
    def forward(self) -> torch.Tensor:
        """Feed every slot's pending tokens; return log-probs of the next token [B, V] (float32)."""
        feeds = [seq.feeds[self.name] for seq in self.slots]
        if self.static is not None and self.static.applicable(feeds):
            lp = self.static.run(feeds, self.lengths)
            for i, f in enumerate(feeds):
                self.lengths[i] += 1
                f.clear()
            self.forwards += 1
            return lp
        B = len(feeds)
        q = torch.tensor([len(f) for f in feeds])  # [B]
        Q = int(q.max())
        L = torch.tensor(self.lengths)  # [B]
        kv_len = int((L + Q).max())
        self.cache.reserve(B, kv_len)
        ids = torch.full((B, Q), self.pad_id, dtype=torch.long)
        for i, f in enumerate(feeds):
            ids[i, Q - len(f):] = torch.tensor(f, dtype=torch.long)
        j = torch.arange(Q)[None, :]  # [1, Q]
        off = (Q - q)[:, None]  # [B, 1] left padding per row
        # real tokens at L..L+q-1, padding after them in future cells: the same formula gives both
        # the logical position and the cache cell of every column
        pos = torch.where(j >= off, L[:, None] + j - off, L[:, None] + q[:, None] + j)  # [B, Q]
        keys = torch.arange(kv_len)[None, None, :]  # [1, 1, K]
        mask = torch.where(keys <= pos[:, :, None], 0.0, self.mask_min).to(self.dtype)[:, None]  # [B, 1, Q, K]
        pos = pos.to(self.device)
        self.cache.begin_step(B, pos, kv_len)
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos,
            use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache},
        )
        for i, f in enumerate(feeds):
            self.lengths[i] += len(f)
            f.clear()
        self.forwards += 1
        logits = out.logits[:, -1, : self.vocab_size].float()  # [B, V]; padded lm_head rows cut
        return torch.log_softmax(logits, dim=-1)

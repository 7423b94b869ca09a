"""One policy's batched forward over exactly the sequences that use it.

Prefill and decode share one forward: a joining sequence feeds its prompt, the others their last
token (unless padding every decoding row to the prompt would cost more than a second forward: then
the joining rows, a suffix of the slots, run apart). Rows are left-padded to the longest feed Q;
each row gets explicit positions and an additive 4D mask, and writes its keys at its own cache
positions (padding lands in future cells that are masked now and overwritten later).

Two kinds of rows keep the logits of every position they feed (``position_logits``): a scored
prefill (prompt logprobs), which runs as a forward of its own without padding, and a speculative
verification (a sequence's last token plus its drafted tokens), batched with the others. A rejected
draft's cells are dropped by ``truncate``: the slot's length goes back, nothing is copied.
"""

from __future__ import annotations

import inspect

import torch

from .cpu_linear import can_pack, pack_linears
from .kv_cache import SlotKVCache
from .static_decode import StaticDecoder


SPLIT_PADDING_TOKENS = 32  # padding cells above which prefill and decode rows run as two forwards


def _cache_keyword(model) -> str:
    # transformers >= 5.24 names it `cache`; 5.17 `past_key_values` (accepted until 5.40)
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class PolicyRunner:
    def __init__(self, name: str, model, vocab_size: int, pad_id: int, device, dtype, decode: str = "dynamic",
                 cpu_linear: str = "onednn", slots: int = 4, capacity: int = 128,
                 adapters: dict[str, str] | None = None):
        self.name = name
        self.model = model
        # policy -> its LoRA adapter in ``model`` (adapters.py: every adapter of the base, grouped): each row of
        # a forward gets its lane's adapter; policies not named run the base
        self.adapters = dict(adapters or {})
        # float32 on CPU: linear layers prepacked for oneDNN once (cpu_linear.py); a no-op for weights
        # another runner already packed (prompted policies share them)
        self.packed_linears = pack_linears(model) if cpu_linear == "onednn" and can_pack(device, dtype) else 0
        self.vocab_size = vocab_size
        self.pad_id = pad_id
        self.device = torch.device(device)
        cfg = model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        self.cache = SlotKVCache(cfg.num_hidden_layers, kv_heads, head_dim, dtype, self.device, slots, capacity)
        self.mask_min = torch.finfo(dtype).min  # never -inf: an all-masked padding row would give NaN
        self.dtype = dtype
        self.cache_kw = _cache_keyword(model)
        self.slots: list = []  # lanes (a sequence's context in this policy) in slot order
        self._slot: dict = {}  # lane -> its slot (lanes hash by identity)
        # lane -> [fed positions, V] logits of a scored prefill or a verification (read once, by the core)
        self.position_logits: dict = {}
        self.lengths: list[int] = []  # tokens cached per slot
        self.forwards = 0  # forward passes run (metrics)
        self.split_steps = 0  # steps whose joining prompts ran apart from the decoding rows
        # decode-only steps: "dynamic" (the general path below), "static" (static shapes, eager) or
        # "graphs" (static shapes replayed as CUDA graphs)
        # (not for adapter lanes: each forward sets its rows' adapters, which a captured graph would not see)
        self.static = StaticDecoder(self, use_graphs=decode == "graphs") \
            if decode != "dynamic" and not self.adapters else None

    def _adapter(self, lane) -> str:
        """The adapter of a lane's policy ("__base__": none)."""
        return self.adapters.get(lane.seq.request.plan.policy_of(lane.stream), "__base__")

    def __len__(self) -> int:
        return len(self.slots)

    def slot_of(self, lane) -> int:
        return self._slot[lane]

    def holds(self, lane) -> bool:
        return lane in self._slot

    def add(self, lane, length: int = 0) -> int:
        self._slot[lane] = len(self.slots)
        self.slots.append(lane)
        self.lengths.append(length)
        return len(self.slots) - 1

    def fork(self, src, dst_lane) -> None:
        """``dst_lane`` joins with a copy of lane ``src``'s cache (n > 1 share the prompt's prefill)."""
        src = self.slot_of(src)
        dst = self.add(dst_lane, self.lengths[src])
        self.cache.reserve(len(self.slots), self.cache.capacity)
        self.cache.copy_slot(src, dst, self.lengths[src])

    def truncate(self, lane, length: int) -> None:
        """Keep the first ``length`` cached positions of ``lane`` (rejected drafts): the cells past it are
        overwritten later, as padding cells are."""
        slot = self.slot_of(lane)
        assert length <= self.lengths[slot]
        self.lengths[slot] = length

    def remove(self, lane) -> None:
        """Free ``lane``'s slot at once; the last slot moves into the hole."""
        self.position_logits.pop(lane, None)
        hole = self._slot.pop(lane)
        last = len(self.slots) - 1
        if hole != last:
            self.cache.copy_slot(last, hole, self.lengths[last])
            self.slots[hole], self.lengths[hole] = self.slots[last], self.lengths[last]
            self._slot[self.slots[hole]] = hole
        self.slots.pop()
        self.lengths.pop()

    @torch.inference_mode()  # the cache's buffers are made and changed only in inference mode (kv_cache.py)
    def forward(self) -> torch.Tensor:
        """Feed every slot's pending tokens; return the next token's logits [B, V] (float32, rows in slot
        order). Not normalised: the core mixes raw logits (see ``core._mix``). If it raises, nothing has
        changed but cells past every slot's length (overwritten later): the step can be run again."""
        feeds = [lane.step_feed() for lane in self.slots]
        scoring = [lane.seq.score_prompt for lane in self.slots]
        parts = self._scored_parts(feeds, scoring) if any(scoring) else [(lo, hi, False) for lo, hi in self._parts(feeds)]
        lps = [self._forward_part(feeds, lo, hi, scored, whole=len(parts) == 1) for lo, hi, scored in parts]
        self._fed(feeds)
        self.split_steps += len(parts) > 1
        return lps[0] if len(lps) == 1 else torch.cat(lps)

    @torch.inference_mode()
    def forward_alone(self) -> tuple[torch.Tensor, dict]:
        """``forward`` with each row in a forward of its own, after a batched one failed: (logits [B, V], the
        lanes whose rows raised -> their error; their rows are NaN). A row's logits do not depend on the other
        rows of its batch, so the rows that succeed get the logits the batch would have given them."""
        self.position_logits.clear()
        feeds = [lane.step_feed() for lane in self.slots]
        lps, failed = [], {}
        for i, lane in enumerate(self.slots):
            try:
                lps.append(self._forward_part(feeds, i, i + 1, lane.seq.score_prompt, whole=False))
            except Exception as err:  # noqa: BLE001 - the core fails this lane's request
                failed[lane] = err
                lps.append(torch.full((1, self.vocab_size), float("nan"), device=self.device))
        self._fed(feeds)
        return torch.cat(lps), failed

    def _forward_part(self, feeds: list[list[int]], lo: int, hi: int, scored: bool, whole: bool) -> torch.Tensor:
        keep = len(feeds[lo]) if scored else max(lane.verify for lane in self.slots[lo:hi])  # positions kept
        return self._forward_rows(feeds, lo, hi, whole=whole and not keep, keep=keep)

    def _fed(self, feeds: list[list[int]]) -> None:
        """The step's feeds are in the cache: lengths move on, the feeds are consumed."""
        for i, (lane, f) in enumerate(zip(self.slots, feeds)):
            self.lengths[i] += len(f)
            del lane.feed[: len(f)]
        self.forwards += 1

    @staticmethod
    def _parts(feeds: list[list[int]]) -> list[tuple[int, int]]:
        """Row ranges run as separate forwards. Joining sequences are appended, so their prompts form a
        suffix of the slots; when padding every decoding row to the prompt length would cost more than a
        second forward, the decoding rows [0, s) and the joining ones [s, B) run apart."""
        B = len(feeds)
        s = next((i for i, f in enumerate(feeds) if len(f) != 1), B)
        if s in (0, B):
            return [(0, B)]
        Q = max(len(f) for f in feeds[s:])
        return [(0, s), (s, B)] if s * (Q - 1) > SPLIT_PADDING_TOKENS else [(0, B)]

    @classmethod
    def _scored_parts(cls, feeds: list[list[int]], scoring: list[bool]) -> list[tuple[int, int, bool]]:
        """Each scored row alone (keeping every position's logits); the rows between them as ``_parts``."""
        parts, lo = [], 0
        for i, scored in enumerate([*scoring, True]):
            if scored:
                if lo < i:
                    parts += [(lo + a, lo + b, False) for a, b in cls._parts(feeds[lo:i])]
                if i < len(scoring):
                    parts.append((i, i + 1, True))
                lo = i + 1
        return parts

    def _forward_rows(self, feeds: list[list[int]], lo: int, hi: int, whole: bool, keep: int = 0) -> torch.Tensor:
        """Rows [lo, hi) in one forward; the logits of the last ``keep`` positions are kept for the rows that
        score them (a scored prefill: all it feeds, alone; a verification: its last token and drafts)."""
        part, lengths = feeds[lo:hi], self.lengths[lo:hi]
        # the static path pads up to a bucket with rows past the batch: only safe when no slot follows
        if whole and self.static is not None and self.static.applicable(part):
            return self.static.run(part, lengths)
        Q = max(len(f) for f in part)
        kv_len = max(lengths) + Q
        self.cache.reserve(hi, kv_len)
        # real tokens at L..L+q-1, left padding in the future cells L+q..L+Q-1 (masked now, overwritten
        # later): the same numbers are each column's logical position and the cache cell it writes
        ids = torch.tensor([[self.pad_id] * (Q - len(f)) + f for f in part], dtype=torch.long)  # [B, Q]
        pos = torch.tensor([[*range(n + len(f), n + Q), *range(n, n + len(f))] for f, n in zip(part, lengths)],
                           dtype=torch.long)  # [B, Q]
        keys = torch.arange(kv_len)[None, None, :]  # [1, 1, K]
        mask = torch.where(keys <= pos[:, :, None], 0.0, self.mask_min).to(self.dtype)[:, None]  # [B, 1, Q, K]
        pos = pos.to(self.device)
        self.cache.begin_step(len(part), pos, kv_len, first=lo)
        if self.adapters:  # each row's adapter (adapters.GroupedLoRA reads them)
            self.model.adapter_rows.set([self._adapter(lane) for lane in self.slots[lo:hi]])
        out = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), position_ids=pos,
            use_cache=True, logits_to_keep=max(keep, 1), **{self.cache_kw: self.cache},
        )
        if keep:  # rows are left padded: a row's last n positions are the last n columns
            for b, f in enumerate(part):
                lane = self.slots[lo + b]
                n = len(f) if lane.seq.score_prompt else lane.verify
                if n:
                    self.position_logits[lane] = out.logits[b, keep - n:, : self.vocab_size].float()
        return out.logits[:, -1, : self.vocab_size].float()  # [B, V]; padded lm_head rows cut

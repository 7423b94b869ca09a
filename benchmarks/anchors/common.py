"""What every anchor shares: the result record, the thread setting, left-padded batches, token counts."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from typing import Iterator, Sequence

from ..memory import mib


@dataclass
class BenchResult:
    """One contender's run over a prompt set. Throughput counts only useful tokens (up to EOS)."""

    name: str  # e.g. "proxy-tuning loop"
    batch_size: int  # static batch (1: one prompt at a time)
    threads: int  # torch intra-op threads during the run
    requests: int  # prompts generated for
    max_new_tokens: int
    tokens: int  # generated tokens, each row cut after its first EOS unless ignore_eos
    wall_s: float  # generation only: models loaded, warm-up excluded
    peak_rss_bytes: int | None = None  # peak RSS during the run (see benchmarks.memory.PeakMemory)
    params: dict = field(default_factory=dict)  # alpha, beta, ignore_eos, ...
    outputs: list[list[int]] = field(default_factory=list, repr=False)  # generated ids per prompt

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("outputs")
        d["tok_s"] = round(self.tok_s, 2)
        d["wall_s"] = round(self.wall_s, 3)
        d["peak_rss_mib"] = mib(self.peak_rss_bytes)
        return d


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op threads, then restore (one thread wins on this small-model CPU)."""
    import torch

    if n < 1:
        raise ValueError(f"threads must be >= 1, got {n}")
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    for i in range(0, len(items), size):
        yield items[i : i + size]


def encode_left_padded(tokenizer, prompts: Sequence[str]):
    """input_ids, attention_mask: [B, P], padded on the left so every row's next token is column P."""
    if tokenizer.padding_side != "left":
        raise ValueError("anchors need a left-padding tokenizer (benchmarks.models.load_tokenizer)")
    enc = tokenizer(list(prompts), return_tensors="pt", padding=True)
    return enc.input_ids, enc.attention_mask


def useful_tokens(rows: list[list[int]], eos_id: int | None, ignore_eos: bool) -> list[list[int]]:
    """Each row cut after its first EOS (kept): what a client would receive."""
    if ignore_eos or eos_id is None:
        return rows
    out = []
    for row in rows:
        out.append(row[: row.index(eos_id) + 1] if eos_id in row else row)
    return out

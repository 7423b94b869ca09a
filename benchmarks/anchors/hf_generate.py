"""The plain anchor: HF ``generate`` of one policy, greedy, in static left-padded batches.

It bounds what one policy costs through transformers alone; the engine serving one policy at 16
concurrent requests must be no slower than this at batch 16.
"""

from __future__ import annotations

import time
from typing import Sequence

from ..memory import PeakMemory
from .common import BenchResult, chunks, encode_left_padded, torch_threads, useful_tokens


def hf_generate(model, input_ids, attention_mask, max_new_tokens: int, pad_id: int, ignore_eos: bool = True):
    """Greedy ``generate`` of one static batch; returns new tokens [B, steps]."""
    import torch

    kwargs = {"eos_token_id": None} if ignore_eos else {}  # None: generate never stops early
    with torch.inference_mode():
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=pad_id, **kwargs)
    return out[:, input_ids.shape[1]:]  # [B, steps]


def run_hf_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 1,
                    threads: int = 1, ignore_eos: bool = True, warmup: bool = True) -> BenchResult:
    """Time ``generate`` over ``prompts`` in static batches of ``batch_size``."""
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    outputs: list[list[int]] = []
    with torch_threads(threads):
        batches = [encode_left_padded(tokenizer, b) for b in chunks(prompts, batch_size)]
        if warmup:
            hf_generate(model, *batches[0], 2, pad_id)
        with PeakMemory() as mem:
            start = time.perf_counter()
            for ids, mask in batches:
                new = hf_generate(model, ids, mask, max_new_tokens, pad_id, ignore_eos)
                outputs += useful_tokens(new.tolist(), eos_id, ignore_eos)
            wall = time.perf_counter() - start
    return BenchResult(
        name="HF generate (one policy)", batch_size=batch_size, threads=threads, requests=len(prompts),
        max_new_tokens=max_new_tokens, tokens=sum(map(len, outputs)), wall_s=wall,
        peak_rss_bytes=mem.rss_peak_bytes, params={"ignore_eos": ignore_eos}, outputs=outputs,
    )

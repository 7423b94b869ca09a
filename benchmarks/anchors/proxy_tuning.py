"""The proxy-tuning anchor (Liu et al., "Tuning Language Models by Proxy", COLM 2024), re-implemented
from the paper's description of its decoding loop.

Per step, three full model calls run one after another, each with its own ``past_key_values``:
the large base, the small tuned expert and the small untuned anti-expert. Their next-token logits
combine as ``base + alpha * (tuned - untuned)`` and the argmax is fed back to all three. A batch is
static: prompts are left-padded together, and rows that finished keep being computed (fed the pad
token) until every row is done or ``max_new_tokens`` is reached. This is the loop to beat.

Its best setting here: ``logits_to_keep=1`` (no full-prompt logits at prefill).
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

from ..memory import PeakMemory
from .common import BenchResult, chunks, encode_left_padded, torch_threads, useful_tokens

ROLES = ("base", "tuned", "untuned")


def proxy_tuning_generate(base, tuned, untuned, input_ids, attention_mask, max_new_tokens: int, alpha: float,
                          eos_id: int | None, pad_id: int, ignore_eos: bool = True, on_step=None):
    """Greedy proxy-tuned decoding of one static batch; returns new tokens [B, steps] (pad after EOS).

    ``on_step(t)``, when given, is called once step ``t``'s tokens are known (serving benchmarks time them)."""
    import torch

    models = (base, tuned, untuned)
    caches = [None, None, None]
    ids, mask = input_ids, attention_mask  # ids: [B, P] left-padded; mask: [B, P]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # [B, P]: pads share position 0, masked anyway
    unfinished = torch.ones(ids.shape[0], dtype=torch.bool, device=ids.device)  # [B]
    steps = []
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            logits = []
            for i, model in enumerate(models):  # three sequential forwards: the anchor's cost
                out = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                            past_key_values=caches[i], use_cache=True, logits_to_keep=1)
                caches[i] = out.past_key_values
                logits.append(out.logits[:, -1, :].float())  # [B, V_i]
            vocab = min(x.shape[-1] for x in logits)  # padded lm_heads are cut, as the paper's code does
            l_base, l_tuned, l_untuned = (x[:, :vocab] for x in logits)
            combined = l_base + alpha * (l_tuned - l_untuned)  # [B, V]
            nxt = torch.where(unfinished, combined.argmax(-1), pad_id)  # [B]
            steps.append(nxt)
            if on_step is not None:
                on_step(len(steps) - 1)
            if not ignore_eos and eos_id is not None:
                unfinished &= nxt != eos_id
                if not unfinished.any():
                    break
            ids = nxt[:, None]  # [B, 1]
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)  # [B, P + t]
            positions = positions[:, -1:] + 1  # [B, 1]
    return torch.stack(steps, dim=1)  # [B, steps]


def run_proxy_tuning(models: Mapping, tokenizer, prompts: Sequence[str], max_new_tokens: int,
                     alpha: float = 1.0, batch_size: int = 1, threads: int = 1, ignore_eos: bool = True,
                     warmup: bool = True) -> BenchResult:
    """Time the loop over ``prompts`` in static batches of ``batch_size``; ``models`` maps the roles
    base / tuned / untuned to loaded causal LMs."""
    missing = [r for r in ROLES if r not in models]
    if missing:
        raise KeyError(f"proxy tuning needs models for {', '.join(missing)}")
    base, tuned, untuned = (models[r] for r in ROLES)
    eos_id, pad_id = tokenizer.eos_token_id, tokenizer.pad_token_id
    outputs: list[list[int]] = []
    with torch_threads(threads):
        if warmup:
            ids, mask = encode_left_padded(tokenizer, prompts[:batch_size])
            proxy_tuning_generate(base, tuned, untuned, ids, mask, 2, alpha, eos_id, pad_id)
        batches = [encode_left_padded(tokenizer, b) for b in chunks(prompts, batch_size)]
        with PeakMemory() as mem:
            start = time.perf_counter()
            for ids, mask in batches:
                new = proxy_tuning_generate(base, tuned, untuned, ids, mask, max_new_tokens, alpha,
                                            eos_id, pad_id, ignore_eos)
                outputs += useful_tokens(new.tolist(), eos_id, ignore_eos)
            wall = time.perf_counter() - start
    return BenchResult(
        name="proxy-tuning loop", batch_size=batch_size, threads=threads, requests=len(prompts),
        max_new_tokens=max_new_tokens, tokens=sum(map(len, outputs)), wall_s=wall,
        peak_rss_bytes=mem.rss_peak_bytes, params={"alpha": alpha, "ignore_eos": ignore_eos}, outputs=outputs,
    )

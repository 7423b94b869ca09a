"""The DeRa anchor (Liu et al., "Decoding-time Realignment of Language Models", ICML 2024), as a user
of transformers would write it from the paper: HF ``generate`` on the aligned policy, with a
``LogitsProcessor`` that runs the reference model beside it and returns

    lambda * log_softmax(policy) + (1 - lambda) * log_softmax(reference),   lambda = beta / beta_prime

One prompt at a time (batch of one), as the paper's sweep over lambda is usually run.
"""

from __future__ import annotations

import time
from typing import Mapping, Sequence

from ..memory import PeakMemory
from .common import BenchResult, torch_threads, useful_tokens


def _processor_class():
    from transformers import LogitsProcessor

    class DeRaLogitsProcessor(LogitsProcessor):
        """Keeps the reference model's own KV cache in step with ``generate``'s tokens."""

        def __init__(self, reference, lam: float) -> None:
            self.reference = reference
            self.lam = lam
            self.cache = None
            self.seen = 0  # tokens of input_ids already fed to the reference

        def __call__(self, input_ids, scores):
            import torch

            # input_ids: [1, T]; scores: [1, V] the policy's next-token logits
            out = self.reference(input_ids=input_ids[:, self.seen:], past_key_values=self.cache,
                                 use_cache=True, logits_to_keep=1)
            self.cache, self.seen = out.past_key_values, input_ids.shape[1]
            vocab = min(scores.shape[-1], out.logits.shape[-1])
            ref = torch.log_softmax(out.logits[:, -1, :vocab].float(), dim=-1)  # [1, V]
            pol = torch.log_softmax(scores[:, :vocab].float(), dim=-1)  # [1, V]
            return self.lam * pol + (1.0 - self.lam) * ref

    return DeRaLogitsProcessor


def dera_generate(policy, reference, input_ids, max_new_tokens: int, lam: float, ignore_eos: bool = True):
    """Greedy DeRa decoding of one prompt ``input_ids`` [1, P]; returns the new token ids."""
    import torch
    from transformers import LogitsProcessorList

    if input_ids.shape[0] != 1:
        raise ValueError("the DeRa anchor runs a batch of one")
    processor = _processor_class()(reference, lam)
    kwargs = {"eos_token_id": None} if ignore_eos else {}  # None: generate never stops early
    with torch.inference_mode():
        out = policy.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                              max_new_tokens=max_new_tokens, logits_processor=LogitsProcessorList([processor]),
                              **kwargs)
    return out[0, input_ids.shape[1]:].tolist()


def run_dera(models: Mapping, tokenizer, prompts: Sequence[str], max_new_tokens: int, beta: float = 0.1,
             beta_prime: float = 0.05, policy: str = "tuned", reference: str = "base", threads: int = 1,
             ignore_eos: bool = True, warmup: bool = True) -> BenchResult:
    """Time DeRa over ``prompts`` one at a time; ``models`` maps names to loaded causal LMs."""
    if beta <= 0 or beta_prime <= 0:
        raise ValueError("beta and beta_prime must be > 0")
    lam = beta / beta_prime
    pol, ref = models[policy], models[reference]
    eos_id = tokenizer.eos_token_id
    encoded = [tokenizer(p, return_tensors="pt").input_ids for p in prompts]  # each [1, P]
    outputs: list[list[int]] = []
    with torch_threads(threads):
        if warmup:
            dera_generate(pol, ref, encoded[0], 2, lam)
        with PeakMemory() as mem:
            start = time.perf_counter()
            for ids in encoded:
                outputs += useful_tokens([dera_generate(pol, ref, ids, max_new_tokens, lam, ignore_eos)],
                                         eos_id, ignore_eos)
            wall = time.perf_counter() - start
    return BenchResult(
        name="DeRa generate+LogitsProcessor", batch_size=1, threads=threads, requests=len(prompts),
        max_new_tokens=max_new_tokens, tokens=sum(map(len, outputs)), wall_s=wall,
        peak_rss_bytes=mem.rss_peak_bytes,
        params={"beta": beta, "beta_prime": beta_prime, "lambda": lam, "ignore_eos": ignore_eos},
        outputs=outputs,
    )

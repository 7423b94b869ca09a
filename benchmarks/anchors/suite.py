"""The standard anchor set, run one after another on the same models and prompts."""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

from .common import BenchResult
from .dera import run_dera
from .hf_generate import run_hf_generate
from .proxy_tuning import run_proxy_tuning

CONTENDERS = ("proxy", "dera", "hf")


def run_anchor_suite(models: Mapping, tokenizer, prompts: Sequence[str], max_new_tokens: int = 128,
                     threads: int = 1, batch_sizes: Sequence[int] = (1, 16), include: Sequence[str] = CONTENDERS,
                     alpha: float = 1.0, beta: float = 0.1, beta_prime: float = 0.05, ignore_eos: bool = True,
                     repeats: int = 1, on_result: Callable[[BenchResult], None] | None = None) -> list[BenchResult]:
    """proxy tuning and HF generate at each batch size, DeRa at batch 1 (its only setting).

    With ``repeats`` > 1 the contenders run side by side in each repeat (proxy, DeRa, HF, then again) and
    each reports its median run (by tok/s); every run's tok/s is kept in ``params["tok_s_runs"]``.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    unknown = set(include) - set(CONTENDERS)
    if unknown:
        raise ValueError(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    common = {"max_new_tokens": max_new_tokens, "threads": threads, "ignore_eos": ignore_eos}
    jobs: list[Callable[[], BenchResult]] = []
    for bs in batch_sizes:
        if "proxy" in include:
            jobs.append(lambda bs=bs: run_proxy_tuning(models, tokenizer, prompts, alpha=alpha, batch_size=bs,
                                                       **common))
    if "dera" in include:
        jobs.append(lambda: run_dera(models, tokenizer, prompts, beta=beta, beta_prime=beta_prime, **common))
    for bs in batch_sizes:
        if "hf" in include:
            jobs.append(lambda bs=bs: run_hf_generate(models["base"], tokenizer, prompts, batch_size=bs, **common))
    runs: list[list[BenchResult]] = [[] for _ in jobs]
    for _ in range(repeats):
        for i, job in enumerate(jobs):
            runs[i].append(job())
            if on_result is not None:
                on_result(runs[i][-1])
    results = []
    for per in runs:
        median = sorted(per, key=lambda r: r.tok_s)[(len(per) - 1) // 2]  # a real run (the lower middle if even)
        median.params["tok_s_runs"] = [round(r.tok_s, 2) for r in per]
        results.append(median)
    return results

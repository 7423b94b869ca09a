"""Anchor baselines, re-implemented from the papers' descriptions (never copied):

- :func:`run_proxy_tuning`: the proxy-tuning loop (three sequential forwards per step, static batch);
- :func:`run_dera`: HF ``generate`` + a DeRa ``LogitsProcessor`` (batch of one);
- :func:`run_hf_generate`: plain HF ``generate`` of one policy.

Each returns a :class:`BenchResult` (tokens, wall time, tok/s, threads). ``python -m benchmarks.anchors``
runs the standard set and writes a table.
"""

from .common import BenchResult, torch_threads
from .dera import run_dera
from .hf_generate import run_hf_generate
from .proxy_tuning import run_proxy_tuning
from .suite import run_anchor_suite

__all__ = ["BenchResult", "run_anchor_suite", "run_dera", "run_hf_generate", "run_proxy_tuning", "torch_threads"]

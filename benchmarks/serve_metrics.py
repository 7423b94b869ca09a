"""Aggregate per-request timings into the serving metrics (the definitions of ``vllm bench serve``).

- TTFT: time to first token; TPOT: (latency - TTFT) / (output tokens - 1), per request with > 1 token;
- ITL: every gap between token chunks, pooled over requests; E2EL: request latency;
- throughputs: completed requests and output tokens over the benchmark's wall time.
Times are reported in milliseconds.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .serve_client import RequestResult

PERCENTILES = (50, 90, 99)


def _stats(values_s: Sequence[float]) -> dict:
    if len(values_s) == 0:
        return {"mean": None, "median": None, "p90": None, "p99": None}
    ms = np.asarray(values_s, dtype=float) * 1000.0
    p50, p90, p99 = np.percentile(ms, PERCENTILES)
    return {"mean": float(ms.mean()), "median": float(p50), "p90": float(p90), "p99": float(p99)}


def summarize(results: Sequence[RequestResult], duration_s: float) -> dict:
    ok = [r for r in results if r.success]
    out_tokens = sum(r.output_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens or 0 for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    errors = [r.error for r in results if not r.success]
    return {
        "completed": len(ok),
        "failed": len(errors),
        "errors": sorted(set(errors))[:5],  # distinct messages, a few
        "duration_s": duration_s,
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s if duration_s > 0 else 0.0,  # req/s
        "output_throughput": out_tokens / duration_s if duration_s > 0 else 0.0,  # tok/s
        "total_token_throughput": (in_tokens + out_tokens) / duration_s if duration_s > 0 else 0.0,
        "ttft_ms": _stats([r.ttft for r in ok]),
        "tpot_ms": _stats(tpot),
        "itl_ms": _stats([gap for r in ok for gap in r.itl]),
        "e2el_ms": _stats([r.latency for r in ok]),
    }


def summary_table(summary: dict) -> str:
    """The summary as a two-column markdown table."""
    rows = [
        ("completed / failed requests", f"{summary['completed']} / {summary['failed']}"),
        ("duration (s)", f"{summary['duration_s']:.2f}"),
        ("total input / output tokens", f"{summary['total_input_tokens']} / {summary['total_output_tokens']}"),
        ("request throughput (req/s)", f"{summary['request_throughput']:.2f}"),
        ("output token throughput (tok/s)", f"{summary['output_throughput']:.2f}"),
        ("total token throughput (tok/s)", f"{summary['total_token_throughput']:.2f}"),
    ]
    for key, name in (("ttft_ms", "TTFT"), ("tpot_ms", "TPOT"), ("itl_ms", "ITL"), ("e2el_ms", "E2E latency")):
        s = summary[key]
        for stat in ("mean", "median", "p90", "p99"):
            value = s[stat]
            rows.append((f"{name} {stat} (ms)", "-" if value is None else f"{value:.2f}"))
    if summary.get("peak_server_rss_mib") is not None:
        rows.append(("peak server RSS (MiB)", f"{summary['peak_server_rss_mib']:.1f}"))
    lines = ["| metric | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows]
    return "\n".join(lines)

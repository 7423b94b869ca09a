"""This machine's roofline: memory bandwidth and matmul FLOP/s, and the decode-step floors they set.

    OMP_NUM_THREADS=1 python -m benchmarks.roofline --out benchmarks/results/roofline_cpu

Measured at 1 torch thread and at all threads (``os.cpu_count()``), medians of ``--repeats`` timed
passes after a warm-up, float32, arrays of ``--mib`` MiB each (far beyond the L3 cache):

- copy:  ``y.copy_(x)``; bytes moved = 2 n (read x, write y), as STREAM counts;
- triad: ``a = b + s * c`` (``torch.add(b, c, alpha=s, out=a)``); bytes = 3 n;
- matmul: a square ``--matmul-n`` GEMM (the machine's FLOP/s) and the decode-shaped lm_head GEMM
  [16, 256] x [256, 32000] (what a step's largest GEMM reaches); FLOP = 2 M K N.

The floors (used by every CPU decode figure, ``decode_floor``): a decode step must read every weight of
each policy it runs (the lm_head included; of the input embedding only the rows it gathers) and, for
every sequence, that policy's whole KV cache, so ``bandwidth floor = bytes read / bandwidth`` (the
higher of copy and triad, so the floor is never flattered); ``compute floor = FLOP / square-GEMM
FLOP/s``; the roofline floor is the larger of the two, and a figure's roofline fraction is
``floor / measured time``: 1.0 would be the machine's limit. Working sets that fit the L3 cache can read
faster than DRAM, so a fraction above 1 is possible for small models.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report

DEFAULT_RESULT = RESULTS_DIR / "roofline_cpu.json"


def _timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` passes, after two warm-up passes."""
    fn()
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bandwidth(mib: int, repeats: int) -> dict:
    """Copy and triad bandwidth in GB/s (1e9 bytes/s) at the current torch thread count."""
    n = mib * 2**20 // 4
    x, y, z = (torch.rand(n) for _ in range(3))  # touched: no page faults inside the timing
    copy_s = _timed(lambda: y.copy_(x), repeats)
    triad_s = _timed(lambda: torch.add(y, z, alpha=3.0, out=x), repeats)
    return {"copy_gbs": 2 * n * 4 / copy_s / 1e9, "triad_gbs": 3 * n * 4 / triad_s / 1e9}


def matmul_flops(n: int, repeats: int) -> dict:
    """GFLOP/s of a square n x n GEMM and of the benchmark models' decode-shaped lm_head GEMM."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    square_s = _timed(lambda: torch.mm(a, b), repeats)
    h, w = torch.randn(16, 256), torch.randn(256, 32000)
    head_s = _timed(lambda: torch.mm(h, w), max(repeats, 10))
    return {"matmul_square_gflops": 2 * n**3 / square_s / 1e9,
            "matmul_lm_head_gflops": 2 * 16 * 256 * 32000 / head_s / 1e9}


def measure(threads: int, mib: int, repeats: int, matmul_n: int) -> dict:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return {"threads": threads, **bandwidth(mib, repeats), **matmul_flops(matmul_n, repeats)}
    finally:
        torch.set_num_threads(previous)


# ----------------------------------------------------------------------------- floors


@dataclass(frozen=True)
class Roofline:
    """Measured limits at one thread count: bytes/s and FLOP/s."""

    threads: int
    bandwidth_bps: float  # the higher of copy and triad
    flops: float  # square GEMM

    @classmethod
    def from_row(cls, row: dict) -> "Roofline":
        return cls(row["threads"], max(row["copy_gbs"], row["triad_gbs"]) * 1e9, row["matmul_square_gflops"] * 1e9)


def load_rooflines(path: str | Path = DEFAULT_RESULT, quick: bool = False) -> dict[int, Roofline]:
    """threads -> Roofline from a written ``roofline_cpu.json``; when it is missing, measured here briefly
    (1 thread and all threads; 16 MiB arrays with ``quick``, which then sit in the cache)."""
    import json

    path = Path(path)
    if path.exists():
        return {r["threads"]: Roofline.from_row(r) for r in json.loads(path.read_text())["rows"]}
    mib, repeats, n = (16, 1, 256) if quick else (256, 3, 1024)
    return {t: Roofline.from_row(measure(t, mib, repeats, n)) for t in sorted({1, os.cpu_count() or 1})}


@dataclass(frozen=True)
class PolicyShape:
    """What one decode step of a policy must read and compute, from its model."""

    weight_bytes: int  # every parameter a step reads in full (input embedding excluded unless tied)
    kv_bytes_per_token: int  # K and V over all layers for one cached token
    flops_per_row: int  # 2 x the weights a row multiplies (embedding gather excluded)
    attn_flops_per_token: int  # per row and cached key: q.k and p.v over all layers

    @classmethod
    def of(cls, model) -> "PolicyShape":
        cfg = model.config
        seen, total = set(), 0
        for p in model.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
        emb = model.get_input_embeddings().weight
        for m in model.modules():  # the engine's oneDNN-packed linears hold their weight outside the parameters
            if isinstance(getattr(m, "packed", None), torch.Tensor):
                total += m.in_features * m.out_features * emb.element_size()
        head = model.get_output_embeddings()
        tied = head is not None and getattr(head, "weight", None) is emb
        read = total - (0 if tied else emb.numel() * emb.element_size())
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * emb.element_size()
        macs = read // emb.element_size()
        attn = 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim
        return cls(read, kv, 2 * macs, attn)

    def lane(self) -> "PolicyShape":
        """Another context in the same forward (a prompted policy, a prompt variant): its own KV cache and rows,
        the weights already read by the forward's first policy."""
        return dataclasses.replace(self, weight_bytes=0)


def cached_positions(prompt_lens: list[int], new_tokens: list[int]) -> int:
    """Sum over every decode step of every request of its cache length: sum_i sum_t (P_i + t)."""
    return sum(n * p + n * (n - 1) // 2 for p, n in zip(prompt_lens, new_tokens))


def decode_floor(shapes: list[PolicyShape], steps: int, rows: int, positions: int, roof: Roofline) -> dict:
    """Floors (seconds) of a run of ``steps`` steps of the policies ``shapes`` (each step reads every weight
    once), generating ``rows`` tokens in all per policy, whose cached keys sum to ``positions`` per policy."""
    nbytes = sum(s.weight_bytes * steps + s.kv_bytes_per_token * positions for s in shapes)
    flops = sum(s.flops_per_row * rows + s.attn_flops_per_token * positions for s in shapes)
    bw_s, compute_s = nbytes / roof.bandwidth_bps, flops / roof.flops
    return {"bytes": nbytes, "flops": flops, "bandwidth_floor_s": bw_s, "compute_floor_s": compute_s,
            "floor_s": max(bw_s, compute_s), "bound": "bandwidth" if bw_s >= compute_s else "compute"}


def fractions(floor: dict, wall_s: float) -> dict:
    """The measured run against its floors: 1.0 is the machine's limit."""
    return {"bandwidth_fraction": floor["bandwidth_floor_s"] / wall_s, "roofline_fraction": floor["floor_s"] / wall_s,
            "bound": floor["bound"]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default=f"1,{os.cpu_count() or 1}", help="thread counts to measure at")
    ap.add_argument("--mib", type=int, default=256, help="MiB per array")
    ap.add_argument("--matmul-n", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="CI smoke: 16 MiB arrays, a 256 GEMM, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS_DIR / "roofline_cpu"))
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.matmul_n, args.repeats = 16, 256, 1
    threads = sorted({int(t) for t in args.threads.split(",")})
    rows = [measure(t, args.mib, args.repeats, args.matmul_n) for t in threads]
    for row in rows:
        print(row, flush=True)
    table = markdown_table(rows, [("threads", "threads"), ("copy_gbs", "copy GB/s"), ("triad_gbs", "triad GB/s"),
                                  ("matmul_square_gflops", f"GEMM {args.matmul_n}^3 GFLOP/s"),
                                  ("matmul_lm_head_gflops", "GEMM 16x256x32000 GFLOP/s")])
    meta = {**machine_info(), "threads": ",".join(map(str, threads)), "array MiB": args.mib,
            "repeats": f"median of {args.repeats}",
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.roofline "
                       + shlex.join(sys.argv[1:] if argv is None else argv)}
    notes = ("GB/s = 1e9 bytes/s; copy counts read + write (2 n x 4 bytes), triad 3 n x 4. The decode floors of "
             "the other CPU results use the higher of copy and triad at the figure's thread count, and the square "
             "GEMM's FLOP/s (`benchmarks/roofline.py`, `decode_floor`).")
    write_report(args.out, "Roofline of this machine (CPU)", meta, table, {"rows": rows}, notes)
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The engine on a real model with ``server.cpu_linear: torch`` against ``onednn`` (prepacked linears).

    OMP_NUM_THREADS=1 python -m benchmarks.cpu_linear --threads 1 --out benchmarks/results/cpu_linear_smollm2

One policy (default: the embedded SmolLM2-135M-Instruct, float32), loaded twice from disk: once left
as loaded, once packed by the engine. Both serve the same prompts, greedy, ``--tokens`` new tokens each,
at each concurrency, alternating ``--repeats`` times; the median of the per-repeat ratios is reported.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys

import torch

from benchmarks.anchors.common import torch_threads
from benchmarks.engine_bench import run_engine
from benchmarks.models import PROMPTS
from benchmarks.report import machine_info, markdown_table, write_report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", default=None, help="an HF model directory (default: the embedded SmolLM2)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/cpu_linear_smollm2")
    args = ap.parse_args(argv)
    from policymix.config import parse_config
    from policymix.embedded import smollm2_dir
    from policymix.engine.cpu_linear import PackedLinear
    from policymix.registry import load_registry

    path = args.path or str(smollm2_dir())
    torch.set_num_threads(args.threads)
    regs = {mode: load_registry(parse_config({"policies": {"p": {"path": path, "dtype": "float32"}},
                                              "server": {"cpu_linear": mode, "max_num_seqs": 64}}))
            for mode in ("torch", "onednn")}
    tok = regs["torch"].policies["p"].tokenizer
    ids = [tok(p).input_ids for p in PROMPTS]
    rows = []
    with torch_threads(args.threads):
        for reg in regs.values():
            run_engine(reg, {"p": 1.0}, ids[:2], 4, 2)  # warm-up
        packed = sum(isinstance(m, PackedLinear) for m in regs["onednn"].policies["p"].model.modules())
        for c in (int(x) for x in args.concurrency.split(",")):
            runs = {m: [] for m in regs}
            for _ in range(args.repeats):
                for m, reg in regs.items():
                    runs[m].append(run_engine(reg, {"p": 1.0}, ids[:max(c, 4)], args.tokens, c).tok_s)
            rows.append({"concurrency": c, "torch_tok_s": statistics.median(runs["torch"]),
                         "onednn_tok_s": statistics.median(runs["onednn"]),
                         "ratio": statistics.median([o / t for o, t in zip(runs["onednn"], runs["torch"])])})
            print(rows[-1], flush=True)
    table = markdown_table(rows, [("concurrency", "concurrency"), ("torch_tok_s", "cpu_linear: torch tok/s"),
                                  ("onednn_tok_s", "cpu_linear: onednn tok/s"), ("ratio", "ratio")])
    meta = machine_info() | {"model": path, "dtype": "float32", "linear layers packed": packed,
                             "threads": args.threads, "new tokens": args.tokens, "greedy": True,
                             "command": "OMP_NUM_THREADS=1 python -m benchmarks.cpu_linear "
                             + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    write_report(args.out, "Prepacked oneDNN linears against torch's, one real policy through the engine", meta,
                 table, {"rows": rows})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""TTFT over HTTP at 80% of the measured maximum throughput: a real ``policymix serve`` on the benchmark models.

    OMP_NUM_THREADS=1 python -m benchmarks.serve_http --out benchmarks/results/serve_http_cpu

Starts the server (one torch thread) on ``benchmarks.models``' config, then drives it with
``benchmarks.serve`` (streaming ``/v1/completions``, the named mixture ``proxy``, ``--input-len`` prompt
ids, ``--output-len`` new tokens, ignore_eos):
1. the maximum: ``--max-prompts`` requests with at most ``--max-concurrency`` in flight; request throughput;
2. 80% of that maximum (the median over the repeats) as Poisson arrivals, ``--prompts`` requests: TTFT,
   TPOT and E2E latency.
Each step ``--repeats`` times, medians reported; every run's summary is in the JSON.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.models import bench_models, write_policymix_config
from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report
from benchmarks.serve import ServeConfig, run_serve_benchmark

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(config: Path, port: int, log: Path, timeout_s: float = 300.0) -> subprocess.Popen:
    """``policymix serve`` in a child process (one torch thread), once /health answers 200."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(REPO / "server"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # this checkout's code
    cmd = [sys.executable, "-c", "from policymix.cli import main; raise SystemExit(main())", "serve",
           "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"the server did not answer /health within {timeout_s:.0f} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--input-len", type=int, default=32)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--max-concurrency", type=int, default=16)
    ap.add_argument("--max-prompts", type=int, default=48)
    ap.add_argument("--prompts", type=int, default=192)
    ap.add_argument("--load", type=float, default=0.8, help="the fraction of the maximum to offer")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny models, 8 short requests, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS_DIR / "serve_http_cpu"))
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.input_len, args.output_len, args.max_prompts, args.prompts = 1, 8, 4, 8, 8
    bm = bench_models(args.quick)
    out = Path(args.out)
    tmp = Path(tempfile.mkdtemp(prefix="policymix-bench-"))  # the config and the server's log
    config = write_policymix_config(bm, tmp / "bench.yaml")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    common = dict(base_url=url, model="base", mixture="proxy", input_len=args.input_len, output_len=args.output_len,
                  tokenizer=str(bm.tokenizer_dir))
    log = tmp / "server.log"
    proc = start_server(config, port, log)
    try:
        run_serve_benchmark(ServeConfig(**common, num_prompts=4, max_concurrency=4))  # warm-up
        peak = [run_serve_benchmark(ServeConfig(**common, num_prompts=args.max_prompts,
                                                max_concurrency=args.max_concurrency, test_request=False))["summary"]
                for _ in range(args.repeats)]
        max_rps = statistics.median(s["request_throughput"] for s in peak)
        rate = round(args.load * max_rps, 2)
        loaded = [run_serve_benchmark(ServeConfig(**common, num_prompts=args.prompts, request_rate=rate, seed=rep,
                                                  test_request=False))["summary"] for rep in range(args.repeats)]
    finally:
        proc.terminate()
        proc.wait(30)
    shutil.rmtree(tmp)
    if any(s["failed"] for s in peak + loaded):
        raise RuntimeError(f"failed requests: {[s['errors'] for s in peak + loaded if s['failed']]}")

    def m(runs, key, stat=None):
        return statistics.median(r[key][stat] if stat else r[key] for r in runs)

    row = {"max_concurrency": args.max_concurrency, "max_req_s": max_rps, "max_tok_s": m(peak, "output_throughput"),
           "rate_req_s": rate, "achieved_req_s": m(loaded, "request_throughput"),
           "ttft_p50_ms": m(loaded, "ttft_ms", "median"), "ttft_p99_ms": m(loaded, "ttft_ms", "p99"),
           "tpot_p50_ms": m(loaded, "tpot_ms", "median"), "e2el_p50_ms": m(loaded, "e2el_ms", "median"),
           "e2el_p99_ms": m(loaded, "e2el_ms", "p99")}
    table = markdown_table([row], [("max_concurrency", "max: in flight"), ("max_req_s", "max req/s"),
                                   ("max_tok_s", "max tok/s"), ("rate_req_s", f"offered req/s ({args.load:.0%})"),
                                   ("achieved_req_s", "served req/s"), ("ttft_p50_ms", "TTFT p50 ms"),
                                   ("ttft_p99_ms", "TTFT p99 ms"), ("tpot_p50_ms", "TPOT p50 ms"),
                                   ("e2el_p50_ms", "E2E p50 ms"), ("e2el_p99_ms", "E2E p99 ms")])
    meta = {**machine_info(), "threads": 1, "repeats": f"medians of {args.repeats}",
            "workload": f"named mixture proxy, {args.input_len} prompt ids, {args.output_len} new tokens, ignore_eos; "
                        f"max: {args.max_prompts} requests; load: {args.prompts} requests, Poisson",
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.serve_http "
                       + shlex.join(sys.argv[1:] if argv is None else argv)}
    write_report(out, "Serving over HTTP: maximum throughput and TTFT at 80% of it (CPU)", meta, table,
                 {"summary": row, "max_runs": peak, "load_runs": loaded})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""``python -m benchmarks.anchors``: run the anchor baselines on the benchmark models, write a table.

Example (the committed benchmarks/results/anchors_cpu.md):
    python -m benchmarks.anchors --threads 1 --max-new-tokens 128 --out benchmarks/results/anchors_cpu
"""

from __future__ import annotations

import argparse
import shlex
import sys

from ..models import DEFAULT_CACHE_DIR, PROMPTS, bench_models, build_bench_models, load_policies, load_tokenizer
from ..report import RESULTS_DIR, machine_info, markdown_table, write_report
from .suite import CONTENDERS, run_anchor_suite

COLUMNS = [("name", "contender"), ("batch_size", "batch"), ("threads", "threads"), ("requests", "requests"),
           ("tokens", "tokens"), ("wall_s", "wall s"), ("tok_s", "tok/s"), ("runs", "tok/s of each run"),
           ("peak_rss_mib", "peak RSS MiB")]

NOTES = """Greedy, float32, every row generates exactly max_new_tokens (ignore_eos), models loaded and one
short warm-up before timing. tok/s = generated tokens / wall time of generation; with --repeats N the
contenders run side by side in each repeat, each reports its median run, and every run is listed. The proxy-tuning loop
and DeRa are re-implementations from the papers' descriptions (benchmarks/anchors/). For reference,
issue 2 quotes the anchors' own code on this VM (one thread): DExpertsLlama 26.8 tok/s at batch 1 and
67.9 at batch 16; plain HF generate 74.7 and 173.1. The VM's 2 cores are shared with other work, so
absolute numbers drift between runs: compare contenders within one run."""


def _csv(text: str, cast=str) -> list:
    return [cast(x) for x in text.split(",") if x]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.anchors", description=__doc__.splitlines()[0])
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR), help="where the benchmark models are built")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (recorded with every number)")
    p.add_argument("--num-prompts", type=int, default=16, help=f"first N of the {len(PROMPTS)} prompts")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--batch-sizes", type=lambda s: _csv(s, int), default=[1, 16])
    p.add_argument("--include", type=_csv, default=list(CONTENDERS), help="subset of " + ",".join(CONTENDERS))
    p.add_argument("--alpha", type=float, default=1.0, help="proxy tuning: base + alpha * (tuned - untuned)")
    p.add_argument("--beta", type=float, default=0.1, help="DeRa: lambda = beta / beta_prime")
    p.add_argument("--beta-prime", type=float, default=0.05)
    p.add_argument("--repeats", type=int, default=3, help="runs per contender, side by side; the median is reported")
    p.add_argument("--quick", action="store_true", help="CI smoke: the tiny model set, 2 prompts x 4 tokens, 1 repeat")
    p.add_argument("--stop-at-eos", action="store_true", help="stop rows at EOS (default: exact lengths)")
    p.add_argument("--out", default=str(RESULTS_DIR / "anchors_cpu"), help="output path without extension")
    args = p.parse_args(argv)
    if not 1 <= args.num_prompts <= len(PROMPTS):
        p.error(f"--num-prompts must be in 1..{len(PROMPTS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.quick:
        args.num_prompts, args.max_new_tokens, args.repeats, args.batch_sizes = 2, 4, 1, [1, 2]
    bench = bench_models(quick=True) if args.quick else build_bench_models(args.cache_dir)
    tokenizer = load_tokenizer(bench.tokenizer_dir)
    models = load_policies(bench.paths)
    prompts = PROMPTS[: args.num_prompts]

    def show(r) -> None:
        print(f"{r.name:32s} batch {r.batch_size:3d} threads {r.threads}: {r.tokens} tokens "
              f"in {r.wall_s:.1f} s = {r.tok_s:.1f} tok/s", file=sys.stderr, flush=True)

    results = run_anchor_suite(
        models, tokenizer, prompts, max_new_tokens=args.max_new_tokens, threads=args.threads,
        batch_sizes=args.batch_sizes, include=args.include, alpha=args.alpha, beta=args.beta,
        beta_prime=args.beta_prime, ignore_eos=not args.stop_at_eos, repeats=args.repeats, on_result=show,
    )
    spec = bench.spec
    meta = {
        **machine_info(),
        "threads": args.threads,
        "models": f"3 random Llama policies, hidden {spec.hidden}, {spec.layers} layers, vocab {spec.vocab_size}, "
                  "float32",
        "workload": f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, greedy, "
                    + ("stop at EOS" if args.stop_at_eos else "ignore_eos")
                    + f", median of {args.repeats} run(s) per contender",
        "command": "python -m benchmarks.anchors " + shlex.join(argv if argv is not None else sys.argv[1:]),
    }
    rows = [{**r.to_dict(), "runs": " / ".join(f"{x:.1f}" for x in r.params["tok_s_runs"])} for r in results]
    table = markdown_table(rows, COLUMNS)
    md, js = write_report(args.out, "Anchor baselines (CPU)", meta, table, {"results": rows}, NOTES)
    print(table)
    print(f"wrote {md} and {js}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

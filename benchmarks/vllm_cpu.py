"""vLLM (CPU) against the native engine: each of three policies alone and their mixture, 1 and 16 concurrent.

    OMP_NUM_THREADS=1 python -m benchmarks.vllm_cpu vllm     # then the same with `native`

One engine per process (vLLM spawns workers); each writes ``--out``_<engine>.{md,json}. Every figure is
the median of ``--repeats`` timed rounds after a warm-up round. The ratio is the mixture's time per token
over the sum of the three policies' served alone by the same engine (issue 7's limit for vLLM: 1.3x).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report  # noqa: E402
from policymix.config import parse_config  # noqa: E402
from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams  # noqa: E402

ROOT = os.environ.get("POLICYMIX_BENCH_DIR", ".cache/bench-vllm-family")
NAMES = ["base", "dpo", "small"]


async def one(eng, model, mixture, i, tokens):
    rec = eng.compile(model, mixture)
    req = GenerationRequest(f"b{time.time_ns()}-{i}", model, rec, Prompt(text=f"Hello world {i}"),
                            SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True))
    n = 0
    async for ev in eng.generate(eng.plan(req)):
        if not isinstance(ev, RequestDone):
            n += 1
    return n


async def measure(eng, model, mixture, conc, tokens, repeats):
    """Median tok/s of ``repeats`` rounds of ``conc`` requests at once, after one warm-up round."""
    await asyncio.gather(*(one(eng, model, mixture, i, tokens) for i in range(conc)))
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        n = sum(await asyncio.gather(*(one(eng, model, mixture, i, tokens) for i in range(conc))))
        rates.append(n / (time.perf_counter() - t))
    return statistics.median(rates)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("engine", choices=["vllm", "native"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--out", default=str(RESULTS_DIR / "vllm_cpu"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if not os.path.exists(ROOT):
        from policymix.tiny_models import build_family

        build_family(ROOT, NAMES, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512)
    cfg = parse_config({"policies": {n: {"path": f"{ROOT}/{n}"} for n in NAMES},
                        "server": {"max_num_seqs": 16, "max_model_len": 256}})
    mix = {"weights": {"base": 1.0, "dpo": 0.5, "small": -0.5}}
    if args.engine == "vllm":
        from policymix.engine.vllm import VllmEngine

        eng = VllmEngine.from_config(cfg, progress=False)
    else:
        from policymix.engine.native import NativeEngine

        eng = NativeEngine.from_config(cfg, progress=False)
    rows = []

    async def run():
        await eng.start()
        for conc in (int(c) for c in args.concurrency.split(",")):
            singles = [await measure(eng, n, None, conc, args.tokens, args.repeats) for n in NAMES]
            mixed = await measure(eng, "base", mix, conc, args.tokens, args.repeats)
            ratio = (1 / mixed) / sum(1 / s for s in singles)  # time per token: mixture / the three alone, summed
            rows.append({"engine": args.engine, "concurrency": conc, **{f"{n}_tok_s": s for n, s in zip(NAMES, singles)},
                         "mixture_tok_s": mixed, "ratio": ratio})
            print(rows[-1], flush=True)
        await eng.shutdown(1)

    asyncio.run(run())
    table = markdown_table(rows, [("engine", "engine"), ("concurrency", "concurrency"),
                                  *[(f"{n}_tok_s", f"{n} alone tok/s") for n in NAMES],
                                  ("mixture_tok_s", "three-policy mixture tok/s"), ("ratio", "ratio")])
    meta = {**machine_info(), "threads": 1, "repeats": f"medians of {args.repeats}",
            "models": f"{ROOT}: hidden 256, 4 layers, 4 heads, 2 KV heads, {args.tokens} greedy tokens per request",
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.vllm_cpu "
                       + shlex.join(sys.argv[1:] if argv is None else argv)}
    write_report(f"{args.out}_{args.engine}", f"{args.engine} engine: three policies alone and mixed (CPU)", meta,
                 table, {"rows": rows})
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

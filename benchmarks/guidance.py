"""The cost of classifier-free guidance: a guided request against its two contexts served alone (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.guidance --threads 1 --out benchmarks/results/guidance_cpu

A guided request (``guidance: {policy, scale 1.5, negative_prompt}``) runs its policy over two contexts:
the prompt and the negative prompt (a prompt variant: one more row in the policy's batch). Its time is
compared, side by side in one run, with the two contexts served as two plain requests one after the
other (floor: guided <= 1.1x their sum), at ``--concurrency`` requests of each kind in flight; greedy,
``--tokens`` new tokens, ignore_eos; medians of ``--repeats``.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time

import torch

from benchmarks.anchors.common import torch_threads
from benchmarks.engine_bench import registry_from_models
from benchmarks.models import bench_models, load_policies, load_tokenizer
from benchmarks.report import machine_info, markdown_table, write_report
from benchmarks.roofline import PolicyShape, cached_positions, decode_floor, fractions, load_rooflines
from policymix.engine.core import EngineCore
from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams
from policymix.mixing.recipes import compile_recipe

_ids = itertools.count()
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
NEGATIVE = "Write something boring and repetitive."


def run(reg, mixture, prompts: list[str], tokens: int) -> float:
    """Seconds to serve ``prompts`` together (one request each) under ``mixture``."""
    core = EngineCore(reg)
    recipe = compile_recipe(mixture, "base", reg.infos(), {})
    done: list[RequestDone] = []
    start = time.perf_counter()
    for text in prompts:
        state = core.render(GenerationRequest(f"g{next(_ids)}", "base", recipe, Prompt(text=text),
                                              SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)))
        state.emit = lambda ev: done.append(ev) if isinstance(ev, RequestDone) else None
        core.add(state)
    while core.has_work():
        core.step()
    wall = time.perf_counter() - start
    assert len(done) == len(prompts) and all(d.error is None and d.completion_tokens == tokens for d in done)
    return wall


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,8")
    ap.add_argument("--roofline", default="benchmarks/results/roofline_cpu.json",
                    help="roofline.py's JSON (measured here, briefly, when missing)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny models, 4 tokens, 1 repeat")
    ap.add_argument("--out", default="benchmarks/results/guidance_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.tokens, args.concurrency = 1, 4, "1,2"
    torch.set_num_threads(args.threads)
    bm = bench_models(args.quick)
    tok = load_tokenizer(bm.tokenizer_dir)
    policy = load_policies({"base": bm.paths["base"]})
    shape = PolicyShape.of(policy["base"])  # before the engine packs its linears
    roof = load_rooflines(args.roofline, args.quick)[1]
    reg = registry_from_models(policy, tok, max_num_seqs=64)
    # a guided request: one forward of the policy per step over its two contexts (prompt and negative)
    context_lens = [len(tok(t).input_ids) for t in (PROMPT, NEGATIVE)]
    guided = {"guidance": {"policy": "base", "scale": 1.5, "negative_prompt": NEGATIVE}}
    rows = []
    with torch_threads(args.threads):
        run(reg, None, [PROMPT], 8)  # warm-up
        for c in (int(x) for x in args.concurrency.split(",")):
            per = []
            for _ in range(args.repeats):
                g = run(reg, guided, [PROMPT] * c, args.tokens)
                alone = run(reg, None, [PROMPT] * c, args.tokens) + run(reg, None, [NEGATIVE] * c, args.tokens)
                per.append({"guided_s": g, "two_alone_s": alone, "ratio": g / alone})
            row = {"concurrency": c, **{k: statistics.median(r[k] for r in per) for k in per[0]},
                   "guided_tok_s": c * args.tokens / statistics.median(r["guided_s"] for r in per)}
            floor = decode_floor([shape], args.tokens, 2 * c * args.tokens,
                                 cached_positions(context_lens * c, [args.tokens] * (2 * c)), roof)
            rows.append({**row, **fractions(floor, row["guided_s"])})
    meta = {**machine_info(), "threads": args.threads,
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.guidance " + shlex.join(sys.argv[1:] if argv is None
                                                                                       else argv)}
    table = markdown_table(rows, [("concurrency", "guided requests in flight"), ("guided_s", "guided s"),
                                  ("two_alone_s", "prompt alone + negative alone s"), ("ratio", "ratio (<= 1.1)"),
                                  ("guided_tok_s", "guided tok/s"), ("bandwidth_fraction", "guided: bandwidth fraction"),
                                  ("roofline_fraction", "roofline fraction")])
    notes = (f"Policy `base` of `benchmarks.models` (hidden 256, 4 layers, vocab 32k), {args.tokens} greedy tokens, "
             "medians of the repeats; each repeat runs the three side by side. A guided request's two contexts "
             "run as two rows of one forward of the policy, and one mixing add.")
    md, _ = write_report(args.out, "Classifier-free guidance: cost against its two contexts alone (CPU)", meta,
                         table, {"rows": rows}, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

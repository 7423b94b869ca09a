"""Prompt scoring on CPU: prompt tokens/s of the engine's prompt logprobs against HF's batched forward.

    OMP_NUM_THREADS=1 python -m benchmarks.scoring --threads 1 --out benchmarks/results/scoring_cpu

Three measurements on the benchmark policies (hidden 256, 4 layers, vocab 32k), side by side in one run,
medians of ``--repeats``:
- one policy: ``--requests`` scoring requests (``max_tokens: 0``, ``prompt_logprobs: 0``) of ``--prompt-len``
  tokens submitted together, against one HF forward over the same prompts as a batch followed by the
  log_softmax and the gather that give the same numbers (floor: engine >= 0.8x);
- a 3-policy mixture against the sum of the three policies scored alone (floor: <= 1.1x);
- ``--streams`` greedy streams, with and without one ``--long-len``-token scoring request joining them:
  their inter-token gaps (p99 and max; floor: p99 below 3x the streams alone).
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
from policymix.engine.core import EngineCore
from policymix.engine.protocol import GenerationRequest, Prompt, PromptEvent, SamplingParams, TokenEvent
from policymix.mixing.recipes import compile_recipe

_ids = itertools.count()


def _prompts(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(10, vocab, (n, length), generator=gen).tolist()


def _request(reg, weights: dict[str, float], ids: list[int], **sampling) -> GenerationRequest:
    first = next(iter(weights))
    recipe = compile_recipe({"weights": weights}, first, reg.infos(), {})
    return GenerationRequest(f"s{next(_ids)}", first, recipe, Prompt(token_ids=ids), SamplingParams(**sampling))


def engine_scoring_s(reg, weights: dict[str, float], prompts: list[list[int]]) -> float:
    """Seconds to score every prompt (all submitted at once); checks that each one was scored."""
    core = EngineCore(reg)
    core.max_num_seqs = max(core.max_num_seqs, len(prompts))
    scored = []
    start = time.perf_counter()
    for ids in prompts:
        state = core.render(_request(reg, weights, ids, max_tokens=0, prompt_logprobs=0))
        state.emit = lambda ev: scored.append(ev) if isinstance(ev, PromptEvent) else None
        core.add(state)
    while core.has_work():
        core.step()
    wall = time.perf_counter() - start
    assert len(scored) == len(prompts) and all(len(e.logprobs) == len(prompts[0]) for e in scored)
    return wall


@torch.inference_mode()
def hf_scoring_s(model, prompts: list[list[int]], vocab: int) -> float:
    """One batched forward, then log_softmax over the vocabulary and the gather of each next token."""
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    logits = model(input_ids=ids).logits[:, :-1, :vocab].float()
    lp = torch.log_softmax(logits, -1).gather(2, ids[:, 1:, None])
    float(lp.sum())
    return time.perf_counter() - start


def stream_gaps(core: EngineCore, reg, n_streams: int, tokens: int, long_ids: list[int] | None) -> list[float]:
    """Inter-token gaps (s) of greedy streams; ``long_ids``: a scoring request joins after 8 steps."""
    last: dict[str, float] = {}
    gaps: list[float] = []

    def sink(rid):
        def emit(ev):
            if isinstance(ev, TokenEvent):
                now = time.perf_counter()
                if rid in last:
                    gaps.append(now - last[rid])
                last[rid] = now
        return emit

    for i in range(n_streams):
        state = core.render(_request(reg, {"base": 1.0}, [11 + i, 12, 13, 14], max_tokens=tokens, temperature=0.0,
                                     ignore_eos=True))
        state.emit = sink(state.req.request_id)
        core.add(state)
    steps = 0
    while core.has_work():
        if steps == 8 and long_ids is not None:
            core.add(core.render(_request(reg, {"base": 1.0}, long_ids, max_tokens=0, prompt_logprobs=0)))
        core.step()
        steps += 1
    return gaps


def warm_core(reg, n_streams: int, tokens: int, long_ids: list[int]) -> tuple[EngineCore, float]:
    """An engine whose KV cache already grew for this load (streams and a long prompt at once), as a
    server's has once it served it; and the seconds of that first run (the cache is one
    [slots, heads, capacity, head_dim] buffer per layer: its first growth zero-fills slots x capacity)."""
    core = EngineCore(reg)
    start = time.perf_counter()
    stream_gaps(core, reg, n_streams, tokens, long_ids)
    return core, time.perf_counter() - start


def p99(xs: list[float]) -> float:
    return sorted(xs)[min(len(xs) - 1, int(0.99 * len(xs)))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--streams", type=int, default=8)
    ap.add_argument("--stream-tokens", type=int, default=96)
    ap.add_argument("--long-len", type=int, default=4000)
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny models, short prompts, 1 repeat")
    ap.add_argument("--out", default="benchmarks/results/scoring_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats, args.requests, args.prompt_len, args.streams, args.stream_tokens, args.long_len = 1, 2, 16, 2, 12, 80
    torch.set_num_threads(args.threads)
    bm = bench_models(args.quick)
    tok = load_tokenizer(bm.tokenizer_dir)
    engine_models = load_policies(bm.paths)
    hf_model = load_policies({"base": bm.paths["base"]})["base"]  # plain nn.Linear: HF as users run it
    reg = registry_from_models(engine_models, tok, max_num_seqs=64, max_len=bm.spec.max_positions)
    names = list(engine_models)[:3]
    V = len(tok)
    prompts = _prompts(args.requests, args.prompt_len, V)
    rows = []
    with torch_threads(args.threads):
        engine_scoring_s(reg, {"base": 1.0}, prompts[:2])  # warm-up
        for _ in range(args.repeats):
            one = engine_scoring_s(reg, {"base": 1.0}, prompts)
            hf = hf_scoring_s(hf_model, prompts, V)
            alone = [engine_scoring_s(reg, {n: 1.0}, prompts) for n in names]
            mix = engine_scoring_s(reg, {names[0]: 1.0, names[1]: 0.5, names[2]: -0.5}, prompts)
            rows.append({"engine_1pol_tok_s": args.requests * args.prompt_len / one,
                         "hf_batched_tok_s": args.requests * args.prompt_len / hf, "engine_over_hf": hf / one,
                         "mixture_s": mix, "sum_alone_s": sum(alone), "mixture_over_sum": mix / sum(alone)})
        long_ids = _prompts(1, args.long_len, V, seed=1)[0]
        solo, beside, growth = [], [], []
        for _ in range(args.repeats):
            core, grow = warm_core(reg, args.streams, args.stream_tokens, long_ids)
            growth.append(grow)
            solo.append(stream_gaps(core, reg, args.streams, args.stream_tokens, None))
            beside.append(stream_gaps(core, reg, args.streams, args.stream_tokens, long_ids))
    summary = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    gaps = {"solo_p99_ms": statistics.median(p99(g) for g in solo) * 1e3,
            "beside_p99_ms": statistics.median(p99(g) for g in beside) * 1e3,
            "solo_max_ms": statistics.median(max(g) for g in solo) * 1e3,
            "beside_max_ms": statistics.median(max(g) for g in beside) * 1e3}
    gaps["cold_run_s"] = statistics.median(growth)
    gaps["p99_ratio"] = gaps["beside_p99_ms"] / gaps["solo_p99_ms"]
    gaps["max_ratio"] = gaps["beside_max_ms"] / gaps["solo_max_ms"]
    meta = {**machine_info(), "threads": args.threads,
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.scoring " + shlex.join(sys.argv[1:] if argv is None
                                                                                      else argv)}
    table = (f"### Scoring {args.requests} prompts of {args.prompt_len} tokens (medians of {args.repeats})\n\n"
             + markdown_table([summary], [("engine_1pol_tok_s", "engine 1 policy tok/s"),
                                          ("hf_batched_tok_s", "HF batched forward tok/s"),
                                          ("engine_over_hf", "ratio (>= 0.8)"),
                                          ("mixture_s", "3-policy mixture s"), ("sum_alone_s", "sum of the 3 alone s"),
                                          ("mixture_over_sum", "ratio (<= 1.1)")])
             + f"\n\n### {args.streams} greedy streams beside one {args.long_len}-token scoring request\n\n"
             + markdown_table([gaps], [("solo_p99_ms", "p99 gap alone ms"), ("beside_p99_ms", "p99 gap beside ms"),
                                       ("p99_ratio", "p99 ratio (< 3)"), ("solo_max_ms", "max gap alone ms"),
                                       ("beside_max_ms", "max gap beside ms"), ("max_ratio", "max ratio"),
                                       ("cold_run_s", "cold run s")]))
    notes = ("The engine scores each prompt in a forward of its own that keeps every position's logits, folds "
             "each policy's rows into one mixed buffer and normalises per position (as a decoding step does). "
             "Beside decoding streams a scored prefill advances `prompt_scoring.CHUNK_TOKENS` tokens per step. "
             "The streams run on an engine whose KV cache already grew for this load, as a server's has once it "
             "served it: on a cold engine the 9th sequence doubles the slots of a cache whose capacity the long "
             "prompt set (zero-filling [slots, heads, capacity, head_dim] per layer), a one-time stall of about "
             "200 ms here that chunking does not remove (the slot cache's cost; a paged cache would not pay it).")
    md, _ = write_report(args.out, "Prompt scoring (prompt logprobs) on CPU", meta, table,
                         {"rows": rows, "summary": summary, "gaps": gaps}, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

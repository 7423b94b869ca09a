"""Serving under load: the engine against the proxy-tuning loop behind a static batcher (CPU, in process).

    OMP_NUM_THREADS=1 python -m benchmarks.serving_load --threads 1 --out benchmarks/results/serving_load_cpu

One workload, fixed by ``--seed``: ``--requests`` requests with Poisson arrivals at each offered load of
``--rates`` (light: both keep up; middle: beyond the static batcher's capacity; saturation: beyond
both), prompt and output lengths each drawn uniformly from ``--lengths`` (16-256 tokens; prompts are
random ordinary token ids of the benchmark tokenizer), greedy, every request stops at its own length
(ignore_eos, as at an EOS), the proxy-tuning mixture ``base + (tuned - untuned)`` on the benchmark models.

- **engine**: ``EngineCore`` stepped on this thread; each request joins at its arrival (continuous
  batching) and its tokens are timed as the engine emits them. ``policy_parallel: off``: one core at one
  torch thread, like the loop (``--engine-parallel`` adds the server's default, one core per forward).
- **static batcher**: the re-implemented proxy-tuning loop (``anchors/proxy_tuning.py``) served as a user of
  that code would: wait until ``--batch`` requests queue or the oldest has waited ``--batch-timeout`` s,
  run them as one left-padded batch to its longest row (finished rows keep computing), repeat. Its tokens
  are timed at the step that computed them, as if it streamed (generous: the loop returns a batch at its end).

Metrics as ``vllm bench serve`` defines them (``serve_metrics.summarize``): output tokens/s over the run
(first arrival to last token), E2E latency and TTFT p50 and p99. Each repeat runs the contenders one after
the other on the same arrivals; medians over ``--repeats`` repeats (ratios taken within each repeat).
"""

from __future__ import annotations

import argparse
import itertools
import random
import shlex
import statistics
import sys
import time

import torch

from benchmarks.anchors.common import torch_threads
from benchmarks.anchors.proxy_tuning import proxy_tuning_generate
from benchmarks.engine_bench import registry_from_models
from benchmarks.models import bench_models, load_policies, load_tokenizer
from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report
from benchmarks.serve_client import RequestResult
from benchmarks.serve_data import SampleRequest
from benchmarks.serve_metrics import summarize

PROXY = {"base": 1.0, "tuned": 1.0, "untuned": -1.0}
_ids = itertools.count()


def workload(n: int, lo: int, hi: int, tokenizer, seed: int) -> list[SampleRequest]:
    """``n`` requests: prompt and output lengths uniform in [lo, hi], prompts of ordinary token ids."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    pool = [i for i in range(len(tokenizer)) if i not in special]
    out = []
    for _ in range(n):
        p, m = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append(SampleRequest([rng.choice(pool) for _ in range(p)], m, p))
    return out


def poisson(n: int, rate: float, seed: int) -> list[float]:
    """Arrival times (s from the start) of a Poisson process of ``rate`` requests/s."""
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def _result(arrival: float, stamps: list[float]) -> RequestResult:
    """A request's timings from its arrival and the times its tokens were delivered (s from the start)."""
    return RequestResult(success=True, start=arrival, ttft=stamps[0] - arrival, latency=stamps[-1] - arrival,
                         itl=[b - a for a, b in zip(stamps, stamps[1:])], output_tokens=len(stamps))


def serve_engine(reg, reqs: list[SampleRequest], arrivals: list[float]) -> tuple[list[RequestResult], float]:
    """The engine core, requests joining at their arrival times; (per-request results, run seconds)."""
    from policymix.engine.core import EngineCore
    from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams, TokenEvent
    from policymix.mixing.recipes import compile_recipe

    core = EngineCore(reg)
    core.max_num_seqs = max(core.max_num_seqs, len(reqs))
    recipe = compile_recipe({"weights": PROXY}, "base", reg.infos(), {})
    stamps: dict[int, list[float]] = {i: [] for i in range(len(reqs))}
    done: set[int] = set()
    t0 = time.perf_counter()

    def sink(i):
        def emit(ev):
            if isinstance(ev, TokenEvent):
                stamps[i].append(time.perf_counter() - t0)
            elif isinstance(ev, RequestDone):
                assert ev.error is None, ev.error
                done.add(i)
        return emit

    nxt = 0
    while len(done) < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            r = reqs[nxt]
            state = core.render(GenerationRequest(f"l{next(_ids)}", "base", recipe, Prompt(token_ids=r.prompt),
                                                  SamplingParams(max_tokens=r.output_len, temperature=0,
                                                                 ignore_eos=True)))
            state.emit = sink(nxt)
            core.add(state)
            nxt += 1
        if core.has_work():
            core.step()
        elif nxt < len(reqs):
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
    results = [_result(arrivals[i], stamps[i]) for i in range(len(reqs))]
    return results, max(s[-1] for s in stamps.values())


def _left_pad(prompts: list[list[int]], pad_id: int):
    """input_ids, attention_mask [B, P] of token-id prompts, padded on the left."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.tensor(p)
        mask[row, width - len(p):] = 1
    return ids, mask


def serve_static(models, tok, reqs: list[SampleRequest], arrivals: list[float], batch: int,
                 timeout: float) -> tuple[list[RequestResult], float]:
    """The proxy-tuning loop behind a static batcher (module docstring); (per-request results, run seconds)."""
    step_times: dict[int, list[float]] = {}
    t0 = time.perf_counter()
    queue: list[int] = []
    nxt = 0
    while len(step_times) < len(reqs):
        now = time.perf_counter() - t0
        while nxt < len(reqs) and arrivals[nxt] <= now:
            queue.append(nxt)
            nxt += 1
        if len(queue) >= batch or (queue and now - arrivals[queue[0]] >= timeout):
            group, queue = queue[:batch], queue[batch:]
            ids, mask = _left_pad([reqs[i].prompt for i in group], tok.pad_token_id)
            times: list[float] = []
            proxy_tuning_generate(models["base"], models["tuned"], models["untuned"], ids, mask,
                                  max(reqs[i].output_len for i in group), 1.0, tok.eos_token_id, tok.pad_token_id,
                                  on_step=lambda _t: times.append(time.perf_counter() - t0))
            for i in group:
                step_times[i] = times[: reqs[i].output_len]
        else:
            wake = [arrivals[nxt]] if nxt < len(reqs) else []
            if queue:
                wake.append(arrivals[queue[0]] + timeout)
            time.sleep(max(0.0, min(wake) - (time.perf_counter() - t0)))
    results = [_result(arrivals[i], step_times[i]) for i in range(len(reqs))]
    return results, max(s[-1] for s in step_times.values())


def metrics(results: list[RequestResult], duration: float) -> dict:
    """The figures this benchmark reports, from ``serve_metrics.summarize`` (vLLM's definitions)."""
    s = summarize(results, duration)
    return {"tok_s": s["output_throughput"], "req_s": s["request_throughput"],
            "latency_p50_s": s["e2el_ms"]["median"] / 1e3, "latency_p99_s": s["e2el_ms"]["p99"] / 1e3,
            "ttft_p50_ms": s["ttft_ms"]["median"], "ttft_p99_ms": s["ttft_ms"]["p99"]}


def run(args) -> dict:
    bm = bench_models(args.quick)
    tok = load_tokenizer(bm.tokenizer_dir)
    loop_models = load_policies(bm.paths)  # the loop's own copies (plain nn.Linear)
    engines = {"engine": registry_from_models(load_policies(bm.paths), tok, max_num_seqs=256,
                                              policy_parallel="off")}
    if args.engine_parallel:
        engines["engine, policy-parallel"] = registry_from_models(load_policies(bm.paths), tok, max_num_seqs=256,
                                                                  policy_parallel="auto")
    lo, hi = (int(x) for x in args.lengths.split("-"))
    reqs = workload(args.requests, lo, hi, tok, args.seed)
    warm = reqs[:2]
    for reg in engines.values():  # warm-up: allocator, oneDNN kernels, the cache's first growth
        serve_engine(reg, warm, [0.0, 0.0])
    serve_static(loop_models, tok, warm, [0.0, 0.0], 2, 0.0)
    rows, runs = [], []
    for rate in (float(r) for r in args.rates.split(",")):
        arrivals = poisson(args.requests, rate, args.seed)
        per: dict[str, list[dict]] = {name: [] for name in [*engines, "static batcher"]}
        for rep in range(args.repeats):
            for name, reg in engines.items():
                per[name].append(metrics(*serve_engine(reg, reqs, arrivals)))
            per["static batcher"].append(metrics(*serve_static(loop_models, tok, reqs, arrivals, args.batch,
                                                               args.batch_timeout)))
            runs.append({"rate_req_s": rate, "repeat": rep, **{n: v[-1] for n, v in per.items()}})
            print(runs[-1], flush=True)
        static = per["static batcher"]
        for name, vals in per.items():
            row = {"rate_req_s": rate, "contender": name, **{k: statistics.median(v[k] for v in vals) for k in vals[0]}}
            if name != "static batcher":
                row["tok_s_ratio"] = statistics.median(e["tok_s"] / s["tok_s"] for e, s in zip(vals, static))
                row["latency_p50_ratio"] = statistics.median(s["latency_p50_s"] / e["latency_p50_s"]
                                                             for e, s in zip(vals, static))
            rows.append(row)
    return {"rows": rows, "runs": runs, "workload": {
        "requests": args.requests, "lengths": args.lengths, "rates": args.rates, "batch": args.batch,
        "batch_timeout_s": args.batch_timeout, "seed": args.seed, "repeats": args.repeats,
        "prompt_tokens": sum(r.prompt_len for r in reqs), "output_tokens": sum(r.output_len for r in reqs)}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--rates", default="1,3,8", help="offered loads, requests/s: light, middle, saturation")
    ap.add_argument("--lengths", default="16-256", help="prompt and output lengths, uniform in LO-HI")
    ap.add_argument("--batch", type=int, default=16, help="the static batcher's batch")
    ap.add_argument("--batch-timeout", type=float, default=2.0, help="s the oldest queued request waits at most")
    ap.add_argument("--engine-parallel", action="store_true", help="also the engine with policy-parallel forwards")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny models, 6 requests of 4-12 tokens, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS_DIR / "serving_load_cpu"))
    args = ap.parse_args(argv)
    if args.quick:
        args.requests, args.lengths, args.rates, args.repeats = 6, "4-12", "20,200", 1
        args.batch, args.batch_timeout = 4, 0.05
    torch.set_num_threads(args.threads)
    with torch_threads(args.threads):
        data = run(args)
    w = data["workload"]
    table = markdown_table(data["rows"], [
        ("rate_req_s", "offered req/s"), ("contender", "contender"), ("tok_s", "output tok/s"),
        ("tok_s_ratio", "tok/s ratio to the static batcher"), ("latency_p50_s", "latency p50 s"),
        ("latency_p99_s", "latency p99 s"), ("ttft_p50_ms", "TTFT p50 ms"), ("ttft_p99_ms", "TTFT p99 ms"),
        ("latency_p50_ratio", "static p50 / engine p50")])
    meta = {**machine_info(), "threads": args.threads,
            "workload": f"{w['requests']} requests, Poisson arrivals at {w['rates']} req/s, prompt and output lengths "
                        f"uniform in {w['lengths']} ({w['prompt_tokens']} prompt / {w['output_tokens']} output tokens), "
                        f"greedy, proxy-tuning mixture, static batch {w['batch']} or {w['batch_timeout_s']} s",
            "repeats": f"medians of {args.repeats}",
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.serving_load "
                       + shlex.join(sys.argv[1:] if argv is None else argv)}
    notes = ("Engine: continuous batching, `policy_parallel: off` (one core, one torch thread, like the loop). Static "
             "batcher: the proxy-tuning loop run on batches of up to the batch size, each to its longest row; its "
             "tokens are timed at the step that computed them. Output tok/s = generated tokens / (last token - "
             "start); latency = last token - arrival; TTFT = first token - arrival. Every run is in the JSON.")
    md, _ = write_report(args.out, "Serving load: engine against the static-batch proxy-tuning loop (CPU)", meta,
                         table, data, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

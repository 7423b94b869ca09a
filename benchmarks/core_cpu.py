"""The core issue's speed targets on CPU, every contender in one run, same models and prompts.

    OMP_NUM_THREADS=1 python -m benchmarks.core_cpu --threads 1 --out benchmarks/results/core_cpu

Sections (each ratio is measured side by side, ``--repeats`` times, and the median reported):
1. mixing overhead: a K-policy mixture (K = 1..4) over the sum of the K policies served alone by the
   same engine at the same concurrency (1, 4, 16), with the engine's per-phase timers;
2. one policy through the engine at 16 concurrent requests against HF ``generate`` at batch 16;
3. the proxy-tuning mixture through the engine at 16 concurrent requests against the proxy-tuning
   loop at batch 1 and as a static batch of 16 (equal lengths);
   sections 2 and 3 also run the engine with ``server.cpu_linear: torch`` (nn.Linear as loaded, the
   anchors' kernels), which separates the engine's scheduling from oneDNN's prepacked GEMMs;
4. a serving workload: Poisson arrivals, output lengths 16-256 (each request stops at its own
   length, as at an EOS), engine (continuous batching) against the static-batch loop (waits to fill
   a batch of 16, keeps computing finished rows): throughput and median latency;
5. best-of-8 against one sample of the same length (tiny fixture models, one prompt);
6. memory: RSS per policy loaded, KV-cache bytes per 1k cached tokens.
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.anchors.common import encode_left_padded, torch_threads
from benchmarks.anchors.hf_generate import run_hf_generate
from benchmarks.anchors.proxy_tuning import proxy_tuning_generate, run_proxy_tuning
from benchmarks.engine_bench import mixing_overhead, registry_from_models, run_engine
from benchmarks.memory import current_rss_bytes
from benchmarks.models import PROMPTS, build_bench_models, load_policies, load_tokenizer
from benchmarks.report import machine_info, markdown_table, write_report

PROXY = {"base": 1.0, "tuned": 1.0, "untuned": -1.0}


def med(xs):
    return statistics.median(xs)


def section_overhead(reg, ids, repeats, concs=(1, 4, 16), max_new=64):
    names = ["base", "tuned", "untuned", "fourth"]
    rows = []
    for c in concs:
        prompts = ids[: max(8, c)]
        for K in (1, 2, 3, 4):
            runs = [mixing_overhead(reg, names[:K], prompts, max_new, c) for _ in range(repeats)]
            timers = runs[len(runs) // 2]["mixture_timers"]
            steps = runs[len(runs) // 2]["mixture_steps"]
            fwd = sum(v for k, v in timers.items() if k.startswith("forward:"))
            rows.append({"concurrency": c, "K": K, "ratio": med([r["ratio"] for r in runs]),
                         "mixture_tok_s": med([r["mixture_tok_s"] for r in runs]),
                         "ms_step_forward": fwd / steps * 1e3,
                         "ms_step_mix": timers.get("mix", 0) / steps * 1e3,
                         "ms_step_sample": timers.get("sample", 0) / steps * 1e3,
                         "ms_step_schedule": timers.get("schedule", 0) / steps * 1e3,
                         "ms_step_detok": timers.get("detok", 0) / steps * 1e3})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def section_anchors(reg, reg_torch, models, tok, ids, repeats, threads, max_new=128):
    """``reg``: the engine as configured by default (oneDNN-prepacked linears); ``reg_torch``: the engine
    over ``models``, the anchors' own unpacked models (``cpu_linear: torch``)."""
    out = []
    for _ in range(repeats):
        eng1 = run_engine(reg, {"base": 1.0}, ids, max_new, 16)
        eng1_t = run_engine(reg_torch, {"base": 1.0}, ids, max_new, 16)
        hf16 = run_hf_generate(models["base"], tok, PROMPTS, max_new, batch_size=16, threads=threads)
        engp = run_engine(reg, PROXY, ids, max_new, 16)
        engp_t = run_engine(reg_torch, PROXY, ids, max_new, 16)
        pt1 = run_proxy_tuning(models, tok, PROMPTS[:4], max_new, batch_size=1, threads=threads)
        pt16 = run_proxy_tuning(models, tok, PROMPTS, max_new, batch_size=16, threads=threads)
        out.append({"engine_1pol_c16": eng1.tok_s, "engine_torch_1pol_c16": eng1_t.tok_s, "hf_generate_b16": hf16.tok_s,
                    "engine_proxy_c16": engp.tok_s, "engine_torch_proxy_c16": engp_t.tok_s,
                    "proxy_loop_b1": pt1.tok_s, "proxy_loop_b16": pt16.tok_s})
        print(json.dumps(out[-1]), flush=True)
    keys = out[0].keys()
    row = {k: med([o[k] for o in out]) for k in keys}
    for name, num, den in [("engine_1pol_over_hf_b16", "engine_1pol_c16", "hf_generate_b16"),
                           ("engine_torch_1pol_over_hf_b16", "engine_torch_1pol_c16", "hf_generate_b16"),
                           ("engine_proxy_over_loop_b1", "engine_proxy_c16", "proxy_loop_b1"),
                           ("engine_proxy_over_loop_b16", "engine_proxy_c16", "proxy_loop_b16"),
                           ("engine_torch_proxy_over_loop_b16", "engine_torch_proxy_c16", "proxy_loop_b16")]:
        row[name] = med([o[num] / o[den] for o in out])  # ratios within each repeat, then the median
    return row, out


def _arrivals(n, rate, seed):
    rng = random.Random(seed)
    t, times = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def serve_engine(reg, ids, lengths, arrivals):
    from policymix.engine.core import EngineCore
    from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams
    from policymix.mixing.recipes import compile_recipe

    core = EngineCore(reg)
    recipe = compile_recipe({"weights": PROXY}, "base", reg.infos(), {})
    finish: dict[int, float] = {}
    t0 = time.perf_counter()
    nxt = 0
    while len(finish) < len(ids):
        now = time.perf_counter() - t0
        while nxt < len(ids) and arrivals[nxt] <= now:
            req = GenerationRequest(f"s{nxt}", "base", recipe, Prompt(token_ids=ids[nxt]),
                                    SamplingParams(max_tokens=lengths[nxt], temperature=0, ignore_eos=True))
            state = core.render(req)
            state.emit = (lambda i: lambda ev: finish.setdefault(i, time.perf_counter() - t0)
                          if isinstance(ev, RequestDone) else None)(nxt)
            core.add(state)
            nxt += 1
        if core.has_work():
            core.step()
        elif nxt < len(ids):
            time.sleep(max(0.0, arrivals[nxt] - (time.perf_counter() - t0)))
    wall = max(finish.values())
    lat = [finish[i] - arrivals[i] for i in range(len(ids))]
    return {"tok_s": sum(lengths) / wall, "median_latency_s": med(lat), "p90_latency_s": sorted(lat)[int(0.9 * len(lat))]}


def serve_static_loop(models, tok, prompts, lengths, arrivals, batch=16, max_wait=4.0):
    """The static-batch proxy loop as a server: wait to fill a batch (or max_wait), run it to its longest row."""
    finish: dict[int, float] = {}
    t0 = time.perf_counter()
    queue: list[int] = []
    nxt = 0
    while len(finish) < len(prompts):
        now = time.perf_counter() - t0
        while nxt < len(prompts) and arrivals[nxt] <= now:
            queue.append(nxt)
            nxt += 1
        full = len(queue) >= batch or (queue and nxt == len(prompts))
        waited = queue and now - arrivals[queue[0]] >= max_wait
        if full or waited:
            group, queue = queue[:batch], queue[batch:]
            ids, mask = encode_left_padded(tok, [prompts[i] for i in group])
            proxy_tuning_generate(models["base"], models["tuned"], models["untuned"], ids, mask,
                                  max(lengths[i] for i in group), 1.0, tok.eos_token_id, tok.pad_token_id)
            done = time.perf_counter() - t0
            for i in group:
                finish[i] = done
        else:
            wake = [arrivals[nxt]] if nxt < len(prompts) else []
            if queue:
                wake.append(arrivals[queue[0]] + max_wait)
            time.sleep(max(0.0, min(wake) - (time.perf_counter() - t0)))
    wall = max(finish.values())
    lat = [finish[i] - arrivals[i] for i in range(len(prompts))]
    return {"tok_s": sum(lengths) / wall, "median_latency_s": med(lat), "p90_latency_s": sorted(lat)[int(0.9 * len(lat))]}


def section_serving(reg, models, tok, n, rate, threads, seed=0):
    rng = random.Random(seed)
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    ids = [tok(p).input_ids for p in prompts]
    lengths = [rng.randint(16, 256) for _ in range(n)]
    arrivals = _arrivals(n, rate, seed)
    with torch_threads(threads):
        eng = serve_engine(reg, ids, lengths, arrivals)
        print("engine", json.dumps(eng), flush=True)
        static = serve_static_loop(models, tok, prompts, lengths, arrivals)
        print("static", json.dumps(static), flush=True)
    return {"requests": n, "rate_req_s": rate, "engine_tok_s": eng["tok_s"], "static_tok_s": static["tok_s"],
            "throughput_ratio": eng["tok_s"] / static["tok_s"],
            "engine_median_latency_s": eng["median_latency_s"], "static_median_latency_s": static["median_latency_s"],
            "engine_p90_latency_s": eng["p90_latency_s"], "static_p90_latency_s": static["p90_latency_s"]}


def section_best_of(repeats, max_new=64):
    from policymix.config import parse_config
    from policymix.engine.core import EngineCore
    from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams
    from policymix.mixing.recipes import compile_recipe
    from policymix.registry import load_registry
    from policymix.tiny_models import build_family

    root = Path(".cache/bench-tiny")
    if not (root / "base" / "config.json").exists():
        build_family(root, ["base"])
    reg = load_registry(parse_config({"policies": {"base": {"path": str(root / "base")}}}))
    recipe = compile_recipe(None, "base", reg.infos(), {})

    def once(best_of):
        core = EngineCore(reg)
        box = []
        req = GenerationRequest("b", "base", recipe, Prompt(text="Hello world"),
                                SamplingParams(max_tokens=max_new, temperature=1.0, seed=1, ignore_eos=True,
                                               best_of=best_of if best_of > 1 else None))
        state = core.render(req)
        state.emit = lambda ev: box.append(ev) if isinstance(ev, RequestDone) else None
        t = time.perf_counter()
        core.add(state)
        while core.has_work():
            core.step()
        return time.perf_counter() - t

    once(8)
    ratios = []
    for _ in range(repeats):
        single = once(1)
        best8 = once(8)
        ratios.append(best8 / single)
    return {"max_new_tokens": max_new, "best_of_8_over_single": med(ratios), "all": ratios}


def section_memory(bm, tok, reg):
    import gc

    gc.collect()
    before = current_rss_bytes()
    extra = load_policies({"extra": bm.paths["base"]})["extra"]
    with torch.no_grad():
        extra(input_ids=torch.tensor([tok("Hello").input_ids]))  # touch every weight (safetensors are mmapped)
    gc.collect()
    per_policy = current_rss_bytes() - before
    param_bytes = sum(p.numel() * p.element_size() for p in extra.parameters())
    from policymix.engine.cpu_linear import pack_linears

    pack_linears(extra)  # what the engine does at start (cpu_linear: onednn): dense weights are dropped
    gc.collect()
    per_policy_packed = current_rss_bytes() - before
    del extra
    cfg = reg.policies["base"].model.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4  # K and V, float32
    run = run_engine(reg, {"base": 1.0}, [tok(p).input_ids for p in PROMPTS], 64, 16)
    from policymix.engine.core import EngineCore

    core = EngineCore(reg)
    return {"rss_per_policy_mib": per_policy / 2**20, "rss_per_policy_packed_mib": per_policy_packed / 2**20,
            "param_mib_per_policy": param_bytes / 2**20,
            "kv_bytes_per_1k_tokens_per_policy_mib": per_token * 1000 / 2**20,
            "engine_tok_s_during_check": run.tok_s, "kv_cache_bytes_idle": core.runners["base"].cache.nbytes()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--serve-requests", type=int, default=48)
    ap.add_argument("--serve-rates", default="2,6",
                    help="arrival rates (req/s): below and above the engine's capacity (throughput is only "
                         "comparable once both sides are saturated)")
    ap.add_argument("--sections", default="overhead,anchors,serving,best_of,memory")
    ap.add_argument("--out", default="benchmarks/results/core_cpu")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    bm = build_bench_models()
    tok = load_tokenizer(bm.tokenizer_dir)
    engine_models = load_policies(bm.paths)  # the default engine packs its linears for oneDNN in place
    models = load_policies(bm.paths)  # the anchors' copies stay plain nn.Linear
    # a fourth policy of the same shape for K = 4 (the same weights under another name: its own cache)
    reg = registry_from_models({**engine_models, "fourth": engine_models["base"]}, tok, max_num_seqs=64)
    reg_torch = registry_from_models(models, tok, max_num_seqs=64, cpu_linear="torch")
    ids = [tok(p).input_ids for p in PROMPTS]
    sections = args.sections.split(",")
    data: dict = {"threads": args.threads, "repeats": args.repeats}
    with torch_threads(args.threads):
        if "overhead" in sections:
            data["overhead"] = section_overhead(reg, ids, args.repeats)
        if "anchors" in sections:
            data["anchors"], data["anchors_all"] = section_anchors(reg, reg_torch, models, tok, ids, args.repeats,
                                                                   args.threads)
        if "best_of" in sections:
            data["best_of"] = section_best_of(max(args.repeats, 5))
        if "memory" in sections:
            data["memory"] = section_memory(bm, tok, reg)
    if "serving" in sections:
        data["serving"] = [section_serving(reg, models, tok, args.serve_requests, float(rate), args.threads)
                           for rate in args.serve_rates.split(",")]
    tables = []
    if "overhead" in data:
        tables.append("### Mixing overhead (mixture time / sum of the K policies alone)\n\n" + markdown_table(
            data["overhead"], [("concurrency", "concurrency"), ("K", "K"), ("ratio", "mix / sum"),
                               ("mixture_tok_s", "mixture tok/s"), ("ms_step_forward", "ms/step forward"),
                               ("ms_step_mix", "mix"), ("ms_step_sample", "sample"),
                               ("ms_step_schedule", "schedule"), ("ms_step_detok", "detok")]))
    if "anchors" in data:
        a = data["anchors"]
        tables.append("### Against the anchors (16 prompts x 128 tokens, greedy, equal lengths, tok/s)\n\n"
                      "The engine as configured by default (`cpu_linear: onednn`), then with `cpu_linear: torch` "
                      "(the anchors' own nn.Linear kernels: the engine's scheduling alone).\n\n" + markdown_table(
            [a], [("engine_1pol_c16", "engine 1 policy c16"), ("hf_generate_b16", "HF generate b16"),
                  ("engine_1pol_over_hf_b16", "ratio"), ("engine_torch_1pol_c16", "engine (torch linears)"),
                  ("engine_torch_1pol_over_hf_b16", "ratio")]) + "\n\n" + markdown_table(
            [a], [("engine_proxy_c16", "engine proxy c16"), ("proxy_loop_b1", "proxy loop b1"),
                  ("engine_proxy_over_loop_b1", "ratio"), ("proxy_loop_b16", "proxy loop b16"),
                  ("engine_proxy_over_loop_b16", "ratio"), ("engine_torch_proxy_c16", "engine (torch linears)"),
                  ("engine_torch_proxy_over_loop_b16", "ratio")]))
    if "serving" in data:
        tables.append("### Serving workload (Poisson arrivals, lengths 16-256, proxy-tuning mixture)\n\n" + markdown_table(
            data["serving"], [("requests", "requests"), ("rate_req_s", "rate req/s"), ("engine_tok_s", "engine tok/s"),
                                ("static_tok_s", "static loop tok/s"), ("throughput_ratio", "ratio"),
                                ("engine_median_latency_s", "engine median s"),
                                ("static_median_latency_s", "static median s"),
                                ("engine_p90_latency_s", "engine p90 s"), ("static_p90_latency_s", "static p90 s")]))
    if "best_of" in data:
        tables.append("### Best-of-8 against one sample (tiny fixture model, 64 tokens)\n\n" + markdown_table(
            [data["best_of"]], [("max_new_tokens", "tokens"), ("best_of_8_over_single", "best-of-8 time / single")]))
    if "memory" in data:
        tables.append("### Memory\n\n" + markdown_table(
            [data["memory"]], [("rss_per_policy_mib", "RSS per policy MiB"),
                               ("rss_per_policy_packed_mib", "after oneDNN packing MiB"),
                               ("param_mib_per_policy", "weights MiB"),
                               ("kv_bytes_per_1k_tokens_per_policy_mib", "KV MiB per 1k tokens per policy")]))
    meta = machine_info() | {"threads": args.threads, "command": "OMP_NUM_THREADS=1 python -m benchmarks.core_cpu "
                             + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))}
    write_report(args.out, "Core engine on CPU: mixing overhead, anchors, serving, best-of-n", meta,
                 "\n\n".join(tables), data)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

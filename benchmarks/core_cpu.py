"""The core issue's speed targets on CPU, every contender in one run, same models and prompts.

    OMP_NUM_THREADS=1 python -m benchmarks.core_cpu --threads 1 --out benchmarks/results/core_cpu

Sections (each ratio is measured side by side, ``--repeats`` times, and the median of the per-repeat
ratios reported; every decode figure also as a fraction of this machine's roofline, ``roofline.py``):
1. mixing overhead: a K-policy mixture (K = 1..4) over the sum of the K policies served alone by the
   same engine at the same concurrency (1, 4, 16), with the engine's per-phase timers;
2. like against like, equal batch sizes: one policy through the engine at 1 and 16 concurrent requests
   against HF ``generate`` at batch 1 and 16; the proxy-tuning mixture through the engine at 1 and 16
   against the proxy-tuning loop at batch 1 and 16 (equal lengths). The engine runs on one core
   (``policy_parallel: off``) as the anchors do; it is measured again with ``cpu_linear: torch``
   (nn.Linear as loaded: the anchors' kernels, so the engine's scheduling alone) and with
   policy-parallel forwards (one core per policy forward: more cores than the loop uses);
3. best-of-8 against one sample of the same length (tiny fixture models, one prompt);
4. memory: RSS per policy loaded, KV-cache bytes per 1k cached tokens.
The serving workload (Poisson arrivals, lengths 16-256) is ``benchmarks/serving_load.py``.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.anchors.common import torch_threads
from benchmarks.anchors.hf_generate import run_hf_generate
from benchmarks.anchors.proxy_tuning import run_proxy_tuning
from benchmarks.engine_bench import mixing_overhead, registry_from_models, run_engine
from benchmarks.memory import current_rss_bytes
from benchmarks.models import PROMPTS, bench_models, load_policies, load_tokenizer
from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report
from benchmarks.roofline import PolicyShape, cached_positions, decode_floor, fractions, load_rooflines

PROXY = {"base": 1.0, "tuned": 1.0, "untuned": -1.0}


def med(xs):
    return statistics.median(xs)


class Floors:
    """Roofline fractions of decode runs over the benchmark policies (all of one shape)."""

    def __init__(self, rooflines: dict, shape: PolicyShape):
        self.rooflines, self.shape = rooflines, shape

    def of(self, n_policies: int, cores: int, steps: int, prompt_lens: list[int], new: list[int],
           wall_s: float) -> dict:
        roof = self.rooflines.get(cores) or self.rooflines[max(self.rooflines)]
        floor = decode_floor([self.shape] * n_policies, steps, sum(new), cached_positions(prompt_lens, new), roof)
        return {**fractions(floor, wall_s), "cores": cores, "floor_ms_per_step": floor["floor_s"] / steps * 1e3,
                "bandwidth_floor_ms_per_step": floor["bandwidth_floor_s"] / steps * 1e3, "ms_per_step": wall_s / steps * 1e3}


def section_overhead(reg, ids, repeats, floors: Floors, concs=(1, 4, 16), max_new=64):
    names = ["base", "tuned", "untuned", "fourth"]
    rows = []
    for c in concs:
        prompts = ids[: max(8, c)]
        for K in (1, 2, 3, 4):
            runs = [mixing_overhead(reg, names[:K], prompts, max_new, c) for _ in range(repeats)]
            mid = sorted(runs, key=lambda r: r["mixture_s"])[(len(runs) - 1) // 2]  # the median run
            timers, steps = mid["mixture_timers"], mid["mixture_steps"]
            fwd = sum(v for k, v in timers.items() if k.startswith("forward:"))
            roof = floors.of(K, 1, steps, [len(p) for p in prompts], [max_new] * len(prompts), mid["mixture_s"])
            rows.append({"concurrency": c, "K": K, "ratio": med([r["ratio"] for r in runs]),
                         "mixture_tok_s": med([r["mixture_tok_s"] for r in runs]),
                         "ms_step_forward": fwd / steps * 1e3,
                         "ms_step_mix": timers.get("mix", 0) / steps * 1e3,
                         "ms_step_sample": timers.get("sample", 0) / steps * 1e3,
                         "ms_step_schedule": timers.get("schedule", 0) / steps * 1e3,
                         "ms_step_detok": timers.get("detok", 0) / steps * 1e3,
                         "floor_ms_per_step": roof["floor_ms_per_step"], "bandwidth_fraction": roof["bandwidth_fraction"],
                         "roofline_fraction": roof["roofline_fraction"], "bound": roof["bound"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# (key, contender, policies, concurrency or batch, cores); ratios below pair them like against like
CONTENDERS = [
    ("engine_1pol_c1", "engine, 1 policy", 1, 1, 1), ("hf_generate_b1", "HF generate", 1, 1, 1),
    ("engine_torch_1pol_c1", "engine, 1 policy, torch linears", 1, 1, 1),
    ("engine_1pol_c16", "engine, 1 policy", 1, 16, 1), ("hf_generate_b16", "HF generate", 1, 16, 1),
    ("engine_torch_1pol_c16", "engine, 1 policy, torch linears", 1, 16, 1),
    ("engine_proxy_c1", "engine, proxy mixture", 3, 1, 1), ("proxy_loop_b1", "proxy-tuning loop", 3, 1, 1),
    ("engine_torch_proxy_c1", "engine, proxy mixture, torch linears", 3, 1, 1),
    ("engine_parallel_proxy_c1", "engine, proxy mixture, policy-parallel", 3, 1, 0),
    ("engine_proxy_c16", "engine, proxy mixture", 3, 16, 1), ("proxy_loop_b16", "proxy-tuning loop", 3, 16, 1),
    ("engine_torch_proxy_c16", "engine, proxy mixture, torch linears", 3, 16, 1),
    ("engine_parallel_proxy_c16", "engine, proxy mixture, policy-parallel", 3, 16, 0),
]
# (key, numerator, denominator, what is compared)
RATIOS = [
    ("engine_1pol_c1_over_hf_b1", "engine_1pol_c1", "hf_generate_b1", "equal batch (1)"),
    ("engine_1pol_c16_over_hf_b16", "engine_1pol_c16", "hf_generate_b16", "equal batch (16)"),
    ("engine_torch_1pol_c1_over_hf_b1", "engine_torch_1pol_c1", "hf_generate_b1", "equal batch (1), equal kernels"),
    ("engine_torch_1pol_c16_over_hf_b16", "engine_torch_1pol_c16", "hf_generate_b16", "equal batch (16), equal kernels"),
    ("engine_proxy_c1_over_loop_b1", "engine_proxy_c1", "proxy_loop_b1", "equal batch (1)"),
    ("engine_proxy_c16_over_loop_b16", "engine_proxy_c16", "proxy_loop_b16", "equal batch (16)"),
    ("engine_torch_proxy_c1_over_loop_b1", "engine_torch_proxy_c1", "proxy_loop_b1", "equal batch (1), equal kernels"),
    ("engine_torch_proxy_c16_over_loop_b16", "engine_torch_proxy_c16", "proxy_loop_b16",
     "equal batch (16), equal kernels"),
    ("engine_parallel_proxy_c1_over_loop_b1", "engine_parallel_proxy_c1", "proxy_loop_b1",
     "equal batch (1), engine on one core per policy forward, loop on one"),
    ("engine_parallel_proxy_c16_over_loop_b16", "engine_parallel_proxy_c16", "proxy_loop_b16",
     "equal batch (16), engine on one core per policy forward, loop on one"),
    ("engine_proxy_c16_over_loop_b1", "engine_proxy_c16", "proxy_loop_b1", "cross-batch: engine at 16, loop at 1"),
]


def section_anchors(regs: dict, models, tok, repeats, threads, floors: Floors, max_new=128, few=4):
    """``regs``: ``engine`` (default linears, one core), ``torch`` (the anchors' own unpacked models,
    ``cpu_linear: torch``), ``parallel`` (default linears, policy-parallel forwards)."""
    cores_all = max(floors.rooflines) if floors.rooflines else 1
    prompts = {1: PROMPTS[:few], 16: PROMPTS}  # batch 1 runs one prompt after another: a few of them
    ids = {n: [tok(p).input_ids for p in ps] for n, ps in prompts.items()}
    runs: dict[str, list] = {key: [] for key, *_ in CONTENDERS}
    for _ in range(repeats):
        for key, _name, n_pol, c, _cores in CONTENDERS:
            weights = {"base": 1.0} if n_pol == 1 else PROXY
            if key.startswith("hf_generate"):
                r = run_hf_generate(models["base"], tok, prompts[c], max_new, batch_size=c, threads=threads)
                steps = math.ceil(r.requests / c) * max_new
            elif key.startswith("proxy_loop"):
                r = run_proxy_tuning(models, tok, prompts[c], max_new, batch_size=c, threads=threads)
                steps = math.ceil(r.requests / c) * max_new
            else:
                reg = regs["torch" if "_torch_" in key else "parallel" if "_parallel_" in key else "engine"]
                r = run_engine(reg, weights, ids[c], max_new, c)
                steps = r.steps
            runs[key].append({"tok_s": r.tok_s, "wall_s": r.wall_s, "steps": steps})
        print(json.dumps({k: round(v[-1]["tok_s"], 1) for k, v in runs.items()}), flush=True)
    row: dict = {k: med([x["tok_s"] for x in v]) for k, v in runs.items()}
    for key, num, den, _what in RATIOS:
        row[key] = med([a["tok_s"] / b["tok_s"] for a, b in zip(runs[num], runs[den])])  # within each repeat
    roof = {}
    for key, _name, n_pol, c, cores in CONTENDERS:
        mid = sorted(runs[key], key=lambda x: x["wall_s"])[(repeats - 1) // 2]
        lens = [len(x) for x in ids[c]]
        roof[key] = floors.of(n_pol, cores or min(cores_all, n_pol), mid["steps"], lens, [max_new] * len(lens),
                              mid["wall_s"])
    return row, runs, roof


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


def _fmt_runs(runs: list[dict]) -> str:
    return " / ".join(f"{r['tok_s']:.0f}" for r in runs)


def tables_of(data: dict) -> list[str]:
    tables = []
    if "overhead" in data:
        tables.append("### Mixing overhead (mixture time / sum of the K policies alone, one core)\n\n" + markdown_table(
            data["overhead"], [("concurrency", "concurrency"), ("K", "K"), ("ratio", "mix / sum"),
                               ("mixture_tok_s", "mixture tok/s"), ("ms_step_forward", "ms/step forward"),
                               ("ms_step_mix", "mix"), ("ms_step_sample", "sample"),
                               ("ms_step_schedule", "schedule"), ("ms_step_detok", "detok"),
                               ("floor_ms_per_step", "roofline floor ms/step"),
                               ("bandwidth_fraction", "bandwidth fraction"), ("roofline_fraction", "roofline fraction")]))
    if "anchors" in data:
        a, roof, runs = data["anchors"], data["anchors_roofline"], data["anchors_all"]
        rows = [{"key": key, "contender": name, "policies": n_pol, "batch": c, "cores": roof[key]["cores"],
                 "tok_s": a[key], "runs": _fmt_runs(runs[key]), **roof[key]} for key, name, n_pol, c, _ in CONTENDERS]
        tables.append(f"### Contenders (prompts x {data['anchor_tokens']} tokens, greedy, equal lengths; batch 1: "
                      f"{data['few']} prompts one at a time, batch 16: 16 prompts)\n\n"
                      "`batch` is the engine's concurrency or the anchor's static batch. `torch linears`: the engine "
                      "with `cpu_linear: torch` (the anchors' nn.Linear kernels); `policy-parallel`: one core per "
                      "policy forward (the server's default on CPU); every other row runs on one core.\n\n"
                      + markdown_table(rows, [("contender", "contender"), ("batch", "batch"), ("cores", "cores"),
                                              ("tok_s", "tok/s (median)"), ("runs", "tok/s of each repeat"),
                                              ("ms_per_step", "ms/step"), ("floor_ms_per_step", "floor ms/step"),
                                              ("bandwidth_fraction", "bandwidth fraction"),
                                              ("roofline_fraction", "roofline fraction"), ("bound", "bound")]))
        ratio_rows = [{"ratio": f"{num} / {den}", "what": what, "value": a[key]} for key, num, den, what in RATIOS]
        tables.append("### Ratios (medians of the per-repeat ratios)\n\n" + markdown_table(
            ratio_rows, [("ratio", "ratio"), ("what", "compared"), ("value", "value")]))
    if "best_of" in data:
        tables.append(f"### Best-of-8 against one sample (tiny fixture model, {data['best_of']['max_new_tokens']} "
                      "tokens)\n\n" + markdown_table(
            [data["best_of"]], [("max_new_tokens", "tokens"), ("best_of_8_over_single", "best-of-8 time / single")]))
    if "memory" in data:
        tables.append("### Memory\n\n" + markdown_table(
            [data["memory"]], [("rss_per_policy_mib", "RSS per policy MiB"),
                               ("rss_per_policy_packed_mib", "after oneDNN packing MiB"),
                               ("param_mib_per_policy", "weights MiB"),
                               ("kv_bytes_per_1k_tokens_per_policy_mib", "KV MiB per 1k tokens per policy")]))
    return tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sections", default="overhead,anchors,best_of,memory")
    ap.add_argument("--roofline", default=str(RESULTS_DIR / "roofline_cpu.json"),
                    help="roofline.py's JSON (measured here, briefly, when missing)")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny models, a few tokens, 1 repeat")
    ap.add_argument("--out", default=str(RESULTS_DIR / "core_cpu"))
    args = ap.parse_args(argv)
    tokens, overhead_tokens, concs, few = 128, 64, (1, 4, 16), 4
    if args.quick:
        args.repeats, tokens, overhead_tokens, concs, few = 1, 4, 4, (1, 4), 2
    torch.set_num_threads(args.threads)
    rooflines = load_rooflines(args.roofline, args.quick)
    bm = bench_models(args.quick)
    tok = load_tokenizer(bm.tokenizer_dir)
    engine_models = load_policies(bm.paths)  # the default engine packs its linears for oneDNN in place
    models = load_policies(bm.paths)  # the anchors' copies stay plain nn.Linear
    floors = Floors(rooflines, PolicyShape.of(models["base"]))
    # a fourth policy of the same shape for K = 4: base's weights loaded again (its own forward; the same loaded
    # model under another name would be a lane of base's forward)
    one_core = {**engine_models, "fourth": load_policies({"fourth": bm.paths["base"]})["fourth"]}
    regs = {"engine": registry_from_models(one_core, tok, max_num_seqs=64, policy_parallel="off"),
            "torch": registry_from_models(models, tok, max_num_seqs=64, cpu_linear="torch", policy_parallel="off"),
            "parallel": registry_from_models(engine_models, tok, max_num_seqs=64, policy_parallel="auto")}
    ids = [tok(p).input_ids for p in PROMPTS]
    sections = args.sections.split(",")
    data: dict = {"threads": args.threads, "repeats": args.repeats, "anchor_tokens": tokens, "few": few,
                  "rooflines": {t: {"bandwidth_gbs": r.bandwidth_bps / 1e9, "gflops": r.flops / 1e9}
                                for t, r in rooflines.items()}}
    with torch_threads(args.threads):
        for reg in regs.values():
            run_engine(reg, {"base": 1.0}, ids[:2], 2, 2)  # warm-up
        if "overhead" in sections:
            data["overhead"] = section_overhead(regs["engine"], ids, args.repeats, floors, concs, overhead_tokens)
        if "anchors" in sections:
            data["anchors"], data["anchors_all"], data["anchors_roofline"] = section_anchors(
                regs, models, tok, args.repeats, args.threads, floors, tokens, few)
        if "best_of" in sections:
            data["best_of"] = section_best_of(max(args.repeats, 5), 8 if args.quick else 64)
        if "memory" in sections:
            data["memory"] = section_memory(bm, tok, regs["engine"])
    tables = tables_of(data)
    meta = machine_info() | {"threads": args.threads, "repeats": f"medians of {args.repeats}",
                             "command": "OMP_NUM_THREADS=1 python -m benchmarks.core_cpu "
                             + shlex.join(sys.argv[1:] if argv is None else argv)}
    notes = ("Roofline: a decode step reads every weight of its policies (of the input embedding only the gathered "
             "rows) and each sequence's whole KV cache; the floor is those bytes over the bandwidth measured at the "
             "row's core count (`roofline.py`, the higher of copy and triad) or the FLOPs over the GEMM rate, "
             "whichever is larger; fraction = floor / measured time (prefill steps included in the time). "
             f"Bandwidth used (GB/s by threads): "
             + ", ".join(f"{t}: {r['bandwidth_gbs']:.1f}" for t, r in data["rooflines"].items()) + ".")
    write_report(args.out, "Core engine on CPU: mixing overhead, like-for-like anchors, best-of-n, memory", meta,
                 "\n\n".join(tables), data, notes)
    print("\n\n".join(tables))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Policies that share weights share the forward: prompted policies and LoRA adapters as lanes (issue 24).

On the embedded SmolLM2-135M-Instruct (float32, CPU) with LoRA adapters of it (rank 16 on every linear
layer: q/k/v/o/gate/up/down, random non-zero weights), greedy, ``max_new`` tokens per request:

- speed: each mixture against its one-policy baseline at 1 request and at 16 concurrent, the rounds
  interleaved (baseline, mixture, baseline, ...) and the ratio of medians of ``--repeats`` rounds;
- memory: the resident set of a fresh process that loads a config and runs a few requests, for the
  base alone, the base with 4 adapters, the embedded default (one model, 3 prompted policies), and an
  engine holding no model (the runtime's baseline: torch, transformers and policymix imported).

    OMP_NUM_THREADS=1 python -m benchmarks.shared_weights                # about 6 minutes on 2 cores
    OMP_NUM_THREADS=1 python -m benchmarks.shared_weights --quick        # seconds: a smoke run

Results: benchmarks/results/shared_weights_cpu.{md,json} (not with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results"
PROMPTS = ["Tell me about the moon.", "Write a haiku about the sea.", "What is the capital of France?",
           "Explain gravity to a child.", "List three colours.", "Why is the sky blue?",
           "Describe a cat.", "How do plants grow?"]


def make_adapters(base_dir: Path, out: Path, n: int, rank: int = 16) -> dict[str, Path]:
    """``n`` LoRA adapters of the base (every linear layer of each block), saved once under ``out``."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    paths = {}
    for i in range(n):
        path = out / f"lora{i}-r{rank}"
        if not (path / "adapter_config.json").is_file():
            torch.manual_seed(100 + i)
            model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
            cfg = peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=False,
                                  target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                  "down_proj"])
            peft.get_peft_model(model, cfg).save_pretrained(path)
        paths[f"lora{i}"] = path
    return paths


def config(base_dir: Path, adapters: dict[str, Path], prompted: bool) -> dict:
    from policymix.embedded import STYLES

    policies = {"base": {"path": str(base_dir)}}
    if prompted:
        policies.update({name: {"path": str(base_dir), "system_prompt": p} for name, p in STYLES.items()})
    policies.update({name: {"path": str(base_dir), "adapter": str(p), "reference": "base", "beta": 0.1}
                     for name, p in adapters.items()})
    return {"policies": policies, "server": {"max_num_seqs": 32, "max_model_len": 2048}}


def timed(core_registry, recipe, model: str, prompts: list[str], max_new: int, concurrency: int,
          keep: bool = False) -> float:
    """Seconds to generate ``max_new`` tokens for each prompt, ``concurrency`` in flight (closed loop); with
    ``keep``, the KV-cache bytes the engine allocated instead."""
    from policymix.engine.core import EngineCore
    from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams
    from policymix.mixing.recipes import compile_recipe

    reg = core_registry
    core = EngineCore(reg)
    compiled = compile_recipe(recipe, model, reg.infos(), reg.config.mixtures)
    pending, done, sent = list(prompts), [], 0
    start = time.perf_counter()
    while pending or core.has_work():
        while pending and sent - len(done) < concurrency:
            req = GenerationRequest(f"r{sent}", model, compiled, Prompt(text=pending.pop(0)),
                                    SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True))
            state = core.render(req)
            state.emit = lambda ev: done.append(ev) if isinstance(ev, RequestDone) else None
            core.add(state)
            sent += 1
        core.step()
    wall = time.perf_counter() - start
    assert all(d.error is None and d.completion_tokens == max_new for d in done), "a request failed"
    core.close()
    if keep:
        return sum(r.cache.nbytes() for r in [*core.runners.values(), *core.drafters.values()])
    return wall


CASES = [  # (label, baseline (model, recipe), mixture (model, recipe), concurrencies)
    ("3 prompted policies of one model (formal + playful + concise)", ("base", None),
     ("formal", {"weights": {"formal": 0.4, "playful": 0.3, "concise": 0.3}}), (1, 16)),
    ("base + 2 rank-16 adapters on all linear layers", ("base", None),
     ("base", {"weights": {"base": 0.5, "lora0": 0.3, "lora1": 0.2}}), (1, 16)),
    ("DeRa of an adapter policy over its base (beta 0.1 -> 0.05)", ("lora0", None),
     ("lora0", {"reference": "base", "policy": "lora0", "beta": 0.1, "beta_prime": 0.05}), (1,)),
]


def speed(base_dir: Path, adapters: dict[str, Path], repeats: int, max_new: int, quick: bool) -> list[dict]:
    import torch

    from policymix.config import parse_config
    from policymix.registry import load_registry

    reg = load_registry(parse_config(config(base_dir, {k: adapters[k] for k in ("lora0", "lora1")}, prompted=True)))
    rows = []
    for label, (bm, brecipe), (mm, mrecipe), concs in CASES:
        for c in concs:
            prompts = [PROMPTS[i % len(PROMPTS)] for i in range(2 if c == 1 else c)]
            base_s, mix_s = [], []
            with torch.inference_mode():
                timed(reg, brecipe, bm, prompts[:1], 2, 1)  # warm-up (oneDNN packing, first allocations)
                for _ in range(repeats):
                    base_s.append(timed(reg, brecipe, bm, prompts, max_new, c))
                    mix_s.append(timed(reg, mrecipe, mm, prompts, max_new, c))
            ratio = statistics.median(mix_s) / statistics.median(base_s)
            rows.append({"case": label, "concurrency": c, "baseline": bm if brecipe is None else brecipe,
                         "mixture": mrecipe, "baseline_s": base_s, "mixture_s": mix_s, "ratio": round(ratio, 3)})
            print(f"{label} @ c{c}: {ratio:.2f}x  (baseline {statistics.median(base_s):.2f} s, "
                  f"mixture {statistics.median(mix_s):.2f} s)", flush=True)
    return rows


def lora_paths(base_dir: Path, adapters: dict[str, Path], repeats: int, tokens: int = 4) -> list[dict]:
    """One forward (``tokens`` per row, no cache) of the base with 2 adapters, rows cycling base, lora0, lora1:
    PEFT's mixed-adapter batches (``adapter_names``) against the grouped layers the server uses
    (adapters.GroupedLoRA), both over oneDNN-packed base layers, and the base alone (no adapter rows)."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    from policymix.adapters import group_adapters
    from policymix.engine.cpu_linear import pack_linears

    def loaded():
        m = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                           adapters["lora0"], adapter_name="lora0")
        m.load_adapter(adapters["lora1"], adapter_name="lora1")
        return m.eval()

    mixed = loaded()
    pack_linears(mixed)
    grouped = group_adapters(loaded())
    pack_linears(grouped)
    rows = []
    for n in (3, 48):
        ids = torch.randint(100, 20000, (n, tokens), generator=torch.Generator().manual_seed(n))
        names = [("__base__", "lora0", "lora1")[i % 3] for i in range(n)]
        runs = {"peft_adapter_names": lambda: mixed(input_ids=ids, adapter_names=names),
                "grouped": lambda: (grouped.adapter_rows.set(names), grouped(input_ids=ids)),
                "base_alone": lambda: (grouped.adapter_rows.set(["__base__"] * n), grouped(input_ids=ids))}
        times = {k: [] for k in runs}
        with torch.inference_mode():
            a = mixed(input_ids=ids, adapter_names=names).logits
            grouped.adapter_rows.set(names)
            b = grouped(input_ids=ids).logits
            diff = float((a - b).abs().max())
            for _ in range(repeats + 1):  # the first round warms up
                for k, f in runs.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
        med = {k: statistics.median(v[1:]) for k, v in times.items()}
        rows.append({"rows": n, "tokens_per_row": tokens, "seconds": med, "max_abs_logit_difference": diff,
                     "peft_over_base": round(med["peft_adapter_names"] / med["base_alone"], 3),
                     "grouped_over_base": round(med["grouped"] / med["base_alone"], 3)})
        print(f"LoRA paths @ {n} rows: PEFT {rows[-1]['peft_over_base']:.2f}x, grouped {rows[-1]['grouped_over_base']:.2f}x "
              f"the base alone (logits differ by {diff:.1e})", flush=True)
    return rows


def rss_of(case: str, base_dir: Path, adapters: dict[str, Path]) -> dict:
    """A fresh process's resident set after loading ``case`` and generating a little (``--rss-case``)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.shared_weights", "--rss-case", case,
                          "--base-dir", str(base_dir), "--adapters", json.dumps({k: str(v) for k, v in adapters.items()})],
                         capture_output=True, text=True, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def _rss_case(case: str, base_dir: Path, adapters: dict[str, Path]) -> dict:
    import psutil
    import torch

    from policymix.config import parse_config
    from policymix.engine.core import EngineCore
    from policymix.registry import load_registry

    torch.set_num_threads(1)
    if case == "runtime":  # an engine holding no model: what loading a model imports, nothing loaded
        from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification  # noqa: F401

        return {"case": case, "rss_bytes": psutil.Process().memory_info().rss}
    if case == "embedded":
        from policymix.embedded import default_config

        cfg = default_config(policies_dir=Path("/nonexistent"))
        model, recipe = "formal", {"weights": {"formal": 0.4, "playful": 0.3, "concise": 0.3}}
    else:
        chosen = adapters if case == "base+4" else {}
        cfg = parse_config(config(base_dir, chosen, prompted=False))
        model, recipe = "base", ({"weights": {"base": 0.2, **{k: 0.2 for k in chosen}}} if chosen else None)
    reg = load_registry(cfg)
    core = EngineCore(reg)  # packs the weights as a server does; the requests below start cores of their own
    loaded = psutil.Process().memory_info().rss
    with torch.inference_mode():
        kv = timed(reg, recipe, model, PROMPTS[:4], 8, 4, keep=True)
    return {"case": case, "loaded_rss_bytes": loaded, "rss_bytes": psutil.Process().memory_info().rss,
            "kv_cache_bytes": kv, "runners": len(core.runners)}


def tensor_bytes(files: list[Path]) -> int:
    """Bytes of every tensor in these safetensors files."""
    from safetensors import safe_open

    total = 0
    for file in files:
        with safe_open(str(file), "pt") as f:
            for k in f.keys():
                t = f.get_slice(k)
                n = 1
                for d in t.get_shape():
                    n *= d
                total += n * {"F32": 4, "F16": 2, "BF16": 2}.get(t.get_dtype(), 4)
    return total


def memory(base_dir: Path, adapters: dict[str, Path]) -> dict:
    runs = {case: rss_of(case, base_dir, adapters) for case in ("runtime", "base", "base+4", "embedded")}
    a_bytes = tensor_bytes([p / "adapter_model.safetensors" for p in adapters.values()])
    model_bytes = tensor_bytes(sorted(base_dir.glob("*.safetensors")))
    from safetensors import safe_open

    with safe_open(str(sorted(base_dir.glob("*.safetensors"))[0]), "pt") as f:  # tied: no lm_head tensor stored
        embed = next(k for k in f.keys() if k.endswith("embed_tokens.weight"))
        shape = f.get_slice(embed).get_shape()
    return {"runs": runs, "adapter_bytes": a_bytes, "model_bytes": model_bytes,
            "tied_lm_head_bytes": shape[0] * shape[1] * 4,
            "base+4 minus base (loaded)": runs["base+4"]["loaded_rss_bytes"] - runs["base"]["loaded_rss_bytes"],
            "embedded minus runtime (loaded)": runs["embedded"]["loaded_rss_bytes"] - runs["runtime"]["rss_bytes"]}


def report(rows: list[dict], mem: dict, meta: dict, paths: list[dict]) -> str:
    mib = 2**20
    lines = [f"# Shared weights: prompted policies and LoRA adapters as lanes ({meta['date']}, commit {meta['commit']})",
             "", f"Command: `{meta['command']}`. {meta['machine']}; torch threads: {meta['threads']}; "
             f"{meta['repeats']} interleaved rounds, ratio of medians; {meta['max_new']} greedy tokens per request.", "",
             "| mixture | baseline | concurrent | mixture / baseline |", "|---|---|---|---|"]
    for r in rows:
        base = r["baseline"] if isinstance(r["baseline"], str) else json.dumps(r["baseline"])
        lines.append(f"| {r['case']} | `{base}` alone | {r['concurrency']} | {r['ratio']:.2f}x |")
    lines += ["", "Two ways to run adapter rows, side by side (one forward of 4 tokens per row, no cache, rows cycling",
              "base / lora0 / lora1, oneDNN-packed base layers under both; median of 5):", "",
              "| rows | PEFT mixed-adapter batches / base alone | grouped low-rank layers (kept) / base alone | logits differ by |",
              "|---|---|---|---|"]
    for p in paths:
        lines.append(f"| {p['rows']} | {p['peft_over_base']:.2f}x | {p['grouped_over_base']:.2f}x | "
                     f"{p['max_abs_logit_difference']:.1e} |")
    runs = mem["runs"]
    lines += ["", "Resident memory, a fresh process each: loaded (an engine built, its weights packed), then after 4",
              "requests of 8 tokens (the KV cache it allocated shown apart: each policy's lane holds its own):", "",
              "| process | runners | RSS loaded | RSS after the run | of which KV cache |", "|---|---|---|---|---|"]
    for case, label in (("runtime", "no model (torch, transformers' model classes, policymix imported)"),
                        ("base", "the base alone"), ("base+4", "the base + 4 rank-16 adapters (their mixture run)"),
                        ("embedded", "the embedded default (SmolLM2 + 3 prompted policies, their mixture run)")):
        r = runs[case]
        if case == "runtime":
            lines.append(f"| {label} | 0 | {r['rss_bytes'] / mib:.0f} MiB | | |")
        else:
            lines.append(f"| {label} | {r['runners']} | {r['loaded_rss_bytes'] / mib:.0f} MiB | {r['rss_bytes'] / mib:.0f}"
                         f" MiB | {r['kv_cache_bytes'] / mib:.0f} MiB |")
    a, m = mem["adapter_bytes"], mem["model_bytes"]
    loaded = {case: r.get("loaded_rss_bytes", r["rss_bytes"]) for case, r in runs.items()}
    extra = loaded["base+4"] - loaded["base"]
    held = loaded["embedded"] - loaded["runtime"]
    lines += ["", f"- the adapters' tensors: {a / mib:.1f} MiB; the base's: {m / mib:.0f} MiB (float32).",
              f"- base + 4 adapters - base, loaded: {extra / mib:.1f} MiB = {extra / a:.2f} x the adapters (floor: <= 1.2 x).",
              f"- embedded default - no model, loaded: {held / mib:.0f} MiB = {held / m:.2f} x the model (floor: <= 1.3 x); "
              "of it, the packed lm_head's copy of the tied embedding: "
              f"{mem.get('tied_lm_head_bytes', 0) / mib:.0f} MiB.",
              "- after the run the KV cache's zeroed pages are resident only where written, so RSS minus the KV "
              "bytes allocated does not isolate the weights; the loaded figures do."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-new", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="1 round of 4 tokens, no results written")
    ap.add_argument("--only", choices=("speed", "memory"), help="one half (no results written)")
    ap.add_argument("--rss-case", help=argparse.SUPPRESS)
    ap.add_argument("--base-dir", help=argparse.SUPPRESS)
    ap.add_argument("--adapters", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.rss_case:
        adapters = {k: Path(v) for k, v in json.loads(args.adapters).items()}
        print(json.dumps(_rss_case(args.rss_case, Path(args.base_dir), adapters)))
        return 0
    import torch

    from policymix.embedded import cache_root, smollm2_dir

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    base_dir = smollm2_dir()
    adapters = make_adapters(base_dir, cache_root() / "bench-adapters", 4)
    repeats, max_new = (1, 4) if args.quick else (args.repeats, args.max_new)
    paths = lora_paths(base_dir, adapters, 1 if args.quick else 5) if args.only != "memory" else []
    rows = speed(base_dir, adapters, repeats, max_new, args.quick) if args.only != "memory" else []
    mem = memory(base_dir, adapters) if args.only != "speed" else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    meta = {"date": time.strftime("%Y-%m-%d"), "commit": commit, "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()} CPU, {os.cpu_count()} cores", "repeats": repeats, "max_new": max_new,
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.shared_weights" + (" --quick" if args.quick else "")}
    if mem is None:
        return 0
    text = report(rows, mem, meta, paths)
    print(text)
    if not args.quick and args.only is None:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "shared_weights_cpu.md").write_text(text)
        (RESULTS / "shared_weights_cpu.json").write_text(json.dumps({"meta": meta, "speed": rows, "memory": mem,
                                                                     "lora_paths": paths},
                                                                    indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

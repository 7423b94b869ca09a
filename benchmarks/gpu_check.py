"""GPU check for a lent CUDA machine (no network, torch + transformers preinstalled, no vLLM).

Builds Qwen2-style policies from real configurations with random bf16 weights directly on the GPU
and measures, in one run: the engine's mixing overhead (K-policy mixture over the sum of the K alone)
at several concurrencies, single-policy and three-policy throughput against the proxy-tuning loop
(three sequential HF forwards with past_key_values, static batch), the memory-bandwidth floor
(sum of weight bytes / bandwidth per step), and for the 7B shape the cost of a speculative
verification forward over k + 1 positions against a one-position decode step, and a base + 3 LoRA adapters
(unmerged, lanes of one forward) against the base alone. Prints a short table last; full JSON goes to $OUT.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT)]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # cpu: a dry run of the script with the tiny shape
SHAPES = {  # from the public Qwen2 configurations
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, vocab_size=1000, tie_word_embeddings=False),
    "qwen2-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                     num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
}


DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def wordlevel_tokenizer(vocab_size: int):
    """A tokenizer of exactly ``vocab_size`` ids (the engine needs one to detokenize)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, vocab_size)})
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", bos_token="<s>",
                                   unk_token="<unk>")


def build(shape: str, n: int):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="bfloat16")
    cfg._attn_implementation = "sdpa"
    models = {}
    previous = torch.get_default_dtype()
    torch.set_default_dtype(DTYPE)  # built directly in bf16: three fp32 7B models would not fit
    for i in range(n):
        torch.manual_seed(i)
        with torch.device(DEVICE):
            m = Qwen2ForCausalLM(cfg).eval()
        m.requires_grad_(False)
        models[f"p{i}"] = m
    torch.set_default_dtype(previous)
    return models


def weight_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def bandwidth_gbs() -> float:
    nbytes = 2 * 1024**3 if DEVICE == "cuda" else 64 * 1024**2  # the CPU dry run only checks the script
    x = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=DEVICE)
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    _sync()
    t = time.perf_counter()
    for _ in range(10):
        y.copy_(x)
    _sync()
    dt = (time.perf_counter() - t) / 10
    del x, y
    return 2 * nbytes / dt / 1e9  # read + write


def proxy_loop(models, prompts, max_new, batch):
    from benchmarks.anchors.proxy_tuning import proxy_tuning_generate

    base, tuned, untuned = models
    toks, t = 0, time.perf_counter()
    for i in range(0, len(prompts), batch):
        ids = torch.tensor(prompts[i:i + batch], device=DEVICE)
        mask = torch.ones_like(ids)
        out = proxy_tuning_generate(base, tuned, untuned, ids, mask, max_new, 1.0, None, 0)
        toks += out.numel()
    _sync()
    return toks / (time.perf_counter() - t)


def graphs_vs_dynamic(models, tok, prompts, max_new=32) -> dict:
    """Same greedy requests through the dynamic path and through CUDA graphs: tokens and speed."""
    from benchmarks.engine_bench import registry_from_models

    from policymix.engine.core import EngineCore
    from policymix.engine.protocol import GenerationRequest, Prompt, SamplingParams, TokenEvent
    from policymix.mixing.recipes import compile_recipe

    out = {}
    for mode in ("dynamic", "graphs"):
        reg = registry_from_models(models, tok, max_num_seqs=128, device=DEVICE, dtype=DTYPE, decode=mode)
        core = EngineCore(reg)
        recipe = compile_recipe({"weights": {"p0": 0.7, "p1": 0.3}}, "p0", reg.infos(), {})
        events: dict[int, list] = {}
        for i, p in enumerate(prompts):
            req = GenerationRequest(f"g{i}", "p0", recipe, Prompt(token_ids=p),
                                    SamplingParams(max_tokens=max_new, temperature=0, ignore_eos=True))
            st = core.render(req)
            st.emit = (lambda i: lambda ev: events.setdefault(i, []).append(ev) if isinstance(ev, TokenEvent) else None)(i)
            core.add(st)
        _sync()
        t = time.perf_counter()
        while core.has_work():
            core.step()
        _sync()
        out[mode] = {"wall_s": time.perf_counter() - t, "steps": core.steps,
                     "tokens": [[e.token_id for e in events[i]] for i in range(len(prompts))],
                     "logprobs": [[e.logprob for e in events[i]] for i in range(len(prompts))],
                     "captures": sum(getattr(r.static, "captures", 0) for r in core.runners.values()
                                     if r.static is not None)}
    d, g = out["dynamic"], out["graphs"]
    same = sum(a == b for x, y in zip(d["tokens"], g["tokens"]) for a, b in zip(x, y))
    total = sum(len(x) for x in d["tokens"])
    # the first step of each request has identical inputs on both paths: compare its logprob
    first = max(abs(x[0] - y[0]) for x, y in zip(d["logprobs"], g["logprobs"]))
    return {"tokens_identical_fraction": same / total, "first_step_logprob_max_diff": first,
            "dynamic_ms_step": d["wall_s"] / d["steps"] * 1e3, "graphs_ms_step": g["wall_s"] / g["steps"] * 1e3,
            "speedup": d["wall_s"] / g["wall_s"], "graph_captures": g["captures"]}


@torch.inference_mode()
def verify_cost(model, vocab: int, context: int = 128, ks=(2, 4, 8), iters: int = 20) -> dict:
    """Speculative decoding's verification: the time of a forward over k + 1 new positions against a
    one-position decode step, batch 1, after a ``context``-token prefill (the cache cropped back each time)."""
    from transformers import DynamicCache

    g = torch.Generator().manual_seed(2)
    ids = torch.randint(4, vocab, (1, context + max(ks) + 1), generator=g).to(DEVICE)
    cache = DynamicCache()
    model(input_ids=ids[:, :context], past_key_values=cache, use_cache=True)
    out = {}
    for q in (1, *[k + 1 for k in ks]):
        times = []
        for i in range(iters + 3):
            _sync()
            t = time.perf_counter()
            model(input_ids=ids[:, context:context + q], past_key_values=cache, use_cache=True, logits_to_keep=q)
            _sync()
            if i >= 3:
                times.append(time.perf_counter() - t)
            cache.crop(context)
        out[q] = sorted(times)[len(times) // 2] * 1e3
    return {"decode_ms": out[1], **{f"verify_k{k}_ms": out[k + 1] for k in ks},
            **{f"ratio_k{k}": out[k + 1] / out[1] for k in ks}}


def adapter_mixture(base, tok, prompts, max_new: int, concs=(1, 16)) -> dict:
    """A base + 3 rank-16 LoRA adapters on every linear layer, unmerged (adapter lanes of the base's forward):
    the 4-policy mixture's tokens per second against the base alone (PEFT must be installed)."""
    try:
        import peft
    except ImportError as err:
        return {"skipped": f"peft is not installed ({err})"}
    from benchmarks.engine_bench import registry_from_models, run_engine
    from policymix.adapters import AdapterView, group_adapters

    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    model = peft.get_peft_model(base, peft.LoraConfig(r=16, target_modules=targets, init_lora_weights=False),
                                adapter_name="a0")
    for i in (1, 2):
        model.add_adapter(f"a{i}", peft.LoraConfig(r=16, target_modules=targets, init_lora_weights=False))
    model = group_adapters(model.to(device=DEVICE, dtype=DTYPE).eval())  # as the registry serves them
    names = ["base", "a0", "a1", "a2"]
    reg = registry_from_models({n: model for n in names}, tok, max_num_seqs=128, device=DEVICE, dtype=DTYPE,
                               decode="dynamic")
    for n in names:
        p = reg.policies[n]
        p.weights, p.adapter = model, (n if n != "base" else None)
        p.model = AdapterView(model, p.adapter)
    out = {}
    for c in concs:
        one = run_engine(reg, {"base": 1.0}, prompts[: max(c, 2)], max_new, c, sync=_sync)
        mix = run_engine(reg, {"base": 0.4, "a0": 0.3, "a1": 0.2, "a2": 0.1}, prompts[: max(c, 2)], max_new, c,
                         sync=_sync)
        if not (one.tokens and mix.tokens):
            raise RuntimeError(f"requests failed at c{c}: {one.tokens} and {mix.tokens} tokens generated")
        out[f"c{c}"] = {"base_tok_s": one.tok_s, "mixture_tok_s": mix.tok_s, "mixture_cost": one.tok_s / mix.tok_s}
    return out


def main() -> int:
    from benchmarks.engine_bench import mixing_overhead, registry_from_models, run_engine

    out_dir = Path(os.environ.get("OUT", "gpu_out"))
    out_dir.mkdir(parents=True, exist_ok=True)
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", "170"))
    t_start = time.perf_counter()
    sync = _sync
    results = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "runs": []}
    import transformers

    results["transformers"] = transformers.__version__
    bw = bandwidth_gbs()
    results["bandwidth_GBs"] = bw
    print(f"device {results['device']}  torch {torch.__version__}  transformers {transformers.__version__}  "
          f"copy bandwidth {bw:.0f} GB/s", flush=True)
    rows = []
    plan = (("qwen2-0.5b", 4, 64, (1, 16, 64)), ("qwen2-7b", 3, 32, (1, 16)))
    if DEVICE == "cpu":
        plan = (("tiny", 4, 8, (1, 4)),)
    for shape, n_pol, max_new, concs in plan:
        if time.perf_counter() - t_start > budget:
            print(f"skipping {shape}: time budget spent", flush=True)
            break
        models = build(shape, n_pol)
        tok = wordlevel_tokenizer(SHAPES[shape]["vocab_size"])
        if shape in ("qwen2-7b", "tiny"):
            vc = verify_cost(models["p0"], SHAPES[shape]["vocab_size"])
            results.setdefault("verify_cost", {})[shape] = vc
            print("verification forward vs decode step:", shape, json.dumps(vc), flush=True)
        g0 = torch.Generator().manual_seed(1)
        if shape != "qwen2-7b":
            try:
                cmp = graphs_vs_dynamic({"p0": models["p0"], "p1": models["p1"]}, tok,
                                        torch.randint(4, SHAPES[shape]["vocab_size"], (8, 64), generator=g0).tolist())
            except Exception as err:  # noqa: BLE001 - report and carry on with the dynamic path
                cmp = {"error": f"{type(err).__name__}: {err}"}
            results["graphs_vs_dynamic"] = cmp
            print("graphs vs dynamic:", json.dumps(cmp), flush=True)
        decode = "dynamic" if "error" in results.get("graphs_vs_dynamic", {}) else "auto"
        reg = registry_from_models(models, tok, max_num_seqs=128, device=DEVICE, dtype=DTYPE, decode=decode)
        results["decode"] = decode
        wb = weight_bytes(models["p0"])
        floor_ms = wb / (bw * 1e9) * 1e3
        g = torch.Generator().manual_seed(0)
        prompts = torch.randint(4, SHAPES[shape]["vocab_size"], (64, 128), generator=g).tolist()
        run_engine(reg, {"p0": 1.0}, prompts[:4], 4, 4, sync=sync)  # warm-up (kernels, allocator)
        for c in concs:
            if time.perf_counter() - t_start > budget:
                break
            ps = prompts[: max(c, 4)]
            one = run_engine(reg, {"p0": 1.0}, ps, max_new, c, sync=sync)
            for K in (3,) if shape == "qwen2-7b" else (2, 3):
                ov = mixing_overhead(reg, [f"p{i}" for i in range(K)], ps, max_new, c, sync=sync)
                rows.append({"shape": shape, "concurrency": c, "K": K, "single_tok_s": one.tok_s,
                             "mixture_tok_s": ov["mixture_tok_s"], "ratio_mix_over_sum": ov["ratio"],
                             "step_ms_single": one.wall_s / max(one.steps, 1) * 1e3,
                             "floor_ms_per_policy_step": floor_ms})
                results["runs"].append({"shape": shape, "single": one.to_dict(), "overhead": ov})
                print(json.dumps(rows[-1]), flush=True)
        if shape != "qwen2-7b" and time.perf_counter() - t_start < budget:
            three = [models["p0"], models["p1"], models["p2"]]
            for batch in (1, 16):
                tps = proxy_loop(three, prompts[:16] if batch == 16 else prompts[:2], max_new, batch)
                eng = run_engine(reg, {"p0": 1.0, "p1": 1.0, "p2": -1.0}, prompts[:16] if batch == 16 else prompts[:2],
                                 max_new, batch, sync=sync)
                rows.append({"shape": shape, "concurrency": batch, "K": 3, "proxy_loop_tok_s": tps,
                             "engine_proxy_tok_s": eng.tok_s, "ratio_engine_over_loop": eng.tok_s / tps})
                print(json.dumps(rows[-1]), flush=True)
        if shape in ("qwen2-0.5b", "tiny") and time.perf_counter() - t_start < budget:
            try:
                ad = adapter_mixture(build(shape, 1)["p0"], tok, prompts, max_new)  # a fresh, unpacked base
            except Exception as err:  # noqa: BLE001 - report and carry on
                ad = {"error": f"{type(err).__name__}: {err}"}
            results.setdefault("adapters", {})[shape] = ad
            print("base + 3 adapters (unmerged lanes) vs base alone:", shape, json.dumps(ad), flush=True)
        results["rows"] = rows
        (out_dir / "gpu_check.json").write_text(json.dumps(results, indent=1))
        del models, reg
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    print("\n| shape | conc | K | single tok/s | mixture tok/s | mix/sum | step ms (1 pol) | BW floor ms | "
          "proxy loop tok/s | engine proxy tok/s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda k, fmt="{:.1f}": fmt.format(r[k]) if k in r else ""  # noqa: E731
        print(f"| {r['shape']} | {r['concurrency']} | {r['K']} | {f('single_tok_s')} | {f('mixture_tok_s')} | "
              f"{f('ratio_mix_over_sum', '{:.2f}')} | {f('step_ms_single', '{:.2f}')} | "
              f"{f('floor_ms_per_policy_step', '{:.2f}')} | {f('proxy_loop_tok_s')} | {f('engine_proxy_tok_s')} |")
    print(f"total {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())

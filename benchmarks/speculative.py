"""Speculative decoding of mixtures and policy-parallel steps, against the same engine without them (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.speculative --threads 1 --out benchmarks/results/speculative_cpu

Sections (``--sections``), each contender measured side by side in every repeat, medians reported:

- ``anchors``: the benchmark model set (three random Llama policies, hidden 256, 4 layers, vocab 32k),
  proxy tuning ``base + (tuned - untuned)``, greedy, one request at a time: the re-implemented batch-1
  proxy-tuning loop against the engine plain, with policy-parallel forwards, and with prompt lookup on top.
- ``copy``: the embedded SmolLM2-135M-Instruct, the 2-policy mixture ``concise-formal``, requests that
  repeat or continue a given passage, one at a time: prompt lookup (``ngram``) against no speculation.
- ``drafter``: the same mixture on ordinary questions with the policy ``smollm2`` as drafter, at
  concurrency 1 and 4: acceptance rate and speedup.
- ``proxy``: a large base steered by two small experts at a 10:1 compute ratio (``_proxy_models``), the
  mixture with the small tuned expert drafting, against the large model alone without speculation.
  No real 10:1 pair loads offline here, so the family is built to relate as real ones do: the small
  untuned expert is a random Llama (hidden 256, 2 layers, vocab 8000), the tuned one is it with perturbed
  weights (a fine-tune), and the large base is it grown to 36 layers (the 34 new layers random, their
  residual writes scaled by 0.02), so that the large base agrees with the small base often but not
  always, like Llama-2-70B and Llama-2-7B. The acceptance rate this gives is reported beside the ratio.
- ``crossover``: prompt lookup on the copy requests at 1, 2, 4, 8 and 16 in flight: where drafting stops
  paying (the default ``max_concurrency``).
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import shlex
import statistics
import sys
import time

import torch

from benchmarks.anchors import run_proxy_tuning
from benchmarks.anchors.common import torch_threads
from benchmarks.engine_bench import registry_from_models
from benchmarks.models import PROMPTS, bench_models, load_policies, load_tokenizer
from benchmarks.report import RESULTS_DIR, machine_info, markdown_table, write_report
from benchmarks.roofline import PolicyShape, cached_positions, decode_floor, fractions, load_rooflines
from policymix.engine.core import EngineCore
from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams, SpeculativeSpec
from policymix.mixing.recipes import compile_recipe

_ids = itertools.count()

PASSAGE = ("The lighthouse stood on a narrow spit of rock at the edge of the bay. Every evening the keeper climbed "
           "the one hundred and twelve steps to the lamp room, trimmed the wick, polished the great lens and "
           "wrote the time, the weather and the ships he had seen in a leather logbook that his grandfather had "
           "begun sixty years before.")
COPY = [f"Repeat the following passage exactly, word for word:\n\n{PASSAGE}",
        f"Rewrite the following passage in the same words, correcting nothing:\n\n{PASSAGE}",
        f"Here is a passage:\n\n{PASSAGE}\n\nCopy it out again below.",
        f"Continue this text by repeating it once more from the start:\n\n{PASSAGE}"]
QUESTIONS = ["What is the capital of France?", "Give me three tips for sleeping better.",
             "Explain what a lighthouse does.", "Why is the sky blue?"]


def serve(core: EngineCore, model: str, mixture, prompts: list[Prompt], tokens: int, concurrency: int,
          speculative: SpeculativeSpec | None) -> dict:
    """Serve ``prompts`` greedily with ``concurrency`` requests in flight; seconds, tokens, drafted, accepted."""
    reg = core.registry
    recipe = compile_recipe(mixture, model, reg.infos(), reg.config.mixtures)
    pending, done = list(enumerate(prompts)), {}

    def submit(i, prompt):
        req = GenerationRequest(f"s{next(_ids)}", model, recipe, prompt,
                                SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True),
                                speculative=speculative)
        state = core.render(req)
        state.emit = lambda ev: done.__setitem__(i, ev) if isinstance(ev, RequestDone) else None
        core.add(state)

    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        submit(*pending.pop(0))
    while core.has_work():
        before = len(done)
        core.step()
        for _ in range(len(done) - before):
            if pending:
                submit(*pending.pop(0))
    wall = time.perf_counter() - start
    done = [done[i] for i in sorted(done)]  # in prompt order (they finish in any order)
    assert len(done) == len(prompts) and all(d.error is None for d in done), [d.error for d in done]
    seqs = [d.sequences[0] for d in done]
    drafted = sum((s.speculative or {}).get("drafted", 0) for s in seqs)
    accepted = sum((s.speculative or {}).get("accepted", 0) for s in seqs)
    names = [n for n, w in recipe.weights.items() if w != 0]
    served = [recipe.variants[n].policy if n in recipe.variants else n for n in names]  # a variant runs its policy
    runners = [reg.runner_key(n) for n in served]  # policies sharing weights are lanes of one forward
    shapes = [PolicyShape.of(reg.policies[n].model) for n in served]
    shapes = [sh if runners.index(r) == i else sh.lane() for i, (sh, r) in enumerate(zip(shapes, runners))]
    cores = 1 if core.parallel is None else min(os.cpu_count() or 1, len(set(runners)))
    floor = plain_floor(shapes, [d.prompt_tokens for d in done], [d.completion_tokens for d in done], concurrency,
                        cores)
    return {"s": wall, "tokens": sum(d.completion_tokens for d in done), "drafted": drafted, "accepted": accepted,
            "out": [s.token_ids for s in seqs], "floor": floor}


def plain_floor(shapes, prompt_lens: list[int], new: list[int], concurrency: int, cores: int) -> dict:
    """What plain decoding of these tokens must read: one step per token for each group of ``concurrency``
    requests (equal lengths). Speculation verifies several tokens per step, so it can beat this floor."""
    steps = math.ceil(len(new) / concurrency) * max(new)
    return {"shapes": shapes, "steps": steps, "rows": sum(new), "positions": cached_positions(prompt_lens, new),
            "cores": cores}


def _same(got: dict, plain: dict) -> float:
    """The fraction of requests whose greedy tokens equal the plain engine's (1.0 expected: lossless; a
    verification forward over k + 1 positions rounds differently from a one-token step, so an exact tie of
    the top two scores could break the other way)."""
    return sum(a == b for a, b in zip(got["out"], plain["out"])) / len(plain["out"])


def _core(reg, parallel: bool, max_concurrency: int = 64) -> EngineCore:
    core = EngineCore(reg)
    if not parallel and core.parallel is not None:
        core.parallel.shutdown()
        core.parallel = None
    core.speculator.max_concurrency = max_concurrency
    return core


def _median_rows(per: list[dict], label: str, rooflines: dict) -> dict:
    s = statistics.median(r["s"] for r in per)
    row = {"contender": label, "tok_s": per[0]["tokens"] / s, "s": s}
    f = per[0]["floor"]
    floor = decode_floor(f["shapes"], f["steps"], f["rows"], f["positions"],
                         rooflines.get(f["cores"]) or rooflines[max(rooflines)])
    row.update({**fractions(floor, s), "cores": f["cores"]})
    if per[0]["drafted"]:
        row["acceptance"] = per[0]["accepted"] / per[0]["drafted"]
    if "same" in per[0]:
        row["same_tokens"] = min(r["same"] for r in per)
    return row


def _compare(runs: dict[str, list[dict]], ref: str, args) -> list[dict]:
    """Rows with each contender's median tok/s, its ratio to ``ref`` (medians of per-repeat ratios) and its
    fractions of the plain-decode roofline."""
    rows = []
    for label, per in runs.items():
        row = _median_rows(per, label, args.rooflines)
        row["ratio"] = statistics.median(r["s"] / p["s"] * p["tokens"] / r["tokens"]
                                         for r, p in zip(runs[ref], per))
        rows.append(row)
    return rows


def section_anchors(args) -> list[dict]:
    bm = bench_models(args.quick)
    tok = load_tokenizer(bm.tokenizer_dir)
    models = load_policies(bm.paths)
    reg = registry_from_models(models, tok, max_num_seqs=64)
    prompts = [Prompt(token_ids=tok(p).input_ids) for p in PROMPTS[: args.prompts]]
    mix = {"weights": {"base": 1.0, "tuned": 1.0, "untuned": -1.0}}
    runs: dict[str, list[dict]] = {k: [] for k in ("proxy-tuning loop, batch 1", "engine", "engine, policy-parallel",
                                                   "engine, policy-parallel + ngram k=4")}
    serve(_core(reg, True), "base", mix, prompts[:1], 4, 1, SpeculativeSpec("ngram", 4))  # warm-up
    for _ in range(args.repeats):
        loop = run_proxy_tuning(models, tok, PROMPTS[: args.prompts], args.anchor_tokens, batch_size=1,
                                threads=args.threads)
        n = args.anchor_tokens
        runs["proxy-tuning loop, batch 1"].append({"s": loop.wall_s, "tokens": loop.tokens, "drafted": 0, "accepted": 0,
                                                   "floor": plain_floor([PolicyShape.of(models[r]) for r in
                                                                         ("base", "tuned", "untuned")],
                                                                        [len(p.token_ids) for p in prompts],
                                                                        [n] * len(prompts), 1, 1)})
        plain = serve(_core(reg, False), "base", mix, prompts, args.anchor_tokens, 1, None)
        runs["engine"].append(plain)
        runs["engine, policy-parallel"].append(serve(_core(reg, True), "base", mix, prompts, args.anchor_tokens, 1,
                                                     None))
        spec = serve(_core(reg, True), "base", mix, prompts, args.anchor_tokens, 1, SpeculativeSpec("ngram", 4))
        spec["same"] = _same(spec, plain)
        runs["engine, policy-parallel + ngram k=4"].append(spec)
    return [{"section": "anchors", **r} for r in _compare(runs, "proxy-tuning loop, batch 1", args)]


def _embedded():
    from policymix.embedded import default_config
    from policymix.registry import load_registry

    return load_registry(default_config(policies_dir=None))


def _chat(texts: list[str]) -> list[Prompt]:
    return [Prompt(messages=[{"role": "user", "content": t}]) for t in texts]


def section_copy(args, reg) -> list[dict]:
    runs: dict[str, list[dict]] = {"no speculation": [], "ngram k=4": [], "ngram k=8": []}
    prompts = _chat(COPY)
    serve(_core(reg, True), "concise-formal", None, prompts[:1], 4, 1, SpeculativeSpec("ngram", 4))
    for _ in range(args.repeats):
        plain = serve(_core(reg, True), "concise-formal", None, prompts, args.tokens, 1, None)
        runs["no speculation"].append(plain)
        for k in (4, 8):
            got = serve(_core(reg, True), "concise-formal", None, prompts, args.tokens, 1, SpeculativeSpec("ngram", k))
            got["same"] = _same(got, plain)
            runs[f"ngram k={k}"].append(got)
    return [{"section": "copy, concurrency 1", **r} for r in _compare(runs, "no speculation", args)]


def section_drafter(args, reg) -> list[dict]:
    rows = []
    prompts = _chat(QUESTIONS)
    for c in (1, 4):
        runs: dict[str, list[dict]] = {"no speculation": [], "draft smollm2 k=2": [], "draft smollm2 k=4": []}
        for _ in range(args.repeats):
            plain = serve(_core(reg, True), "concise-formal", None, prompts, args.tokens, c, None)
            runs["no speculation"].append(plain)
            for k in (2, 4):
                got = serve(_core(reg, True), "concise-formal", None, prompts, args.tokens, c,
                            SpeculativeSpec("smollm2", k))
                got["same"] = _same(got, plain)
                runs[f"draft smollm2 k={k}"].append(got)
        rows += [{"section": f"drafter, concurrency {c}", **r} for r in _compare(runs, "no speculation", args)]
    return rows


def section_crossover(args, reg) -> list[dict]:
    rows = []
    prompts = _chat(COPY * 4)
    for c in (1, 2, 4, 8, 16):
        runs: dict[str, list[dict]] = {"no speculation": [], "ngram k=4": []}
        for _ in range(args.repeats):
            runs["no speculation"].append(serve(_core(reg, True), "concise-formal", None, prompts[:max(c, 4)],
                                                args.tokens // 2, c, None))
            runs["ngram k=4"].append(serve(_core(reg, True), "concise-formal", None, prompts[:max(c, 4)],
                                           args.tokens // 2, c, SpeculativeSpec("ngram", 4)))
        rows += [{"section": f"crossover, concurrency {c}", **r} for r in _compare(runs, "no speculation", args)]
    return rows


def _proxy_models(root) -> tuple[dict, object]:
    """(name -> model, tokenizer): ``large`` (36 layers), ``tuned`` and ``untuned`` (2 layers), module docstring."""
    from pathlib import Path

    from transformers import LlamaConfig, LlamaForCausalLM

    from benchmarks.models import build_bench_tokenizer

    tok_dir = Path(root) / "tokenizer-8k"
    if not (tok_dir / "tokenizer.json").exists():
        build_bench_tokenizer(tok_dir, vocab_size=8000)
    tok = load_tokenizer(tok_dir)

    def config(layers):
        return LlamaConfig(vocab_size=8000, hidden_size=256, intermediate_size=1024, num_hidden_layers=layers,
                           num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=2048,
                           bos_token_id=0, eos_token_id=1, pad_token_id=2, tie_word_embeddings=False)

    torch.manual_seed(0)
    untuned = LlamaForCausalLM(config(2)).eval()
    tuned = LlamaForCausalLM(config(2)).eval()
    tuned.load_state_dict(untuned.state_dict())
    large = LlamaForCausalLM(config(36)).eval()
    with torch.no_grad():
        for p in tuned.parameters():  # a fine-tune: the same model, a little moved
            p.add_(torch.randn_like(p) * 0.1 * p.std().clamp_min(1e-3))
        state = large.state_dict()
        for name, value in untuned.state_dict().items():
            state[name] = value.clone()  # embeddings, lm_head, final norm, layers 0-1
        for i in range(2, 36):
            for part in ("self_attn.o_proj", "mlp.down_proj"):
                state[f"model.layers.{i}.{part}.weight"] *= 0.02
        large.load_state_dict(state)
    return {"large": large, "tuned": tuned, "untuned": untuned}, tok


def section_proxy(args) -> list[dict]:
    from benchmarks.models import DEFAULT_CACHE_DIR

    models, tok = _proxy_models(DEFAULT_CACHE_DIR.parent / "bench-proxy")
    reg = registry_from_models(models, tok, max_num_seqs=64)
    macs = {n: sum(p.numel() for k, p in m.named_parameters() if "embed_tokens" not in k) for n, m in models.items()}
    prompts = [Prompt(token_ids=tok(p).input_ids) for p in PROMPTS[: args.prompts]]
    mix = {"weights": {"large": 1.0, "tuned": 1.0, "untuned": -1.0}}
    runs: dict[str, list[dict]] = {"large alone": [], "mixture": [], "mixture, draft tuned k=4": []}
    serve(_core(reg, True), "large", mix, prompts[:1], 4, 1, SpeculativeSpec("tuned", 4))  # warm-up
    for _ in range(args.repeats):
        n = args.anchor_tokens
        runs["large alone"].append(serve(_core(reg, True), "large", None, prompts, n, 1, None))
        plain = serve(_core(reg, True), "large", mix, prompts, n, 1, None)
        runs["mixture"].append(plain)
        got = serve(_core(reg, True), "large", mix, prompts, n, 1, SpeculativeSpec("tuned", 4))
        got["same"] = _same(got, plain)
        runs["mixture, draft tuned k=4"].append(got)
    ratio = macs["large"] / macs["tuned"]
    return [{"section": f"proxy, {ratio:.1f}:1, concurrency 1", **r} for r in _compare(runs, "large alone", args)]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--anchor-tokens", type=int, default=128, help="new tokens in the anchors and proxy sections")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--sections", default="anchors,proxy,copy,drafter,crossover")
    ap.add_argument("--roofline", default=str(RESULTS_DIR / "roofline_cpu.json"),
                    help="roofline.py's JSON (measured here, briefly, when missing)")
    ap.add_argument("--quick", action="store_true",
                    help="CI smoke: the anchors section on tiny models, 2 prompts x 4 tokens, 1 repeat")
    ap.add_argument("--out", default="benchmarks/results/speculative_cpu")
    args = ap.parse_args(argv)
    if args.quick:
        args.sections, args.prompts, args.anchor_tokens, args.tokens, args.repeats = "anchors", 2, 4, 4, 1
    args.rooflines = load_rooflines(args.roofline, args.quick)
    torch.set_num_threads(args.threads)
    sections = args.sections.split(",")
    rows: list[dict] = []
    with torch_threads(args.threads):
        if "anchors" in sections:
            rows += section_anchors(args)
        if "proxy" in sections:
            rows += section_proxy(args)
        if {"copy", "drafter", "crossover"} & set(sections):
            reg = _embedded()
            if "copy" in sections:
                rows += section_copy(args, reg)
            if "drafter" in sections:
                rows += section_drafter(args, reg)
            if "crossover" in sections:
                rows += section_crossover(args, reg)
    meta = {**machine_info(), "threads": args.threads,
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.speculative " + shlex.join(sys.argv[1:] if argv is None
                                                                                          else argv)}
    table = markdown_table(rows, [("section", "section"), ("contender", "contender"), ("tok_s", "tok/s"),
                                  ("ratio", "ratio to the first of its section"), ("acceptance", "acceptance"),
                                  ("same_tokens", "requests with the plain engine's tokens"), ("cores", "cores"),
                                  ("bandwidth_fraction", "plain-decode bandwidth fraction"),
                                  ("roofline_fraction", "plain-decode roofline fraction")])
    notes = (f"Greedy, ignore_eos, {args.anchor_tokens} new tokens in the anchors and proxy sections (random models), "
             f"{args.tokens} with SmolLM2 ({args.tokens // 2} in the crossover), medians of "
             f"{args.repeats} repeats, contenders side by side in each repeat; the ratio is the median of the per-repeat "
             "ratios of tok/s. Lossless: the speculative contenders' greedy tokens are compared with their section's "
             "plain engine's (the fraction of requests with identical tokens is reported). "
             "Acceptance = accepted / drafted tokens. Roofline: the floor of plain decoding of the same tokens (every "
             "weight of the mixture's policies and every cached key read once per token step; `roofline.py`) over the "
             "measured time, at the row's cores; a speculative row can exceed 1 (several tokens per step).")
    md, _ = write_report(args.out, "Speculative decoding of mixtures and policy-parallel steps (CPU)", meta, table,
                         {"rows": rows}, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

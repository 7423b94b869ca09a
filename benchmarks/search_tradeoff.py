"""Reward against compute: best-of-n, early-pruned best-of-16 and chunk-level beam search (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.search_tradeoff --threads 1 --out docs/lab/search-tradeoff

On the embedded default (SmolLM2-135M-Instruct), the reward is the implicit reward of a tuned/untuned
pair, ``beta * sum_t log(pi_tuned / pi_untuned)`` (weak-to-strong search's chunk score). By default the
pair is the prompted ``concise`` style against ``smollm2``; with the DPO demo policies
(``make demo-policies``) pass ``--tuned dpo-concise``. Each method samples from ``smollm2`` (temperature
1, ``--tokens`` new tokens) for every prompt and seed; reported per method: the mean reward of the
returned text and the mean number of generated tokens (every candidate's, pruned ones and beam
branches included). Writes ``OUT.csv``, ``OUT.png``, and ``OUT.md`` / ``OUT.json`` (with the command).
"""

from __future__ import annotations

import argparse
import csv
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.report import machine_info, markdown_table, write_report
from policymix.engine.core import EngineCore
from policymix.engine.protocol import (GenerationRequest, ImplicitRewardSpec, Prompt, RequestDone, RerankSpec,
                                       SamplingParams, SearchSpec)
from policymix.mixing.recipes import compile_recipe

PROMPTS = ["Explain why the sky is blue.", "Give me advice for a job interview.", "What is a good way to learn math?",
           "Describe your ideal weekend.", "How do I keep a plant alive?", "Why do people like music?",
           "What should I cook tonight?", "Tell me about the ocean."]


def methods(max_best_of: int) -> list[tuple[str, dict]]:
    out = [(f"best-of-{n}", {"best_of": n}) for n in (1, 2, 4, 8, 16) if n <= max_best_of]
    out.append(("pruned best-of-16 (every 8, keep 0.5)", {"best_of": 16, "prune": (8, 0.5)}))
    out.append(("pruned best-of-16 (every 4, keep 0.25)", {"best_of": 16, "prune": (4, 0.25)}))
    out.append(("beam search (2 x 4, chunks of 8)", {"search": (2, 4, 8)}))
    return out


def run(core: EngineCore, model: str, pair: ImplicitRewardSpec, kw: dict, tokens: int, seeds: list[int]) -> list[dict]:
    reg = core.registry
    recipe = compile_recipe(None, model, reg.infos(), reg.config.mixtures)
    prune = kw.get("prune")
    rerank = RerankSpec("implicit", implicit=pair, prune_every=prune[0] if prune else None,
                        prune_keep=prune[1] if prune else None)
    search = SearchSpec(*kw["search"]) if "search" in kw else None
    best_of = search.beam_width * search.expand if search else kw["best_of"]
    done: dict[str, RequestDone] = {}
    for i, text in enumerate(PROMPTS):
        for seed in seeds:
            rid = f"{i}-{seed}"
            req = GenerationRequest(rid, model, recipe, Prompt(messages=[{"role": "user", "content": text}]),
                                    SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True,
                                                   best_of=best_of if best_of > 1 else None),
                                    rerank=rerank, return_policy_logprobs=True, search=search)
            state = core.render(req)
            state.emit = lambda ev, rid=rid: done.__setitem__(rid, ev) if isinstance(ev, RequestDone) else None
            core.add(state)
    while core.has_work():
        core.step()
    rows = []
    for rid, d in done.items():
        assert d.error is None, d.error
        ids = d.sequences[0].token_ids
        reward = next((c.score for c in d.candidates or [] if c.token_ids == ids and c.finish_reason != "pruned"),
                      None)
        rows.append({"id": rid, "reward": reward, "generated": d.generated_tokens or d.completion_tokens})
    return rows


def implicit_of(core: EngineCore, pair: ImplicitRewardSpec, rows: list[dict], model: str, tokens: int,
                seeds: list[int]) -> None:
    """best-of-1 has no candidates: its reward is the returned text's implicit reward, scored here."""
    reg = core.registry
    for row in rows:
        if row["reward"] is not None:
            continue
        i, seed = (int(x) for x in row["id"].split("-"))
        recipe = compile_recipe(None, model, reg.infos(), reg.config.mixtures)
        req = GenerationRequest("s" + row["id"], model, recipe,
                                Prompt(messages=[{"role": "user", "content": PROMPTS[i]}]),
                                SamplingParams(max_tokens=tokens, temperature=1.0, seed=seed, ignore_eos=True),
                                return_token_signals=True, signals=pair)
        box = {}
        state = core.render(req)
        state.emit = lambda ev, box=box: box.setdefault("d", ev) if isinstance(ev, RequestDone) else None
        core.add(state)
        while "d" not in box:
            core.step()
        row["reward"] = box["d"].sequences[0].implicit_reward


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--tuned", default="concise")
    ap.add_argument("--untuned", default="smollm2")
    ap.add_argument("--beta", type=float, default=1.0)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--out", default="docs/lab/search-tradeoff")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from policymix.embedded import default_config
    from policymix.registry import load_registry

    cfg = default_config()
    cfg.server.max_num_seqs = 64
    core = EngineCore(load_registry(cfg))
    pair = ImplicitRewardSpec(args.tuned, args.untuned, args.beta)
    seeds = list(range(args.seeds))
    table = []
    start = time.perf_counter()
    for name, kw in methods(cfg.server.max_best_of):
        rows = run(core, args.model, pair, kw, args.tokens, seeds)
        implicit_of(core, pair, rows, args.model, args.tokens, seeds)
        table.append({"method": name, "mean_reward": statistics.mean(r["reward"] for r in rows),
                      "mean_generated_tokens": statistics.mean(r["generated"] for r in rows), "n": len(rows)})
        print(table[-1], flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.with_suffix(".csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    bon = [r for r in table if r["method"].startswith("best-of")]
    ax.plot([r["mean_generated_tokens"] for r in bon], [r["mean_reward"] for r in bon], "o-", label="best-of-n")
    for r in table:
        if not r["method"].startswith("best-of"):
            ax.plot(r["mean_generated_tokens"], r["mean_reward"], "s", label=r["method"])
    for r in bon:
        ax.annotate(r["method"].split("-")[-1], (r["mean_generated_tokens"], r["mean_reward"]),
                    textcoords="offset points", xytext=(4, -10))
    ax.set_xlabel("generated tokens per request (all candidates)")
    ax.set_ylabel(f"mean implicit reward ({args.tuned} vs {args.untuned}, beta {args.beta})")
    ax.set_xscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Reward against compute on SmolLM2-135M-Instruct")
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    meta = {**machine_info(), "threads": args.threads, "wall_s": round(time.perf_counter() - start, 1),
            "command": "OMP_NUM_THREADS=1 python -m benchmarks.search_tradeoff " + shlex.join(
                sys.argv[1:] if argv is None else argv)}
    md, _ = write_report(out, "Reward against compute (search trade-off)", meta, markdown_table(
        table, [("method", "method"), ("mean_reward", "mean reward"), ("mean_generated_tokens", "generated tokens"),
                ("n", "requests")]), {"rows": table})
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

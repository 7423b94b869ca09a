"""docs/lab/arm.md in one command: an ARM and a DPO policy on the concise set, and the ARM guiding the base.

``python -m policymix.lab.arm_report`` (or ``make arm-report``):

1. splits ``data/prefs/concise.jsonl`` into training pairs and held-out pairs (every ``--hold-every``-th);
2. trains, on the training pairs only, a DPO policy (``policymix train dpo``) and autoregressive reward
   models (``policymix train arm``) at each ``--arm-betas`` (beta_r), all LoRA on the embedded
   SmolLM2-135M-Instruct with the same steps; a folder that already holds a run with the same settings
   is reused (its training time is the one its ``policymix.json`` recorded);
3. measures held-out pair accuracy and mean margin: each ARM's (``sum_t log pi_r(y_w) - sum_t log
   pi_r(y_l)``), the untrained base's read the same way, and the DPO policy's implicit reward's;
4. serves base, DPO and the ARMs in one registry and generates greedily on held-out prompts (the lab's
   16 ``EVAL_PROMPTS``, then prompts of held-out pairs) with the base alone, the DPO policy alone, and
   ``mixture.arm`` with the first ARM at each ``--betas`` (the other ARMs at the smallest): mean response
   length and the implicit reward of the DPO pair ``beta * (log pi_dpo - log pi_base)`` summed over the
   response;
5. writes ``arm.md``, ``arm.json`` and ``arm.png`` (and the ARM run's entanglement plot) to ``--out-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from .pairs import load_pairs, write_pairs
from .synth import EVAL_PROMPTS, words


def split(records: list[dict], hold_every: int) -> tuple[list[dict], list[dict]]:
    """(training pairs, held-out pairs): every ``hold_every``-th pair is held out."""
    train = [r for i, r in enumerate(records) if i % hold_every != hold_every - 1]
    held = [r for i, r in enumerate(records) if i % hold_every == hold_every - 1]
    return train, held


def held_out_prompts(held: list[dict], n: int) -> list[str]:
    """``n`` prompts no training pair has: the lab's EVAL_PROMPTS first, then the held-out pairs' prompts."""
    prompts = list(EVAL_PROMPTS)
    for r in held:
        if r["prompt"] not in prompts:
            prompts.append(r["prompt"])
    if len(prompts) < n:
        raise ValueError(f"only {len(prompts)} held-out prompts, {n} asked for")
    return prompts[:n]


def pair_accuracy(base: Path | str, arms: dict[str, Path], dpo_folder: Path, pairs_file: Path,
                  dpo_beta: float) -> dict[str, dict]:
    """Held-out accuracy and mean margin per scorer: each ARM's and the base's summed log-probs, and the DPO
    policy's implicit reward ``beta * log pi_dpo / pi_base``.

    The pairs go through the trainer's own tokenization (TRL's, chat template), so the sequences scored
    are exactly those a training step would see.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from . import arm
    from .dpo import build_trainer
    from .entanglement import sequence_logps

    args = arm.build_parser().parse_args(["--base", str(base), "--pairs", str(pairs_file),
                                          "--out", str(pairs_file.parent / "scoring"), "--diag-every", "0"])
    trainer = build_trainer(args, load_pairs(pairs_file), kind="arm").trainer
    batch = trainer.data_collator(list(trainer.train_dataset))
    seqs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = batch["input_ids"].shape[0] // 2

    def logps(adapter: Path | None) -> torch.Tensor:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
        if adapter is not None:
            model = PeftModel.from_pretrained(model, adapter)
        return sequence_logps(model.eval(), *seqs)  # [2n]: chosen rows, then rejected rows

    def summary(score: torch.Tensor) -> dict:
        margin = score[:n] - score[n:]
        return {"accuracy": round(float((margin > 0).float().mean()), 4), "mean_margin": round(float(margin.mean()), 3)}

    base_lp = logps(None)
    out = {"base": summary(base_lp)}
    for name, folder in arms.items():
        out[name] = summary(logps(folder))
    out["dpo_implicit"] = summary(dpo_beta * (logps(dpo_folder) - base_lp))
    out["pairs"] = n
    return out


def generate(base: Path | str, dpo_folder: Path, arms: dict[str, Path], prompts: list[str], recipes: dict[str, dict],
             max_tokens: int, dpo_beta: float) -> dict[str, dict]:
    """Per recipe: mean words, mean tokens, mean implicit reward of the DPO pair, and the answers (greedy)."""
    from ..config import parse_config
    from ..registry import load_registry
    from ..sweep import parse_scorer, run_sweep

    cfg = parse_config({"policies": {
        "base": {"path": str(base)},
        "dpo": {"path": str(base), "adapter": str(dpo_folder), "reference": "base"},
        **{name: {"path": str(base), "adapter": str(folder)} for name, folder in arms.items()},
    }})
    registry = load_registry(cfg)
    scorer = parse_scorer(f"implicit:dpo,base,{dpo_beta}")
    out = {}
    for name, recipe in recipes.items():
        started = time.perf_counter()
        rows = run_sweep(registry, recipe, [0.0], prompts, scorer, "base", max_tokens, 0.0, 0, chat=True)
        out[name] = {
            "mixture": recipe, "weights": json.loads(rows[0]["weights"]),
            "mean_words": round(sum(words(r["text"]) for r in rows) / len(rows), 2),
            "mean_tokens": round(sum(r["length"] for r in rows) / len(rows), 2),
            "mean_implicit_reward": round(sum(r["reward"] for r in rows) / len(rows), 3),
            "seconds": round(time.perf_counter() - started, 1),
            "answers": [r["text"] for r in rows],
        }
        print(f"{name}: {out[name]['mean_words']} words, implicit reward {out[name]['mean_implicit_reward']}, "
              f"{out[name]['seconds']} s", flush=True)
    return out


def plot(results: dict[str, dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        color = "tab:blue" if name.startswith("arm") else "tab:orange" if name.startswith("DPO") else "tab:gray"
        ax.scatter(r["mean_words"], r["mean_implicit_reward"], s=60, color=color)
        ax.annotate(name, (r["mean_words"], r["mean_implicit_reward"]), textcoords="offset points", xytext=(6, 4),
                    fontsize=9)
    ax.set(xlabel="mean response length (words)", ylabel="implicit reward of the DPO pair (beta log pi_dpo/pi_base)",
           title=title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    plt.close(fig)


def _plot_title(report: dict) -> str:
    return f"concise: base, DPO and ARM guidance ({report['settings']['prompts']} held-out prompts, greedy)"


def _table(results: dict[str, dict]) -> str:
    lines = ["| decoding | weights | mean words | mean tokens | implicit reward of the DPO pair |",
             "|---|---|---|---|---|"]
    for name, r in results.items():
        w = ", ".join(f"{k}: {v:g}" for k, v in r["weights"].items())
        lines.append(f"| {name} | {w} | {r['mean_words']} | {r['mean_tokens']} | {r['mean_implicit_reward']} |")
    return "\n".join(lines)


def _accuracy_table(acc: dict, s: dict) -> str:
    lines = ["| scorer | accuracy | mean margin |", "|---|---|---|"]
    lines.append(f"| the untrained base read as an ARM: `sum_t log pi_base(y_w) - sum_t log pi_base(y_l)` "
                 f"| {acc['base']['accuracy']:.1%} | {acc['base']['mean_margin']} nats |")
    for name, br in s["arm_policies"].items():
        lines.append(f"| ARM `{name}` (beta_r {br:g}): `sum_t log pi_arm(y_w) - sum_t log pi_arm(y_l)` "
                     f"| {acc[name]['accuracy']:.1%} | {acc[name]['mean_margin']} nats |")
    lines.append(f"| DPO's implicit reward `{s['dpo_beta']} * log pi_dpo/pi_base`, margin | "
                 f"{acc['dpo_implicit']['accuracy']:.1%} | {acc['dpo_implicit']['mean_margin']} |")
    return "\n".join(lines)


def _time_table(t: dict, s: dict, decodings: int) -> str:
    lines = ["| phase | wall time |", "|---|---|"]
    for name, tr in t["train"].items():
        note = " (reused: trained by an earlier run with the same settings; its time)" if tr["reused"] else ""
        lines.append(f"| training `{name}` ({s['steps']} steps){note} | {tr['seconds']} s |")
    lines += [f"| held-out pair scoring | {t['accuracy']} s |",
              f"| generation ({decodings} decodings x {s['prompts']} prompts) | {t['generate']} s |",
              f"| **this run** | **{t['total']} s ({t['total'] / 60:.1f} min)** |",
              f"| all of it, reused training included | {t['all']} s ({t['all'] / 60:.1f} min) |"]
    return "\n".join(lines)


def write_markdown(path: Path, report: dict) -> None:
    s, acc, t = report["settings"], report["accuracy"], report["timings"]
    first = {name: r["answers"][0] for name, r in report["results"].items()}
    examples = "\n".join(f"- {name}: {json.dumps(text, ensure_ascii=False)}" for name, text in first.items())
    guide = next(iter(s["arm_policies"]))
    base = "the embedded SmolLM2-135M-Instruct" if s["base"] == "embedded" else f"`{s['base']}`"
    text = f"""# An autoregressive reward model guiding SmolLM2 (GenARM), against DPO

Produced by `{s['command']}` (`policymix.lab.arm_report`, `make arm-report`; every number below is
from that run, and [lab.md](../lab.md#autoregressive-reward-models-genarm) discusses them).
ARMs are LoRA adapters of {base} trained with
`policymix train arm` (the reference-free Bradley-Terry loss over summed token log-probabilities,
`-log sigmoid(beta_r * (r(y_w) - r(y_l)))`); the DPO policy is trained with `policymix train dpo` on the
same pairs with the same steps. Guidance is the `mixture.arm` recipe, `pi_base * pi_arm^(1/beta)`, i.e.
the weights `{{base: 1, arm: 1/beta}}`, here with `{guide}`.

## Setup

- Pairs: `data/prefs/concise.jsonl` ({s['pairs']} pairs), every {s['hold_every']}th held out:
  {s['train_pairs']} for training, {s['held_pairs']} held out.
- Training (each): {s['steps']} steps x {s['batch_size']} pairs, LoRA r 8 all-linear, AdamW lr {s['lr']},
  linear decay. DPO: beta {s['dpo_beta']}. ARMs: beta_r {", ".join(f"{b:g}" for b in s["arm_policies"].values())}; the
  ARM runs log their diagnostics every {s['diag_every']} steps (the DPO run none, to save time).
- Generation: {s['prompts']} held-out prompts (the lab's 16 `EVAL_PROMPTS`, then prompts of held-out
  pairs), chat template, greedy, {s['max_tokens']} new tokens at most, through the native engine.
- Implicit reward of the DPO pair: `{s['dpo_beta']} * (log pi_dpo(y|x) - log pi_base(y|x))` summed over
  the response (the engine's token signals), for every decoding.
- CPU: {s['threads']} torch thread(s) on a {s['cpus']}-core machine shared with other jobs (load average
  {t['load_before']} before, {t['load_after']} after). The run is sized for that machine: fewer steps than
  the lab's demo policies (20 steps at lr 3e-4), with a larger learning rate for about the same total
  step under linear decay. Larger runs: `make arm-report ARM_REPORT_ARGS="--steps 20 --lr 3e-4"`.

## Held-out pairs ({acc['pairs']} pairs)

{_accuracy_table(acc, s)}

## Length and the DPO pair's implicit reward on {s['prompts']} held-out prompts

{_table(report['results'])}

![length and implicit reward](arm.png)

First prompt ({json.dumps(report['prompts'][0])}):

{examples}

The training diagnostics of `{guide}` (gradient entanglement against a zero reference, as `train dpo`
measures them): ![ARM entanglement](entanglement-concise-arm.png)

## Time

{_time_table(t, s, len(report['results']))}

Raw numbers and every answer: [arm.json](arm.json).
"""
    path.write_text(text, encoding="utf-8")


def _reusable(folder: Path, kind: str, beta: float, args: argparse.Namespace, pairs: Path) -> dict | None:
    """The ``policymix.json`` of a finished run in ``folder`` with exactly these settings, else None."""
    meta_file, targs = folder / "policymix.json", folder / "training_args.bin"
    if not (meta_file.is_file() and targs.is_file() and (folder / "adapter_model.safetensors").is_file()):
        return None
    import torch

    meta = json.loads(meta_file.read_text())
    trained = torch.load(targs, weights_only=False)  # the run's own TrainingArguments (this cache's file)
    same = (meta.get("kind", "dpo") == kind and meta.get("beta") == beta and meta.get("steps") == args.steps
            and meta.get("pairs") == str(pairs.resolve()) and trained.learning_rate == args.lr
            and trained.per_device_train_batch_size == args.batch_size and trained.max_steps == args.steps
            and trained.seed == 0 and meta.get("reference_spec", meta.get("base_spec")) == args.base)
    return meta if same else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m policymix.lab.arm_report", description=__doc__.splitlines()[0])
    p.add_argument("--pairs", default="data/prefs/concise.jsonl")
    p.add_argument("--base", default="embedded")
    p.add_argument("--work", default=".cache/arm-report", help="where the trained policies go")
    p.add_argument("--out-dir", default="docs/lab")
    p.add_argument("--hold-every", type=int, default=4, help="every N-th pair is held out")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--beta", type=float, default=0.1, help="DPO's beta")
    p.add_argument("--arm-betas", default="0.01,0.1",
                   help="beta_r of each ARM trained; the first guides the base at every --betas")
    p.add_argument("--diag-every", type=int, default=5, help="the ARM runs' diagnostics (the DPO run has none)")
    p.add_argument("--betas", default="1,0.5,0.25", help="decoding betas of mixture.arm")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--render-only", action="store_true",
                   help="rewrite arm.md and arm.png from the arm.json of --out-dir (no training, no generation)")
    args = p.parse_args(argv)
    out_dir = Path(args.out_dir)
    if args.render_only:
        report = json.loads((out_dir / "arm.json").read_text(encoding="utf-8"))
        plot(report["results"], out_dir / "arm.png", _plot_title(report))
        write_markdown(out_dir / "arm.md", report)
        return 0

    import torch

    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    load_before = round(os.getloadavg()[0], 2)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = load_pairs(args.pairs)
    train, held = split(records, args.hold_every)
    pairs = work / "train.jsonl"
    write_pairs(pairs, train)
    write_pairs(work / "heldout.jsonl", held)
    prompts = held_out_prompts(held, args.prompts)

    from . import arm, dpo
    from .base import resolve_base

    arm_betas = [float(x) for x in args.arm_betas.split(",")]
    arms = {f"arm-b{b:g}": work / f"arm-concise-b{b:g}" for b in arm_betas}
    runs = [("dpo", args.beta, work / "dpo-concise", dpo.main, 0)]
    runs += [("arm", b, folder, arm.main, args.diag_every) for b, folder in zip(arm_betas, arms.values())]
    train_times = {}
    for (kind, beta, folder, main_, diag), name in zip(runs, ["dpo", *arms]):
        meta = _reusable(folder, kind, beta, args, pairs)
        if meta is None:
            cmd = ["--base", args.base, "--pairs", str(pairs), "--beta", str(beta), "--lr", str(args.lr),
                   "--max-steps", str(args.steps), "--batch-size", str(args.batch_size), "--diag-every", str(diag),
                   "--save-steps", str(max(args.steps, 1)), "--threads", str(args.threads), "--out", str(folder)]
            t0 = time.perf_counter()
            if main_(cmd) != 0:
                return 1
            train_times[name] = {"seconds": round(time.perf_counter() - t0, 1), "reused": False}
        else:
            print(f"reusing {folder} (trained with the same settings)", flush=True)
            train_times[name] = {"seconds": meta["train_seconds"], "reused": True}
    base = resolve_base(args.base)

    t0 = time.perf_counter()
    accuracy = pair_accuracy(base, arms, work / "dpo-concise", work / "heldout.jsonl", args.beta)
    accuracy_s = round(time.perf_counter() - t0, 1)
    print(f"held-out pairs: {accuracy}", flush=True)

    betas = [float(x) for x in args.betas.split(",")]
    guide, *others = arms
    recipes = {"base": {"weights": {"base": 1.0}}, "DPO-concise": {"weights": {"dpo": 1.0}}}
    for b in betas:
        recipes[f"{guide}, beta={b:g}"] = {"arm": {"base": "base", "arms": {guide: 1.0}, "beta": b}}
    for name in others:
        recipes[f"{name}, beta={min(betas):g}"] = {"arm": {"base": "base", "arms": {name: 1.0}, "beta": min(betas)}}
    t0 = time.perf_counter()
    results = generate(base, work / "dpo-concise", arms, prompts, recipes, args.max_tokens, args.beta)
    total = round(time.perf_counter() - started, 1)
    timings = {"train": train_times, "accuracy": accuracy_s, "generate": round(time.perf_counter() - t0, 1),
               "total": total, "load_before": load_before, "load_after": round(os.getloadavg()[0], 2),
               "all": round(total + sum(t["seconds"] for t in train_times.values() if t["reused"]), 1)}

    command = "python -m policymix.lab.arm_report" + (" " + " ".join(argv) if argv else "")
    settings = {"command": command, "base": args.base, "pairs": len(records), "hold_every": args.hold_every,
                "train_pairs": len(train), "held_pairs": len(held), "steps": args.steps, "batch_size": args.batch_size,
                "lr": args.lr, "dpo_beta": args.beta, "arm_policies": dict(zip(arms, arm_betas)),
                "diag_every": args.diag_every, "prompts": len(prompts), "max_tokens": args.max_tokens,
                "threads": args.threads, "cpus": os.cpu_count()}
    report = {"settings": settings, "accuracy": accuracy, "timings": timings, "prompts": prompts, "results": results}
    (out_dir / "arm.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    plot(results, out_dir / "arm.png", _plot_title(report))
    ent = arms[guide] / "entanglement.png"
    if ent.is_file():
        (out_dir / "entanglement-concise-arm.png").write_bytes(ent.read_bytes())
    write_markdown(out_dir / "arm.md", report)
    print(f"wrote {out_dir / 'arm.md'}, arm.json, arm.png in {total} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

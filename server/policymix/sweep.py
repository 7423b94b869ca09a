"""`policymix sweep`: reward and KL-to-reference over a range of mixture weights (Goodhart's dial).

For each weight w the recipe template is filled in (``"$w"`` and simple arithmetic such as
``"1-$w"``), every prompt is generated, scored (reward model, implicit reward or mean logprob), and
the exact KL(q || pi_ref) summed over the response is recorded. Writes a CSV and a PNG with reward
against KL and against w: where more weight stops paying, the reward curve bends while KL climbs.
"""

from __future__ import annotations

import argparse
import ast
import csv
import json
import operator
import sys
from pathlib import Path

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
        ast.USub: operator.neg, ast.UAdd: operator.pos}


def _arith(expr: str, w: float) -> float:
    """Evaluate numbers, $w, + - * / and parentheses; nothing else."""
    def ev(node):
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.Name) and node.id == "w":
            return w
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"unsupported expression {expr!r}")
    return ev(ast.parse(expr.replace("$w", "w"), mode="eval"))


def fill(template, w: float):
    """Replace every string containing $w in a JSON recipe template by its value at w."""
    if isinstance(template, dict):
        return {k: fill(v, w) for k, v in template.items()}
    if isinstance(template, list):
        return [fill(v, w) for v in template]
    if isinstance(template, str) and "$w" in template:
        return _arith(template, w)
    return template


def weight_grid(spec: str) -> list[float]:
    """``start:stop:step`` (inclusive) or a comma list."""
    if ":" in spec:
        start, stop, step = (float(x) for x in spec.split(":"))
        if step <= 0:
            raise ValueError("the step of --weights must be > 0")
        n = int(round((stop - start) / step)) + 1
        return [round(start + i * step, 10) for i in range(n)]
    return [float(x) for x in spec.split(",")]


def parse_scorer(spec: str):
    from .engine.protocol import ImplicitRewardSpec, RerankSpec

    if spec == "logprob":
        return RerankSpec("logprob")
    kind, _, arg = spec.partition(":")
    if kind == "reward_model" and arg:
        return RerankSpec("reward_model", reward_model=arg)
    if kind == "implicit" and arg.count(",") == 2:
        p, r, b = arg.split(",")
        return RerankSpec("implicit", implicit=ImplicitRewardSpec(p, r, float(b)))
    raise ValueError("--scorer must be logprob, reward_model:NAME or implicit:POLICY,REFERENCE,BETA")


def run_sweep(registry, template, weights, prompts, scorer, reference: str, max_tokens: int, temperature: float,
              seed: int, chat: bool) -> list[dict]:
    from .engine.core import EngineCore
    from .engine.protocol import GenerationRequest, ImplicitRewardSpec, Prompt, SamplingParams
    from .mixing.recipes import compile_recipe
    from .rerank import reward_model_scores

    core = EngineCore(registry)
    infos = registry.infos()
    rows = []
    for w in weights:
        recipe = compile_recipe(fill(template, w), reference, infos, registry.config.mixtures)
        pair_policy = scorer.implicit.policy if scorer.kind == "implicit" else next(iter(recipe.active))
        pair = ImplicitRewardSpec(pair_policy, reference, scorer.implicit.beta if scorer.kind == "implicit" else 1.0)
        outs = []
        for i, text in enumerate(prompts):
            prompt = Prompt(messages=[{"role": "user", "content": text}]) if chat else Prompt(text=text)
            req = GenerationRequest(f"sweep-{w}-{i}", reference, recipe, prompt,
                                    SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i),
                                    return_token_signals=True, signals=pair)
            state = core.render(req)
            box = {}
            state.emit = lambda ev, box=box: box.setdefault("done", ev) if type(ev).__name__ == "RequestDone" else None
            core.add(state)
            outs.append((prompt, box))
        while core.has_work():
            core.step()
        for prompt, box in outs:
            done = box["done"]
            if done.error:
                raise RuntimeError(done.error)
            seq = done.sequences[0]
            if scorer.kind == "reward_model":
                score = reward_model_scores(registry.policies[scorer.reward_model], prompt, [seq.text])[0]
            elif scorer.kind == "implicit":
                score = seq.implicit_reward
            else:
                score = None
            rows.append({"weight": w, "reward": score, "kl": seq.kl_to_reference, "length": len(seq.token_ids),
                         "text": seq.text, "weights": json.dumps(recipe.weights)})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    by_w: dict[float, list[dict]] = {}
    for r in rows:
        by_w.setdefault(r["weight"], []).append(r)
    out = []
    for w, rs in by_w.items():
        rewards = [r["reward"] for r in rs if r["reward"] is not None]
        out.append({"weight": w, "mean_reward": sum(rewards) / len(rewards) if rewards else None,
                    "mean_kl": sum(r["kl"] for r in rs) / len(rs), "mean_length": sum(r["length"] for r in rs) / len(rs),
                    "n": len(rs)})
    return out


def plot(summary: list[dict], png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ws = [s["weight"] for s in summary]
    kls = [s["mean_kl"] for s in summary]
    rewards = [s["mean_reward"] for s in summary]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    if all(r is not None for r in rewards):
        axes[0].plot(kls, rewards, "o-")
        for w, x, y in zip(ws, kls, rewards):
            axes[0].annotate(f"{w:g}", (x, y), fontsize=7)
        axes[1].plot(ws, rewards, "o-")
    axes[0].set(xlabel="KL(q || reference), summed over the response", ylabel="mean reward", title="reward vs KL")
    axes[1].set(xlabel="weight", ylabel="mean reward", title="reward vs weight")
    axes[2].plot(ws, kls, "o-")
    axes[2].set(xlabel="weight", ylabel="mean KL to reference", title="KL vs weight")
    fig.suptitle(title.replace("$", r"\$"))  # a literal $w, not mathtext
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="policymix sweep", description=__doc__.splitlines()[0])
    ap.add_argument("--config", help="config file (default: the embedded SmolLM2 config)")
    ap.add_argument("--recipe", required=True,
                    help='JSON recipe template, e.g. \'{"weights": {"concise": "$w", "smollm2": "1-$w"}}\'')
    ap.add_argument("--weights", default="0:1:0.1", help="start:stop:step (inclusive) or a comma list")
    ap.add_argument("--prompts", required=True, help="text file, one prompt per line")
    ap.add_argument("--reference", required=True, help="the reference policy for KL (and the request's model)")
    ap.add_argument("--scorer", default="logprob", help="logprob | reward_model:NAME | implicit:P,R,BETA")
    ap.add_argument("--max-tokens", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--chat", action="store_true", help="send prompts as a user message through the chat template")
    ap.add_argument("--out", default="sweep", help="output prefix: writes PREFIX.csv, PREFIX_summary.csv, PREFIX.png")
    args = ap.parse_args(argv)
    from .errors import PolicymixError

    try:
        template = json.loads(args.recipe)
        weights = weight_grid(args.weights)
        scorer = parse_scorer(args.scorer)
        prompts = [ln.strip() for ln in Path(args.prompts).read_text(encoding="utf-8").splitlines() if ln.strip()]
        if not prompts:
            raise ValueError(f"--prompts: {args.prompts} has no prompts")
        from .config import load_config
        from .embedded import default_config
        from .registry import load_registry

        cfg = load_config(args.config) if args.config else default_config(progress=print)
        registry = load_registry(cfg, progress=print)
        rows = run_sweep(registry, template, weights, prompts, scorer, args.reference, args.max_tokens,
                         args.temperature, args.seed, args.chat)
    except (ValueError, OSError, PolicymixError, json.JSONDecodeError) as err:
        print(f"policymix sweep: error: {getattr(err, 'message', err)}", file=sys.stderr)
        return 2
    summary = summarize(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for path, data in ((out.with_suffix(".csv"), rows), (Path(f"{out}_summary.csv"), summary)):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    plot(summary, out.with_suffix(".png"), f"{args.recipe} — scorer {args.scorer}")
    for s in summary:
        print(f"w={s['weight']:<6g} reward={s['mean_reward']}  kl={s['mean_kl']:.4f}  len={s['mean_length']:.1f}")
    print(f"wrote {out.with_suffix('.csv')}, {out}_summary.csv, {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

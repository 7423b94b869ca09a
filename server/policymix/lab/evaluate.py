"""Score trained policies alone with the synthetic rules on held-out prompts (greedy answers).

``python -m policymix.lab.evaluate --base embedded .cache/policies/concise .cache/policies/friendly``
prints, per policy (the base first), the mean answer length in words and the mean friendly score.
Mixtures are evaluated through the server (``policymix sweep``); this checks each trained policy alone.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .synth import EVAL_PROMPTS, friendly_reward, words


def greedy_answers(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    """One greedy answer per prompt (chat template, user turn only, as in training), batched and left-padded."""
    import torch

    tok.padding_side = "left"
    texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
             for p in prompts]
    enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    with torch.no_grad():
        gen = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return [tok.decode(ids, skip_special_tokens=True).strip() for ids in gen[:, enc["input_ids"].shape[1]:]]


def evaluate(base: str, adapters: list[str], prompts: list[str], max_new_tokens: int = 64) -> dict[str, dict]:
    """{name: {"mean_words", "mean_friendly", "answers"}} for the base and each adapter folder."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base import resolve_base

    path = resolve_base(base)
    tok = AutoTokenizer.from_pretrained(path)
    results = {}
    for adapter in [None, *adapters]:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        if adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, adapter)
        answers = greedy_answers(model.eval(), tok, prompts, max_new_tokens)
        results[Path(adapter).name if adapter else "base"] = {
            "mean_words": round(sum(words(a) for a in answers) / len(answers), 2),
            "mean_friendly": round(sum(friendly_reward(a) for a in answers) / len(answers), 3),
            "answers": answers,
        }
    return results


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m policymix.lab.evaluate", description=__doc__.splitlines()[0])
    p.add_argument("adapters", nargs="*", help="trained policy folders (LoRA adapters)")
    p.add_argument("--base", default="embedded")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--json", help="also write every answer to this file")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    results = evaluate(args.base, args.adapters, EVAL_PROMPTS, args.max_new_tokens)
    print(f"{'policy':<12} {'mean words':>10} {'friendly (0-2)':>15}   ({len(EVAL_PROMPTS)} held-out prompts, greedy)")
    for name, r in results.items():
        print(f"{name:<12} {r['mean_words']:>10} {r['mean_friendly']:>15}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

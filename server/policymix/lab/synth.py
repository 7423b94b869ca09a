"""Synthetic preference sets, made by the project itself: the embedded model answers, a rule prefers.

For each prompt the embedded model (SmolLM2-135M-Instruct) samples candidates, some under a style
system prompt so that the rule has something to prefer. The pair keeps the plain user prompt (no
system prompt): a policy trained on it learns the style without being asked. Rules:

- ``concise``: fewer words is better; pair = shortest finished answer vs longest, at most 60% of its words.
- ``friendly``: one point for an exclamation mark, one for a friendly word; pair = a 2-point answer vs a
  0-point answer, choosing the two closest in length so that length is not what the pair teaches.
  Answers cut by the token budget are trimmed back to their last full sentence first.

Usage: ``python -m policymix.lab.synth --rule concise --out data/prefs/concise.jsonl``.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .pairs import write_pairs

_TOPICS = [
    "the moon", "photosynthesis", "coffee", "the ocean", "volcanoes", "bicycles", "honey bees", "rainbows",
    "the internet", "chess", "bread", "glaciers", "the heart", "electric cars", "libraries", "penguins",
    "solar panels", "tea", "earthquakes", "the piano", "recycling", "owls", "clouds", "vaccines",
    "the Roman Empire", "gardening", "sleep", "maps", "mushrooms", "the violin", "deserts", "batteries",
    "friendship", "running", "telescopes", "cheese", "lightning", "trees", "museums", "water",
]
_TEMPLATES = [
    "Tell me about {t}.", "Explain {t} to me.", "Why should I care about {t}?", "Give me a fun fact about {t}.",
    "What should I know about {t}?",
]

# Held-out prompts (no topic shared with training) for evaluating trained and mixed policies.
EVAL_PROMPTS = [
    "What is a comet?", "Tell me about dolphins.", "Why do leaves change color in autumn?",
    "How do airplanes fly?", "What is the capital of Japan?", "Give me a tip for learning a language.",
    "What is a rainforest?", "Tell me about the sun.", "How does a refrigerator work?",
    "What is jazz?", "Why do cats purr?", "Give me a fun fact about octopuses.",
    "What is democracy?", "How do I make a paper airplane?", "Tell me about the Great Wall of China.",
    "What is gravity?",
]

_STYLE_SYSTEM = {
    "concise": "Answer in one short sentence.",
    "friendly": "You are a warm, cheerful assistant. Greet the user and answer with enthusiasm and exclamation marks!",
}
_FRIENDLY_WORDS = re.compile(
    r"\b(hi|hello|hey|glad|happy|great|wonderful|awesome|fantastic|love|enjoy|hope|friend|welcome|delighted|"
    r"thanks|thank you|cheers|pleasure|amazing|delightful|wonder|fun|dear|cheerful|excited|joy|smile)\b",
    re.IGNORECASE)
# Per rule: (prompts, candidates per prompt, token budget). Friendly answers pass the rule less often.
_SAMPLING = {"concise": (160, 4, 64), "friendly": (200, 6, 64)}
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")


def words(text: str) -> int:
    return len(text.split())


def concise_reward(text: str) -> float:
    """The concise rule as a reward: minus the number of words."""
    return -float(words(text))


def friendly_reward(text: str) -> float:
    """The friendly rule as a reward: an exclamation mark (1) plus a friendly word (1)."""
    return float("!" in text) + float(bool(_FRIENDLY_WORDS.search(text)))


RULES = {"concise": concise_reward, "friendly": friendly_reward}


def training_prompts(n: int) -> list[str]:
    """``n`` prompts, topic-major so that any prefix covers many topics."""
    every = [tpl.format(t=t) for tpl in _TEMPLATES for t in _TOPICS]
    return every[:n]


@dataclass
class Candidate:
    text: str
    finished: bool  # ended with EOS within the token budget


def whole_sentences(c: Candidate) -> Candidate:
    """An answer cut by the token budget, trimmed back to its last full sentence (then it counts as finished)."""
    if c.finished:
        return c
    ends = list(_SENTENCE_END.finditer(c.text))
    return Candidate(c.text[: ends[-1].end()], True) if ends else c


def choose_pair(rule: str, cands: list[Candidate]) -> tuple[Candidate, Candidate] | None:
    """(chosen, rejected) by the rule, or None when no pair is clear enough."""
    cands = [c for c in cands if c.text.strip()]
    if rule == "concise":
        finished = [c for c in cands if c.finished]
        if not finished or len(cands) < 2:
            return None
        chosen = min(finished, key=lambda c: words(c.text))
        rejected = max(cands, key=lambda c: words(c.text))
        return (chosen, rejected) if words(chosen.text) <= 0.6 * words(rejected.text) else None
    if rule == "friendly":
        cands = [whole_sentences(c) for c in cands]
        good = [c for c in cands if c.finished and friendly_reward(c.text) == 2]
        bad = [c for c in cands if friendly_reward(c.text) == 0]
        if not good or not bad:
            return None
        return min(((g, b) for g in good for b in bad), key=lambda gb: abs(words(gb[0].text) - words(gb[1].text)))
    raise ValueError(f"unknown rule {rule!r} (choose one of {', '.join(RULES)})")


def sample_candidates(model, tok, prompts: list[str], system: str | None, samples: int, max_new_tokens: int,
                      temperature: float, batch_prompts: int) -> list[list[Candidate]]:
    """``samples`` sampled answers per prompt (batched, left-padded), in prompt order."""
    import torch

    tok.padding_side = "left"
    eos = tok.eos_token_id
    out: list[list[Candidate]] = []
    for start in range(0, len(prompts), batch_prompts):
        chunk = prompts[start:start + batch_prompts]
        texts = [tok.apply_chat_template(([{"role": "system", "content": system}] if system else [])
                                         + [{"role": "user", "content": p}], tokenize=False,
                                         add_generation_prompt=True) for p in chunk]
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with torch.no_grad():
            gen = model.generate(**enc, do_sample=True, temperature=temperature, top_p=0.95,
                                 max_new_tokens=max_new_tokens, num_return_sequences=samples,
                                 eos_token_id=eos, pad_token_id=tok.pad_token_id)
        new = gen[:, enc["input_ids"].shape[1]:]  # [len(chunk) * samples, T]
        for i in range(len(chunk)):
            row = []
            for ids in new[i * samples:(i + 1) * samples].tolist():
                finished = eos in ids
                ids = ids[: ids.index(eos)] if finished else ids
                row.append(Candidate(tok.decode(ids, skip_special_tokens=True).strip(), finished))
            out.append(row)
    return out


def generate_set(rule: str, n_prompts: int, samples: int, max_new_tokens: int, seed: int,
                 temperature: float = 0.9, batch_prompts: int = 16, base: str = "embedded",
                 progress=print) -> list[dict]:
    """Pairs for ``rule``: half the samples under the plain prompt, half under the style system prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .base import resolve_base

    path = resolve_base(base)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = training_prompts(n_prompts)
    torch.manual_seed(seed)
    half = max(1, samples // 2)
    plain = sample_candidates(model, tok, prompts, None, half, max_new_tokens, temperature, batch_prompts)
    progress(f"{rule}: sampled {half} plain answers for {len(prompts)} prompts")
    styled = sample_candidates(model, tok, prompts, _STYLE_SYSTEM[rule], samples - half, max_new_tokens,
                               temperature, batch_prompts)
    progress(f"{rule}: sampled {samples - half} styled answers for {len(prompts)} prompts")
    records = []
    for prompt, a, b in zip(prompts, plain, styled):
        pair = choose_pair(rule, a + b)
        if pair:
            chosen, rejected = pair
            records.append({"prompt": prompt, "chosen": chosen.text, "rejected": rejected.text, "rule": rule,
                            "scores": [RULES[rule](chosen.text), RULES[rule](rejected.text)]})
    return records


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m policymix.lab.synth", description=__doc__.splitlines()[0])
    p.add_argument("--rule", required=True, choices=sorted(RULES))
    p.add_argument("--out", required=True)
    p.add_argument("--prompts", type=int, default=None, help="default: 160 concise, 200 friendly")
    p.add_argument("--samples", type=int, default=None, help="candidates per prompt, half under the style prompt "
                   "(default: 4 concise, 6 friendly)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--base", default="embedded")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    n_prompts, samples, max_new = _SAMPLING[args.rule]
    n_prompts = args.prompts or n_prompts
    records = generate_set(args.rule, n_prompts, args.samples or samples, args.max_new_tokens or max_new,
                           args.seed, base=args.base,
                           progress=lambda msg: print(msg, file=sys.stderr))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_pairs(args.out, records)
    print(f"wrote {len(records)} {args.rule} pairs from {n_prompts} prompts to {args.out} "
          f"in {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

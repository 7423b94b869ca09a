"""The benchmark model set: three random Llama policies (hidden 256, 4 layers, ~20M parameters each)
sharing one 32k-token tokenizer, plus 16 fixed prompts.

Why a synthetic corpus: ``policymix.tiny_models.build_tokenizer`` trains on a few lines and stops
near 1k tokens, but the lm_head width (32k x 256) is a large part of a decode step at this size, so
the benchmark needs a real 32k vocabulary. We train the same kind of byte-level BPE (same special
tokens, same chat template) on a deterministic corpus of pseudo-words, which has enough distinct
pairs for 32k merges, plus a little English so that the prompts tokenize like text.

Built once and cached: ``build_bench_models()`` reuses a folder whose manifest matches the spec.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

DEFAULT_CACHE_DIR = Path(".cache/bench-models")
POLICY_NAMES = ("base", "tuned", "untuned")  # proxy tuning: base + alpha * (tuned - untuned)
_FORMAT = 1  # bump when the build changes, so stale caches are rebuilt

PROMPTS = [
    "The capital of France is",
    "Write a short poem about the sea.",
    "Explain in one paragraph how a transformer language model predicts the next token.",
    "List three reasons why people keep dogs as pets:",
    "Once upon a time, in a small village at the edge of a forest,",
    "Translate to German: The weather is sunny and warm today.",
    "Q: What is 17 times 3? A:",
    "Summarize the plot of a detective story in two sentences.",
    "def fibonacci(n):",
    "The most important lesson I learned at university was",
    "Give me a recipe for a simple tomato soup.",
    "Alignment researchers tune language models with human preferences because",
    "Dear hiring manager, I am writing to apply for the position of",
    "In 1969, astronauts landed on the Moon and",
    "Here is a formal answer to the question about climate change:",
    "Hello! How are you today? I wanted to ask you about",
]

_ENGLISH = " ".join(PROMPTS) + (
    " The quick brown fox jumps over the lazy dog. A policy is a distribution over the next token."
    " Mixing policies combines their log probabilities. Please answer formally and concisely."
    " Numbers: 0 1 2 3 4 5 6 7 8 9 10 100 1000. Symbols: , . ; : ! ? ' \" ( ) [ ] { } - + = * /"
)


@dataclass(frozen=True)
class ModelSpec:
    """Shape of each benchmark policy (the issue's 'hidden 256, 4 layers, vocab 32k')."""

    hidden: int = 256
    layers: int = 4
    heads: int = 4  # head_dim 64: also a size vLLM's CPU attention accepts
    kv_heads: int = 4
    intermediate: int = 1024
    vocab_size: int = 32000
    max_positions: int = 4096
    init_std: float = 0.2  # as policymix.tiny_models: peaky random policies

    def manifest(self) -> dict:
        return {"format": _FORMAT, "names": list(POLICY_NAMES), **asdict(self)}


QUICK_CACHE_DIR = Path(".cache/bench-models-quick")
# CI smoke runs (`--quick`): the same make of models, tiny, so that a whole benchmark takes seconds
QUICK_SPEC = ModelSpec(hidden=64, layers=2, heads=2, kv_heads=2, intermediate=128, vocab_size=2000,
                       max_positions=1024)


@dataclass
class BenchModels:
    root: Path
    tokenizer_dir: Path
    paths: dict[str, Path]  # policy name -> HF directory
    spec: ModelSpec


def _synthetic_corpus(seed: int = 0, n_words: int = 60_000, n_lines: int = 20_000) -> list[str]:
    """Lines of pseudo-words from consonant-vowel syllables with a heavy-tailed frequency."""
    rng = random.Random(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "j", "k", "l", "m", "n", "p", "r", "s", "t", "v", "w",
              "z", "ch", "sh", "th", "st", "pr", "tr", "bl", "gr"]
    vowels = ["a", "e", "i", "o", "u", "ai", "ea", "ou", "io", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "ck", "ng", "nd", "st"]
    syllables = [o + v + c for o in onsets for v in vowels for c in codas]
    words = ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 3))) for _ in range(n_words)]

    def word() -> str:
        if rng.random() < 0.5:  # Pareto rank: a few very frequent words, as in text
            return words[min(int(rng.paretovariate(0.6)) - 1, n_words - 1)]
        return rng.choice(words)

    return [" ".join(word() for _ in range(12)) for _ in range(n_lines)] + [_ENGLISH] * 50


def build_bench_tokenizer(out_dir: str | Path, vocab_size: int = 32000):
    """Train and save a byte-level BPE with exactly ``vocab_size`` tokens; returns the HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    from policymix.tiny_models import CHAT_TEMPLATE

    specials = ["<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|developer|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_synthetic_corpus(), trainer=trainer)
    if tok.get_vocab_size() != vocab_size:  # the corpus ran out of pairs: the benchmark would lie
        raise RuntimeError(f"BPE reached {tok.get_vocab_size()} tokens, wanted {vocab_size}")
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=specials[3:],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out_dir)
    return fast


def build_bench_models(cache_dir: str | Path | None = None, spec: ModelSpec = ModelSpec()) -> BenchModels:
    """Build (or reuse from ``cache_dir``) the tokenizer and the three policies; returns their paths."""
    from policymix.tiny_models import build_policy

    root = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    manifest_path = root / "manifest.json"
    paths = {name: root / name for name in POLICY_NAMES}
    models = BenchModels(root=root, tokenizer_dir=root / "tokenizer", paths=paths, spec=spec)
    if manifest_path.exists() and json.loads(manifest_path.read_text()) == spec.manifest():
        if all((p / "config.json").exists() for p in paths.values()):
            return models
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    build_bench_tokenizer(models.tokenizer_dir, vocab_size=spec.vocab_size)
    for seed, (name, path) in enumerate(paths.items()):
        build_policy(
            path, models.tokenizer_dir, seed=seed, hidden=spec.hidden, layers=spec.layers, heads=spec.heads,
            kv_heads=spec.kv_heads, intermediate=spec.intermediate, init_std=spec.init_std,
            max_positions=spec.max_positions,
        )
    manifest_path.write_text(json.dumps(spec.manifest(), indent=1))  # last: marks the cache complete
    return models


def bench_models(quick: bool = False) -> BenchModels:
    """The benchmark set (``build_bench_models()``), or with ``quick`` the tiny one (``QUICK_SPEC``)."""
    return build_bench_models(QUICK_CACHE_DIR, QUICK_SPEC) if quick else build_bench_models()


def load_tokenizer(path: str | Path):
    """The shared tokenizer, left-padding (static batches must end at the same column)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    tok.padding_side = "left"
    return tok


def load_policies(paths: dict[str, Path], dtype: str = "float32") -> dict:
    """name -> ``LlamaForCausalLM`` in eval mode on CPU."""
    import torch
    from transformers import AutoModelForCausalLM

    out = {}
    for name, path in paths.items():
        model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
        out[name] = model.eval()
    return out


def write_policymix_config(models: BenchModels, path: str | Path) -> Path:
    """A policymix config serving the three policies, with the anchors' recipes as named mixtures."""
    import yaml

    cfg = {
        "policies": {name: {"path": str(p.resolve()), "dtype": "float32"} for name, p in models.paths.items()},
        "mixtures": {
            "proxy": {"proxy": {"base": "base", "tuned": "tuned", "untuned": "untuned", "alpha": 1.0}},
            "dera": {"reference": "base", "policy": "tuned", "beta": 0.1, "beta_prime": 0.05},
        },
    }
    path = Path(path)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.models [--config-out FILE]``: build the set, print paths, write a config."""
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.models", description=main.__doc__)
    p.add_argument("--cache-dir", default=str(DEFAULT_CACHE_DIR))
    p.add_argument("--config-out", help="write a policymix config serving the three policies here")
    args = p.parse_args(argv)
    models = build_bench_models(args.cache_dir)
    for name, path in models.paths.items():
        print(f"{name}: {path}")
    if args.config_out:
        print(f"config: {write_policymix_config(models, args.config_out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

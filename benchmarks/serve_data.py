"""Request sets for the serving benchmark: random prompts of set lengths, or a JSONL file.

A prompt is either a list of token ids (exact input length; vLLM and policymix both accept ids in
``/v1/completions``) or text. Random text is built from a tokenizer when one is given (decoded random
ids), else from a fixed word list, where the input length is then only approximate.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

_WORDS = ("time person year way day thing man world life hand part child eye woman place work week case "
          "point government company number group problem fact water city river music garden story answer "
          "policy model token mixture reward reference server request engine batch cache").split()


@dataclass
class SampleRequest:
    prompt: str | list[int]
    output_len: int  # max_tokens (exact with ignore_eos)
    prompt_len: int | None = None  # tokens, when known before sending


def _lengths(rng: random.Random, n: int, mean: int, range_ratio: float) -> list[int]:
    """Uniform in [mean * (1 - r), mean * (1 + r)], at least 1 (vLLM's random-dataset convention)."""
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    lo, hi = max(1, int(mean * (1 - range_ratio))), max(1, int(mean * (1 + range_ratio)))
    return [rng.randint(lo, hi) for _ in range(n)]


def random_requests(num: int, input_len: int, output_len: int, range_ratio: float = 0.0, kind: str = "ids",
                    vocab_size: int | None = None, tokenizer=None, seed: int = 0) -> list[SampleRequest]:
    """``num`` requests with random prompts. ``kind``: "ids" (needs ``vocab_size`` or ``tokenizer``) or "text"."""
    if kind not in ("ids", "text"):
        raise ValueError(f"kind must be 'ids' or 'text', got {kind!r}")
    rng = random.Random(seed)
    in_lens = _lengths(rng, num, input_len, range_ratio)
    out_lens = _lengths(rng, num, output_len, range_ratio)
    ids_pool: list[int] | None = None
    if tokenizer is not None:  # ordinary tokens only: special ids would end or restructure prompts
        special = set(tokenizer.all_special_ids)
        ids_pool = [i for i in range(len(tokenizer)) if i not in special]
    elif vocab_size is not None:
        ids_pool = list(range(vocab_size))
    if kind == "ids" and ids_pool is None:
        raise ValueError("token-id prompts need --vocab-size or --tokenizer")
    out = []
    for n_in, n_out in zip(in_lens, out_lens):
        if kind == "ids":
            out.append(SampleRequest([rng.choice(ids_pool) for _ in range(n_in)], n_out, n_in))
        elif tokenizer is not None:
            text = tokenizer.decode([rng.choice(ids_pool) for _ in range(n_in)])
            out.append(SampleRequest(text, n_out, len(tokenizer(text, add_special_tokens=False).input_ids)))
        else:
            out.append(SampleRequest(" ".join(rng.choice(_WORDS) for _ in range(n_in)), n_out, None))
    return out


def jsonl_requests(path: str | Path, output_len: int, num: int | None = None) -> list[SampleRequest]:
    """One JSON object per line: ``{"prompt": str | [ids], "output_len": int (optional)}``."""
    out = []
    for line_no, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "prompt" not in row:
            raise ValueError(f"{path}:{line_no}: missing 'prompt'")
        prompt = row["prompt"]
        out.append(SampleRequest(prompt, int(row.get("output_len", output_len)),
                                 len(prompt) if isinstance(prompt, list) else None))
        if num is not None and len(out) == num:
            break
    if not out:
        raise ValueError(f"{path}: no requests")
    return out

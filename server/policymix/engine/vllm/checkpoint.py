"""The composite checkpoint folder that vLLM loads for one tokenizer family (built at start, cached).

vLLM loads one model per engine, so a family's policies become one checkpoint: the first
policy's ``config.json`` with ``architectures: ["MixturePolicyForCausalLM"]``, the vocabulary cut
to the tokenizer's length, and the list of policy folders; the family's tokenizer; and one tiny
placeholder ``.safetensors`` (vLLM's default loader refuses a folder without a weight file). The
policies' own weights are read from their folders (``secondary_weights``); nothing is copied.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from .plugin import ARCH, POLICIES_KEY

PLACEHOLDER = "policymix_placeholder"


@dataclass(frozen=True)
class Member:
    """One policy of the composite: its served name, weights folder and attribute in the model."""

    name: str
    path: str
    attr: str  # letters only: vLLM reads a layer's index as the one integer in its name


def attr_name(i: int) -> str:
    """pol_a, pol_b, ..., pol_z, pol_ba, ... (no digits)."""
    letters = ""
    while True:
        letters = chr(ord("a") + i % 26) + letters
        i //= 26
        if i == 0:
            return f"pol_{letters}"


def read_config(path: str) -> dict:
    f = Path(path, "config.json")
    if f.is_file():
        return json.loads(f.read_text())
    from transformers import AutoConfig  # a hub id

    return AutoConfig.from_pretrained(path).to_dict()


def _fingerprint(path: str) -> list:
    """Names, sizes and mtimes of a local folder's files: a changed checkpoint gets a new folder."""
    p = Path(path)
    if not p.is_dir():
        return [path]
    return sorted((f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in p.iterdir() if f.is_file())


def composite_config(members: list[Member], vocab_size: int, max_len: int) -> dict:
    cfg = read_config(members[0].path)
    cfg["architectures"] = [ARCH]
    cfg["vocab_size"] = vocab_size  # the mixed scores have the tokenizer's width (lm_heads are often padded)
    cfg["max_position_embeddings"] = max_len
    cfg[POLICIES_KEY] = [{"name": m.name, "path": m.path, "attr": m.attr} for m in members]
    cfg.pop("auto_map", None)
    return cfg


def build_checkpoint(members: list[Member], tokenizer, max_len: int, cache_dir: Path) -> Path:
    """The composite folder for ``members`` under ``cache_dir`` (reused while nothing changed)."""
    cfg = composite_config(members, len(tokenizer), max_len)
    key_src = json.dumps([cfg, [_fingerprint(m.path) for m in members], tokenizer.get_vocab()], sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    out = Path(cache_dir) / f"composite-{key}"
    if (out / "config.json").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tokenizer.save_pretrained(tmp)
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1))
    import torch
    from safetensors.torch import save_file

    save_file({PLACEHOLDER: torch.zeros(1)}, str(tmp / "model.safetensors"))
    try:
        os.replace(tmp, out)
    except OSError:  # another process built it first
        shutil.rmtree(tmp, ignore_errors=True)
    return out

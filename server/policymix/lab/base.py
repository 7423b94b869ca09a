"""Resolve a base-model spec to a folder that ``from_pretrained`` loads quickly.

``embedded`` (or ``smollm2``) is SmolLM2-135M-Instruct as the server converts it
(``policymix.embedded.smollm2_dir``); another ``.gguf`` file is de-quantised once (about 20-30 s on 2
cores) into the same cache (``$POLICYMIX_CACHE`` or ``~/.cache/policymix``); anything else (an HF folder
or a hub id) is returned unchanged.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..embedded import cache_root, smollm2_dir

EMBEDDED_ALIASES = ("embedded", "smollm2")


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise ``gguf`` to a float32 safetensors folder (model + fixed tokenizer), once."""
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer_config.json").is_file():
        return out_dir
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The model is plain float32 now; the GGUF quantizer only refuses to save it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    eos_id = model.generation_config.eos_token_id
    if isinstance(eos_id, int) and tok.eos_token_id != eos_id:
        # SmolLM2's GGUF metadata names <|im_start|> as the tokenizer's EOS; the model ends turns with
        # <|im_end|> (its generation config). Training appends the tokenizer's EOS, so it must be right.
        tok.eos_token = tok.convert_ids_to_tokens(eos_id)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tmp = out_dir.with_name(out_dir.name + ".partial")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(out_dir)  # atomic: a killed conversion never leaves a half folder behind
    return out_dir


def resolve_base(spec: str) -> Path | str:
    """A folder for ``spec``: ``embedded``/``smollm2``, a ``.gguf`` path, an HF folder, or a hub id."""
    if spec in EMBEDDED_ALIASES:
        return Path(smollm2_dir())  # the server's own cached conversion: the same base it serves
    if spec.endswith(".gguf"):
        gguf = Path(spec).resolve()
        if not gguf.is_file():
            raise FileNotFoundError(f"GGUF file {spec} does not exist")
        key = hashlib.sha256(f"{gguf}:{gguf.stat().st_size}".encode()).hexdigest()[:12]
        return convert_gguf(gguf, cache_root() / f"{gguf.stem}-{key}")
    path = Path(spec).expanduser()
    return path.resolve() if path.exists() else spec

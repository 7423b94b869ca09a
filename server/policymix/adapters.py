"""LoRA adapters served unmerged: every adapter of one base in one PEFT model, applied per row.

Policies that are PEFT LoRA adapters of the same base share that base's loaded weights: one
``PeftModel`` holds every adapter by its policy's name, and a forward mixes them row by row with PEFT's
mixed-adapter batches (``adapter_names``: the base's linear layers run once over all rows, each
adapter's low-rank update over its own rows; ``"__base__"`` rows get none). So a mixture of a base and
its adapters (DeRa over a LoRA DPO policy, MOD over LoRA experts, implicit rewards against the base)
costs one read of the base per step, and memory holds the base once plus the adapters.

What PEFT's mixed batches do not cover is refused at start, with one line naming the policy: other
PEFT types than LoRA, DoRA and other LoRA variants, ``modules_to_save`` (full copies of modules, per
adapter) and LoRA on layers other than linear ones (embeddings, convolutions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ConfigError

BASE = "__base__"  # PEFT's name for rows that get no adapter


def check_adapter(policy: str, path: str) -> None:
    """Raise ConfigError (one line naming the policy) for an adapter that cannot be served unmerged."""
    file = Path(path, "adapter_config.json")
    if not file.is_file():
        raise ConfigError(f"policies.{policy}: {path!r} is not a PEFT adapter folder (no adapter_config.json)")
    cfg = json.loads(file.read_text())
    kind = cfg.get("peft_type", "LORA")
    problems = []
    if str(kind).upper() != "LORA":
        problems.append(f"peft_type {kind} (only LoRA adapters are served)")
    if cfg.get("use_dora"):
        problems.append("use_dora (DoRA is not served unmerged)")
    for key in ("use_rslora_variant", "use_alora", "alora_invocation_tokens", "use_qalora"):
        if cfg.get(key):
            problems.append(f"{key} (a LoRA variant)")
    if cfg.get("modules_to_save"):
        problems.append(f"modules_to_save {cfg['modules_to_save']} (full module copies per adapter)")
    if cfg.get("layers_to_transform") is not None and not isinstance(cfg.get("layers_to_transform"), (int, list)):
        problems.append("layers_to_transform")
    if problems:
        raise ConfigError(f"policies.{policy}: the adapter at {path!r} cannot be served as an adapter lane: "
                          + "; ".join(problems))


def attach_adapters(base, adapters: dict[str, str]):
    """The PEFT model over ``base`` with each adapter loaded under its policy's name (``base`` is changed in
    place: its linear layers become LoRA layers; without ``adapter_names`` a forward would apply the active
    adapter, so every caller goes through :class:`AdapterView` or passes ``adapter_names``)."""
    from peft import PeftModel  # optional: only configs with adapters need peft
    from torch import nn

    names = list(adapters)
    model = PeftModel.from_pretrained(base, adapters[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapters[name], adapter_name=name)
    for policy in names:  # LoRA on anything but linear layers is not in PEFT's mixed batches here
        for mod_name, mod in model.named_modules():
            lora = (*getattr(mod, "lora_A", {}), *getattr(mod, "lora_embedding_A", {}))
            if policy in lora and not isinstance(mod.get_base_layer(), nn.Linear):
                raise ConfigError(f"policies.{policy}: LoRA on {mod_name} ({type(mod.get_base_layer()).__name__}) "
                                  "cannot be served as an adapter lane (linear layers only)")
    model.eval()
    model.requires_grad_(False)
    return model


class AdapterView:
    """One policy of a shared PEFT model, called like a model: its adapter (or none: the base) on every row.

    The engine's runner calls the shared model with per-row ``adapter_names``; everything else that calls a
    policy's ``model`` (scoring, the lab, tests) gets exactly that policy through this view."""

    def __init__(self, peft_model, adapter: str | None):
        self.peft_model = peft_model
        self.adapter = adapter or BASE

    @property
    def config(self):
        return self.peft_model.get_base_model().config

    def _names(self, args: tuple, kwargs: dict[str, Any]) -> list[str]:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        return [self.adapter] * x.shape[0]

    def __call__(self, *args, **kwargs):
        return self.peft_model(*args, adapter_names=self._names(args, kwargs), **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        return self.peft_model.generate(*args, adapter_names=self._names(args, kwargs), **kwargs)

    def __getattr__(self, name: str):  # parameters(), device, dtype, eval(), ...: the shared model's
        return getattr(self.peft_model, name)

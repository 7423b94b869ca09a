"""LoRA adapters served unmerged: every adapter of one base in one model, applied per row.

Policies that are PEFT LoRA adapters of the same base share that base's loaded weights. PEFT loads
each adapter under its policy's name; then every LoRA layer becomes a :class:`GroupedLoRA`, which
holds all adapters of that layer concatenated and gives each row of a forward its own adapter's
update (or none: the base and its prompted policies) in two small matmuls. So a mixture of a base and
its adapters (DeRa over a LoRA DPO policy, MOD over LoRA experts, implicit rewards against the base)
costs one read of the base per step, and memory holds the base once plus the adapters. (PEFT's own
mixed-adapter batches, ``adapter_names``, give the same numbers with a Python loop over adapters per
layer; ``benchmarks/shared_weights.py`` measures both side by side, and the grouped form was kept.)

What this does not cover is refused at start, with one line naming the policy: other PEFT types than
LoRA, DoRA and other LoRA variants, ``modules_to_save`` (full copies of modules, per adapter) and LoRA
on layers other than linear ones (embeddings, convolutions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

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


def attach_adapters(base, adapters: dict[str, str]) -> nn.Module:
    """``base`` with each policy's adapter (policy -> adapter folder), loaded by PEFT and grouped into its LoRA
    layers (:func:`group_adapters`; ``base`` is changed in place: a forward applies what ``adapter_rows``
    says, so every caller goes through :class:`AdapterView` or sets the rows, by policy name)."""
    from peft import PeftModel  # optional: only configs with adapters need peft

    ids = {policy: f"adapter{i}" for i, policy in enumerate(adapters)}  # PEFT's names: no "." allowed
    first, *rest = adapters
    model = PeftModel.from_pretrained(base, adapters[first], adapter_name=ids[first])
    for policy in rest:
        model.load_adapter(adapters[policy], adapter_name=ids[policy])
    for policy, name in ids.items():  # LoRA on anything but linear layers is not grouped
        for mod_name, mod in model.named_modules():
            lora = (*getattr(mod, "lora_A", {}), *getattr(mod, "lora_embedding_A", {}))
            if name in lora and not isinstance(mod.get_base_layer(), nn.Linear):
                raise ConfigError(f"policies.{policy}: LoRA on {mod_name} ({type(mod.get_base_layer()).__name__}) "
                                  "cannot be served as an adapter lane (linear layers only)")
    served = group_adapters(model)
    rows = served.adapter_rows
    rows.index = {policy: rows.index[name] for policy, name in ids.items()}  # rows are set by policy name
    return served


class AdapterRows:
    """Which adapter each row of the next forward gets, shared by every grouped layer of one model: a mask
    [rows, 1, sum of widths] that keeps each row's own adapter's block of the concatenated low-rank space
    (None: no row has an adapter, the base alone runs)."""

    def __init__(self, names: list[str], widths: list[int], device, dtype):
        self.index = {name: i + 1 for i, name in enumerate(names)}  # 0: the base
        blocks = torch.zeros(len(names) + 1, sum(widths), dtype=dtype, device=device)
        start = 0
        for i, w in enumerate(widths):
            blocks[i + 1, start:start + w] = 1.0
            start += w
        self.blocks = blocks  # [adapters + 1, sum of widths]
        self.mask: torch.Tensor | None = None

    def set(self, adapters: list[str]) -> None:
        """The next forward's rows: one adapter name per row (BASE or an unknown name: none)."""
        idx = [self.index.get(a, 0) for a in adapters]
        self.mask = None if not any(idx) else \
            self.blocks.index_select(0, torch.tensor(idx, device=self.blocks.device))[:, None, :]


class GroupedLoRA(nn.Module):
    """``y = base(x) + B_cat((A_cat x) * mask)``: every adapter of a layer in one pair of small matmuls.

    A_cat stacks the adapters' A matrices [sum of widths, in] and B_cat their B matrices times their
    scaling [out, sum of widths], each adapter's block zero-padded to its width (its largest rank over the
    layers; an adapter that does not target this layer is all zeros here). The row's mask zeroes every
    block but its own adapter's (exactly: 0 * finite = 0), so each row gets the base plus its own
    adapter's update. Two matmuls per layer whatever the number of adapters, where PEFT's mixed batches
    gather and scatter each adapter's rows in a Python loop (measured in benchmarks/shared_weights.py)."""

    checkpoint_free = True  # its tensors are made here, not mapped from a checkpoint (cpu_linear: no copy)

    def __init__(self, lora_layer, names: list[str], widths: dict[str, int], rows: AdapterRows):
        super().__init__()
        self.base_layer = lora_layer.get_base_layer()
        w = self.base_layer.weight
        a_blocks, b_blocks = [], []
        for name in names:
            a = w.new_zeros(widths[name], self.base_layer.in_features)
            b = w.new_zeros(self.base_layer.out_features, widths[name])
            if name in lora_layer.lora_A:
                r = lora_layer.lora_A[name].weight.shape[0]
                a[:r] = lora_layer.lora_A[name].weight
                b[:, :r] = lora_layer.lora_B[name].weight * lora_layer.scaling[name]
            a_blocks.append(a)
            b_blocks.append(b)
        self.a = nn.Parameter(torch.cat(a_blocks), requires_grad=False)  # [sum of widths, in]
        self.b = nn.Parameter(torch.cat(b_blocks, dim=1), requires_grad=False)  # [out, sum of widths]
        self.rows = rows

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        mask = self.rows.mask
        if mask is None:
            return y
        low = F.linear(x, self.a).mul_(mask)  # [B, Q, sum of widths]: each row's own block
        return y.add_(F.linear(low, self.b))


def group_adapters(peft_model) -> nn.Module:
    """The served model: PEFT's base model with every LoRA layer replaced by a :class:`GroupedLoRA` (the
    adapters' weights moved into it); its ``adapter_rows`` says which adapter each row of a forward gets."""
    from peft.tuners.lora import LoraLayer

    base = peft_model.get_base_model()
    layers = [(n, m) for n, m in base.named_modules() if isinstance(m, LoraLayer)]
    names = list(peft_model.peft_config)
    widths = {a: max(m.lora_A[a].weight.shape[0] for _, m in layers if a in m.lora_A) for a in names}
    ref = layers[0][1].get_base_layer().weight
    rows = AdapterRows(names, [widths[a] for a in names], ref.device, ref.dtype)
    for mod_name, mod in layers:
        parent, _, attr = mod_name.rpartition(".")
        setattr(base.get_submodule(parent) if parent else base, attr, GroupedLoRA(mod, names, widths, rows))
    base.adapter_rows = rows
    base.eval()
    base.requires_grad_(False)
    return base


class AdapterView:
    """One policy of a shared adapter model, called like a model: its adapter (or none: the base) on every
    row. The engine's runner sets the rows itself; everything else that calls a policy's ``model``
    (scoring, the lab, tests) gets exactly that policy through this view (not while the engine steps the
    same model on another thread: the rows are the model's)."""

    def __init__(self, model: nn.Module, adapter: str | None):
        self.shared = model
        self.adapter = adapter or BASE

    @property
    def config(self):
        return self.shared.config

    def _rows(self, args: tuple, kwargs: dict[str, Any]) -> None:
        x = kwargs.get("input_ids", args[0] if args else None)
        if x is None:
            x = kwargs["inputs_embeds"]
        self.shared.adapter_rows.set([self.adapter] * x.shape[0])

    def __call__(self, *args, **kwargs):
        self._rows(args, kwargs)
        return self.shared(*args, **kwargs)

    forward = __call__

    def generate(self, *args, **kwargs):
        self._rows(args, kwargs)
        return self.shared.generate(*args, **kwargs)

    def __getattr__(self, name: str):  # parameters(), device, dtype, eval(), ...: the shared model's
        return getattr(self.shared, name)

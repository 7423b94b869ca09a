"""oneDNN-prepacked linear layers for float32 policies on CPU (``server.cpu_linear: onednn``).

A CPU decode step of a small policy is mostly GEMMs with few rows: each weight is multiplied by one
row per running sequence. ``nn.Linear`` hands the weight, as stored, to MKL's sgemm at every call;
oneDNN can reorder it once into its blocked layout and then run the same product much faster at
these shapes. Measured on this project's 2-core VM (one thread, AVX-512): a 32k x 256 lm_head times
16 rows 5.1 ms -> 1.8 ms, a 1024 x 256 MLP projection 93 -> 44 us. Inductor's CPU freezing pass and
vLLM's CPU backend prepack weights the same way.

The ops are ``torch.ops.mkldnn._reorder_linear_weight`` and ``_linear_pointwise``, the ones
Inductor emits. They are internal to torch, so each packed layer is compared with ``F.linear`` on a
probe when it is packed, and any failure leaves the model exactly as it was (plain ``nn.Linear``).
"""

from __future__ import annotations

import ctypes
import gc
import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("policymix.engine")


class PackedLinear(nn.Module):
    """``y = x W^T + b`` with W held in oneDNN's blocked layout (inference only)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        with torch.inference_mode():
            # a plain attribute, not a buffer: state_dict and .to() do not know oneDNN tensors
            self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach())
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def can_pack(device, dtype) -> bool:
    """Packing applies to float32 weights on CPU in a torch build with oneDNN."""
    return (torch.device(device).type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


@torch.inference_mode()
def pack_linears(model: nn.Module) -> int:
    """Replace every float32 ``nn.Linear`` of ``model`` by a :class:`PackedLinear`; returns how many.

    All or nothing: the packed layers are built and checked first, then swapped in. A model already
    packed (policies that share weights) is left alone and 0 is returned.
    """
    # a LoRA adapter's own A and B stay plain (PEFT reads their weights); its base layer is packed
    targets = [(name, mod) for name, mod in model.named_modules()
               if type(mod) is nn.Linear and mod.weight.dtype == torch.float32 and mod.weight.device.type == "cpu"
               and ".lora_" not in name]
    if not targets:
        return 0
    gen = torch.Generator().manual_seed(0)
    try:
        packed = {}
        for name, mod in targets:
            new = PackedLinear(mod)
            probe = torch.randn(3, mod.in_features, generator=gen)
            want, got = F.linear(probe, mod.weight, mod.bias), new(probe)
            tol = 1e-4 * (1.0 + float(want.abs().max()))
            if got.shape != want.shape or not bool(((got - want).abs() <= tol).all()):
                raise ValueError(f"{name}: the packed product differs from F.linear")
            packed[name] = new
    except Exception as err:  # noqa: BLE001 - internal ops: any failure means plain torch, never a broken model
        log.warning("oneDNN linear packing unavailable (%s: %s); using torch's linear", type(err).__name__, err)
        return 0
    for name, new in packed.items():
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    _release_checkpoint(model)
    return len(packed)


def _release_checkpoint(model: nn.Module) -> None:
    """Copy what was not packed (embeddings, norms, adapters) out of the loaded checkpoint, and give freed
    memory back to the OS.

    transformers maps a safetensors checkpoint and its tensors are views of that one mapping: while any of
    them lives (an embedding does), every page of the file that packing read stays resident, beside the
    packed copies. Measured on SmolLM2-135M (float32, 513 MB): 1,641 MB resident after packing, 1,227 MB
    after this (benchmarks/shared_weights.py)."""
    for mod_name, mod in model.named_modules():
        if ".lora_" in mod_name or getattr(mod, "checkpoint_free", False):  # made in memory, not mapped
            continue
        for name, p in mod._parameters.items():
            if p is not None:
                p.data = p.data.clone()
        for name, b in mod._buffers.items():
            if b is not None:
                mod._buffers[name] = b.clone()
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """Return the C heap's free pages to the OS (glibc's malloc_trim; elsewhere nothing): large temporaries
    of loading and packing otherwise stay in the process's resident set."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass

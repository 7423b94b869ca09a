"""Fault-injecting policies for reliability benchmarks (benchmarks/soak.py): a wrapper around a loaded model.

A fault is part of what the server serves, declared when it starts, never patched in from a client: a
policy of the config whose model is wrapped here. Requests that use that policy meet the fault; every
other request must not notice it (docs/reliability.md).

- ``OutOfMemory(every)``: every ``every``-th forward raises ``torch.OutOfMemoryError`` (what the CUDA
  allocator raises), so a request may stream a few tokens before it fails;
- ``NaNLogits()``: every forward returns NaN logits (a broken policy);
- ``Raises()``: every forward raises ``RuntimeError`` (a broken reward model).

``wrap(model, fault)`` keeps what the engine reads of a model: ``config``, ``generation_config``, the
parameters, and ``forward``'s signature (the engine picks the cache keyword from it).
"""

from __future__ import annotations

import functools
import threading

import torch


class Fault:
    name = "fault"

    def __init__(self):
        self.calls = 0
        self.injected = 0
        self._lock = threading.Lock()  # reward models are scored on a helper thread

    def tick(self) -> int:
        with self._lock:
            self.calls += 1
            return self.calls

    def before(self) -> None:
        """Runs before the real forward (may raise)."""

    def after(self, out):
        """Runs on the real forward's output (may change it)."""
        return out


class OutOfMemory(Fault):
    name = "oom"

    def __init__(self, every: int = 3):
        super().__init__()
        self.every = every

    def before(self) -> None:
        if self.tick() % self.every == 0:
            self.injected += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by "
                                         "benchmarks/faults.py)")


class NaNLogits(Fault):
    name = "nan"

    def after(self, out):
        self.tick()
        self.injected += 1
        out.logits = torch.full_like(out.logits, float("nan"))
        return out


class Raises(Fault):
    name = "raises"

    def before(self) -> None:
        self.tick()
        self.injected += 1
        raise RuntimeError("reward model failure (injected by benchmarks/faults.py)")


class FaultyModel(torch.nn.Module):
    """``inner`` with ``fault`` applied to every forward."""

    def __init__(self, inner: torch.nn.Module, fault: Fault):
        super().__init__()
        self.inner = inner
        self.fault = fault
        self.config = inner.config
        self.generation_config = getattr(inner, "generation_config", None)

        @functools.wraps(inner.forward)  # the same signature: the engine reads the cache keyword from it
        def forward(*args, **kwargs):
            fault.before()
            return fault.after(inner(*args, **kwargs))

        self.forward = forward


def wrap(model: torch.nn.Module, fault: Fault) -> FaultyModel:
    return FaultyModel(model, fault)

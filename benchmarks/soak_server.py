"""The server that benchmarks/soak.py drives: the tiny test family plus three fault-injecting policies.

    python -m benchmarks.soak_server --models .cache/soak-models --port 8123

Serves the same names as the test suite's tiny config (tests/conftest.py; the fuzz corpus of
tests/strategies.py uses them) and, wrapped by benchmarks/faults.py when the server starts:

| policy      | what it is                                   | fault                                   |
|-------------|----------------------------------------------|-----------------------------------------|
| `oom`       | a causal policy of the family (own weights)  | every forward raises out-of-memory (a transient one is now retried row by row and succeeds) |
| `nan`       | a causal policy of the family (own weights)  | NaN logits                              |
| `rm_broken` | a reward model                               | every forward raises                    |

Each fault policy has weights of its own, so no other policy shares its (wrapped) model.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

FAMILY = ["base", "dpo", "safe", "small", "oom", "nan"]
FAULTS = {"oom": ("OutOfMemory", {"every": 1}), "nan": ("NaNLogits", {}), "rm_broken": ("Raises", {})}


def build_models(root: Path) -> Path:
    """The tiny models (built once into ``root``; about 5 s)."""
    from policymix.tiny_models import build_family, build_policy, build_tokenizer

    if (root / "ready").is_file():
        return root
    root.mkdir(parents=True, exist_ok=True)
    build_family(root, FAMILY, vocab_pad=5)
    build_policy(root / "rm", root / "tokenizer", seed=99, reward=True)
    build_policy(root / "rm_broken", root / "tokenizer", seed=98, reward=True)
    build_tokenizer(root / "tok2", vocab_size=300)
    build_policy(root / "other", root / "tok2", seed=7)
    (root / "ready").write_text("ok\n")
    return root


def soak_config(root: Path, max_num_seqs: int = 16, max_queue: int = 64, max_model_len: int = 256):
    from policymix.config import parse_config

    p = {name: {"path": str(root / name)} for name in ("base", "small", "oom", "nan", "other")}
    p.update({
        "dpo": {"path": str(root / "dpo"), "reference": "base", "beta": 0.1},
        "safe": {"path": str(root / "safe"), "reference": "base", "beta": 0.1, "protected": True},
        "formal": {"path": str(root / "base"), "system_prompt": "Answer formally."},
        "guarded": {"path": str(root / "base"), "system_prompt": "Answer safely and kindly.", "reference": "base",
                    "beta": 0.1, "protected": True},
        "rm": {"path": str(root / "rm"), "kind": "reward"},
        "rm_broken": {"path": str(root / "rm_broken"), "kind": "reward"},
    })
    return parse_config({
        "policies": p,
        "mixtures": {"dpo-soft": {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.2},
                     "balanced": {"weights": {"dpo": 0.5, "formal": 0.5}}},
        "server": {"max_num_seqs": max_num_seqs, "max_queue": max_queue, "max_model_len": max_model_len,
                   "max_best_of": 4},
    })


def build_engine(root: Path, **server):
    """A NativeEngine over the soak config, the fault policies wrapped; returns (engine, config, faults)."""
    import torch

    from benchmarks import faults as F
    from policymix.engine.native import NativeEngine
    from policymix.registry import load_registry

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = soak_config(root, **server)
    registry = load_registry(cfg)
    injected = {}
    for name, (kind, kwargs) in FAULTS.items():
        fault = getattr(F, kind)(**kwargs)
        registry.policies[name].model = F.wrap(registry.policies[name].model, fault)
        injected[name] = fault
    return NativeEngine(registry), cfg, injected


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=".cache/soak-models", help="where the tiny models are built (once)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8123)
    ap.add_argument("--max-num-seqs", type=int, default=16)
    ap.add_argument("--max-queue", type=int, default=64)
    args = ap.parse_args(argv)

    import uvicorn

    from policymix.api import build_app

    engine, cfg, _ = build_engine(build_models(Path(args.models)), max_num_seqs=args.max_num_seqs,
                                  max_queue=args.max_queue)
    uvicorn.run(build_app(engine, cfg, env={}, shutdown_s=10.0), host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

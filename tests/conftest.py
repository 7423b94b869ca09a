"""Shared fixtures: a tiny tokenizer family built locally (no hub), loaded once per session."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

FAMILY = ["base", "dpo", "safe", "small"]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Four random Llama policies sharing one tokenizer (the lm_head padded by 5 rows), plus a reward model."""
    from policymix.tiny_models import build_family, build_policy

    root = tmp_path_factory.mktemp("tiny")
    build_family(root, FAMILY, vocab_pad=5)
    build_policy(root / "rm", root / "tokenizer", seed=99, reward=True)
    # a second family: another tokenizer, so mixing across families can be refused
    from policymix.tiny_models import build_tokenizer

    build_tokenizer(root / "tok2", vocab_size=300)
    build_policy(root / "other", root / "tok2", seed=7)
    return root


@pytest.fixture(scope="session")
def tiny_config(tiny_dir):
    from policymix.config import parse_config

    return parse_config({
        "policies": {
            "base": {"path": str(tiny_dir / "base")},
            "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1},
            "safe": {"path": str(tiny_dir / "safe"), "reference": "base", "beta": 0.1, "protected": True},
            "small": {"path": str(tiny_dir / "small")},
            "formal": {"path": str(tiny_dir / "base"), "system_prompt": "Answer formally."},
            "rm": {"path": str(tiny_dir / "rm"), "kind": "reward"},
            "other": {"path": str(tiny_dir / "other")},
        },
        "mixtures": {
            "dpo-soft": {"reference": "base", "policy": "dpo", "beta": 0.1, "beta_prime": 0.2},
            "balanced": {"weights": {"dpo": 0.5, "formal": 0.5}},
        },
        "server": {"max_num_seqs": 32, "max_queue": 64},
    })


@pytest.fixture(scope="session")
def tiny_registry(tiny_config):
    from policymix.registry import load_registry

    return load_registry(tiny_config)

"""Seconds-long smoke runs of the engine-side benchmarks, so they do not rot (numbers are not judged)."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks.engine_bench import mixing_overhead, registry_from_models, run_engine


def test_engine_bench_counts_tokens(tiny_registry):
    pols = tiny_registry.policies
    reg = registry_from_models({n: pols[n].model for n in ("base", "dpo", "small")}, pols["base"].tokenizer)
    prompts = [pols["base"].tokenizer(p).input_ids for p in ("Hello", "Paris is", "A policy")]
    run = run_engine(reg, {"base": 0.5, "dpo": 0.5}, prompts, 5, 2)
    assert run.tokens == 15 and run.requests == 3 and run.wall_s > 0
    assert set(run.timers) >= {"forward:base", "forward:dpo", "mix", "sample", "detok", "schedule"}
    ov = mixing_overhead(reg, ["base", "dpo", "small"], prompts, 4, 3)
    assert ov["K"] == 3 and ov["ratio"] > 0 and len(ov["alone_tok_s"]) == 3


def test_gpu_check_dry_run_on_cpu(tmp_path, monkeypatch):
    """The GPU check script runs end to end (tiny shape on CPU when no GPU is present)."""
    import benchmarks.gpu_check as g

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: run benchmarks/gpu_check.sh itself")
    monkeypatch.setenv("OUT", str(tmp_path))
    assert g.main() == 0
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["device"] == "cpu" and data["rows"]
    assert {"single_tok_s", "mixture_tok_s", "ratio_mix_over_sum"} <= set(data["rows"][0])
    adapters = data["adapters"]["tiny"]  # the base + 3 adapters as lanes ran (peft is in the lab extra)
    assert "error" not in adapters and (adapters.get("skipped") or adapters["c1"]["mixture_tok_s"] > 0)


def test_cpu_linear_benchmark_runs(tiny_dir, tmp_path):
    """benchmarks/cpu_linear.py end to end on a tiny model: both settings serve, the packed one is packed."""
    import benchmarks.cpu_linear as b

    out = tmp_path / "cpu_linear"
    assert b.main(["--path", str(tiny_dir / "base"), "--tokens", "3", "--concurrency", "1,2", "--repeats", "1",
                   "--out", str(out)]) == 0
    data = json.loads(out.with_suffix(".json").read_text())
    assert [r["concurrency"] for r in data["rows"]] == [1, 2]
    assert all(r["torch_tok_s"] > 0 and r["onednn_tok_s"] > 0 for r in data["rows"])
    from policymix.engine.cpu_linear import can_pack

    assert (data["meta"]["linear layers packed"] > 0) == can_pack("cpu", torch.float32)


def test_scoring_and_guidance_benchmarks_run(tiny_registry):
    """The pieces of benchmarks/scoring.py and benchmarks/guidance.py on the tiny models (they check their
    own outputs: every prompt scored, every guided request complete)."""
    from benchmarks import guidance, scoring
    from policymix.engine.core import EngineCore

    V = tiny_registry.policies["base"].vocab_size
    prompts = scoring._prompts(3, 20, V)
    assert scoring.engine_scoring_s(tiny_registry, {"base": 1.0, "dpo": -0.5}, prompts) > 0
    assert scoring.hf_scoring_s(tiny_registry.policies["base"].model, prompts, V) > 0
    gaps = scoring.stream_gaps(EngineCore(tiny_registry), tiny_registry, 2, 12, scoring._prompts(1, 60, V)[0])
    assert len(gaps) == 2 * 11
    mixture = {"guidance": {"policy": "base", "scale": 1.5, "negative_prompt": guidance.NEGATIVE}}
    assert guidance.run(tiny_registry, mixture, [guidance.PROMPT] * 2, 5) > 0

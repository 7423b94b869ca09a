"""lm-evaluation-harness, the peer itself: its `local-completions` model against a live server and its own
`hf` model on the same weights give the same accuracy and per-choice loglikelihoods (within 1e-3)."""

from __future__ import annotations

import json
import os

import pytest

pytest.importorskip("lm_eval", reason="lm-eval is in the test extras (pip install -e '.[test]')")

from api_helpers import LiveServer  # noqa: E402

TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""

WORDS = "the cat dog sat on a mat red blue green house tree runs quickly slowly over under big small".split()


def _items(n: int = 12) -> list[dict]:
    import random

    rng = random.Random(0)
    out = []
    for i in range(n):
        q = " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))
        choices = [" " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))) for _ in range(3)]
        out.append({"question": q, "choices": choices, "answer": i % 3})
    return out


def _by_item(result: dict) -> dict[tuple[int, int], float]:
    """(doc_id, choice) -> loglikelihood, from lm-eval's logged samples."""
    out = {}
    for s in result["samples"]["tiny_mc"]:
        for j, resp in enumerate(s["resps"]):
            out[(s["doc_id"], j)] = float(resp[0][0])
    return out


@pytest.mark.parametrize("backend", ["huggingface", "remote"])
def test_local_completions_equals_hf(tmp_path, monkeypatch, backend):
    """``remote``: lm-eval reads the tokenizer through the server (/tokenizer_info, /tokenize, /detokenize).
    Both models are told to start with BOS (their defaults differ: the API model's is no BOS)."""
    bos = True
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from policymix.api import build_app
    from policymix.config import parse_config
    from policymix.engine.native import NativeEngine
    from policymix.registry import load_registry
    from policymix.tiny_models import build_policy, build_tokenizer

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    build_tokenizer(tmp_path / "tok", vocab_size=400)
    model_dir = build_policy(tmp_path / "lm", tmp_path / "tok", seed=11)  # no padded lm_head rows: same vocab as hf
    data = tmp_path / "items.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in _items()))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "tiny_mc.yaml").write_text(TASK.format(data=data))
    tasks = TaskManager(include_path=str(tmp_path / "tasks"))
    # both models tokenize alike only when told the same BOS rule (their defaults differ)
    cfg = parse_config({"policies": {"lm": {"path": str(model_dir)}}})
    with LiveServer(build_app(NativeEngine(load_registry(cfg)), cfg, env={})) as srv:
        served = simple_evaluate(
            model="local-completions",
            model_args={"base_url": f"{srv.url}/v1/completions", "model": "lm", "tokenizer": str(model_dir),
                        "tokenizer_backend": backend, "num_concurrent": 1, "max_retries": 1,
                        "tokenized_requests": True, "add_bos_token": bos},
            tasks=["tiny_mc"], task_manager=tasks, log_samples=True)
    peer = simple_evaluate(model="hf", model_args={"pretrained": str(model_dir), "dtype": "float32",
                                                   "device": "cpu", "add_bos_token": bos},
                           tasks=["tiny_mc"], task_manager=tasks, log_samples=True, batch_size=1)
    ours, theirs = _by_item(served), _by_item(peer)
    assert len(ours) == len(theirs) == 36
    for key, ll in theirs.items():
        assert ours[key] == pytest.approx(ll, abs=1e-3), key
    assert served["results"]["tiny_mc"]["acc,none"] == peer["results"]["tiny_mc"]["acc,none"]
    print(f"lm-eval tiny_mc acc: server {served['results']['tiny_mc']['acc,none']:.3f}, "
          f"hf {peer['results']['tiny_mc']['acc,none']:.3f}; max |dll| "
          f"{max(abs(ours[k] - v) for k, v in theirs.items()):.2e} ({os.cpu_count()} cpus)")


def test_worked_example_evaluates_a_policy_and_a_mixture(tiny_registry, tiny_config):
    """clients/examples/lm_eval/run.sh (docs/api.md), on the test server's policy and named mixture."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from policymix.api import build_app
    from policymix.engine.native import NativeEngine

    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    script = Path(__file__).resolve().parents[1] / "clients" / "examples" / "lm_eval" / "run.sh"
    with LiveServer(build_app(NativeEngine(tiny_registry), tiny_config, env={})) as srv:
        env = {**os.environ, "POLICYMIX_URL": srv.url, "POLICYMIX_EVAL_MODELS": "base balanced",
               "LM_EVAL": f"{sys.executable} -m lm_eval"}
        out = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    tables = out.stdout.split("== ")[1:]
    assert [t.splitlines()[0] for t in tables] == ["base", "balanced"]
    assert all("|capitals|" in t.replace(" ", "") and "acc" in t for t in tables)

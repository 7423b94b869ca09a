"""The alignment lab: pairs validation, entanglement diagnostics against autograd, DPO runs on a tiny model."""

from __future__ import annotations

import csv
import json

import pytest

pytest.importorskip("trl", reason="the lab needs the `lab` extra: pip install -e '.[lab]'")
pytest.importorskip("peft", reason="the lab needs the `lab` extra: pip install -e '.[lab]'")

import torch  # noqa: E402

from policymix.lab import dpo  # noqa: E402
from policymix.lab.entanglement import COLUMNS, trainable_parameters  # noqa: E402
from policymix.lab.pairs import PairsError, load_pairs, write_pairs  # noqa: E402

PAIRS = [
    {"prompt": "Hello world! How are you today?", "chosen": "I am fine, thank you.",
     "rejected": "The weather is sunny and warm, friendly people walk in the park with their dogs and cats."},
    {"prompt": "What is the capital of France?", "chosen": "Paris is the capital of France.",
     "rejected": "The quick brown fox jumps over the lazy dog."},
    {"prompt": "Please answer formally and concisely.", "chosen": "Certainly.",
     "rejected": "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000."},
    {"prompt": "What is a policy?", "chosen": "A policy is a distribution over the next token.",
     "rejected": "Mixing policies combines their log probabilities; the reference model keeps them close."},
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    from policymix.tiny_models import build_family

    return build_family(tmp_path_factory.mktemp("lab_family"), ["base"])["base"]


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, PAIRS)
    return path


def _args(base, pairs, out, *extra):
    return dpo.build_parser().parse_args(["--base", str(base), "--pairs", str(pairs), "--out", str(out), *extra])


def _rows(out) -> list[dict]:
    with (out / "entanglement.csv").open(newline="") as f:
        return list(csv.DictReader(f))


# -- pairs validation --------------------------------------------------------------------------------


@pytest.mark.parametrize("line, problem", [
    (b'{"prompt": "p", "chosen": "c"}', "missing field 'rejected'"),
    (b'{"prompt": "p", "chosen": "  ", "rejected": "r"}', "field 'chosen' is empty"),
    (b'{"prompt": "p", "chosen": "caf\xe9", "rejected": "r"}', "not valid UTF-8"),
    (b'{"prompt": "p", "chosen": "c", "rejected": 3}', "field 'rejected' must be a string"),
    (b'{"prompt": "p", "chosen": "c", "rejected": "r"', "invalid JSON"),
    (b'["p", "c", "r"]', "expected a JSON object"),
    (b'{"prompt": "p", "chosen": "same", "rejected": "same"}', "identical"),
])
def test_bad_line_reported_with_number(tmp_path, line, problem):
    good = json.dumps(PAIRS[0]).encode()
    path = tmp_path / "bad.jsonl"
    path.write_bytes(b"\n".join([good, b"", line, good]) + b"\n")  # the bad record is on line 3
    with pytest.raises(PairsError) as info:
        load_pairs(path)
    assert [(p.line, problem in p.message) for p in info.value.problems] == [(3, True)]
    assert "line 3:" in info.value.message


def test_good_file_loads_and_keeps_extra_keys(tmp_path):
    path = tmp_path / "ok.jsonl"
    write_pairs(path, [dict(PAIRS[0], rule="concise"), PAIRS[1]])
    records = load_pairs(path)
    assert [r["prompt"] for r in records] == [PAIRS[0]["prompt"], PAIRS[1]["prompt"]]
    assert records[0]["rule"] == "concise"


def test_empty_file_is_refused(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(PairsError, match="no pairs"):
        load_pairs(path)


@pytest.mark.parametrize("line, problem", [
    (b'{"prompt": "p", "rejected": "r"}', "missing field 'chosen'"),
    (b'{"prompt": "", "chosen": "c", "rejected": "r"}', "field 'prompt' is empty"),
    (b'{"prompt": "\xff\xfe", "chosen": "c", "rejected": "r"}', "not valid UTF-8"),
])
def test_training_on_bad_pairs_stops_before_first_step(tmp_path, capsys, line, problem):
    path = tmp_path / "bad.jsonl"
    path.write_bytes(json.dumps(PAIRS[0]).encode() + b"\n" + line + b"\n")
    out = tmp_path / "out"
    # The base does not exist: reaching the model loader would fail differently. Nothing may be written.
    code = dpo.main(["--base", str(tmp_path / "no-such-model"), "--pairs", str(path), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == dpo.EXIT_BAD_INPUT
    assert "line 2:" in err and problem in err
    assert not out.exists()


# -- diagnostics against autograd --------------------------------------------------------------------


def _logp_and_grad(model, params, prompt_ids: list[int], answer_ids: list[int]):
    """Reference: log pi(answer | prompt) of one unpadded sequence and its gradient, straight from autograd."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0].float()
    logp = sum(torch.log_softmax(logits[t - 1], -1)[ids[0, t]] for t in range(len(prompt_ids), ids.shape[1]))
    grads = torch.autograd.grad(logp, params, allow_unused=True)
    flat = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)])
    return float(logp.detach()), flat


def test_norms_and_inner_products_match_autograd(tiny_base, pairs_file, tmp_path):
    out = tmp_path / "out"
    args = _args(tiny_base, pairs_file, out, "--max-steps", "1", "--batch-size", "4", "--lora-r", "4")
    run = dpo.build_trainer(args, PAIRS)
    model = run.trainer.model
    params = trainable_parameters(model)
    expected = []  # per dataset pair, at the parameters before the step
    for ex in run.trainer.train_dataset:
        lw, gw = _logp_and_grad(model, params, ex["prompt_ids"], ex["chosen_ids"])
        ll, gl = _logp_and_grad(model, params, ex["prompt_ids"], ex["rejected_ids"])
        expected.append({"logp_w": lw, "logp_l": ll, "norm_w": float(gw.norm()), "norm_l": float(gl.norm()),
                         "inner": float(gw @ gl)})
    dpo.run(run, args, PAIRS)

    rows = _rows(out)
    assert len(rows) == len(PAIRS) and list(rows[0]) == COLUMNS
    for row in rows:  # the batch order is the sampler's: match each row to its pair by log pi(y_w)
        ref = min(expected, key=lambda e: abs(e["logp_w"] - float(row["logp_w"])))
        for key in ("logp_w", "logp_l", "norm_w", "norm_l", "inner"):
            assert float(row[key]) == pytest.approx(ref[key], rel=1e-4, abs=1e-4), key
    assert sorted(round(float(r["logp_w"]), 3) for r in rows) == sorted(round(e["logp_w"], 3) for e in expected)


@pytest.mark.parametrize("normalized, lr", [(False, "2e-4"), (True, "2e-2")])  # steps moving log pi by ~0.1-1
def test_first_order_predictions_match_measured_changes(tiny_base, pairs_file, tmp_path, normalized, lr):
    # Batch of one pair with plain SGD and no clipping: the step taken is the pair-alone step of the lecture,
    # so the pair-alone prediction, the actual step's first order and the measured change must all agree.
    out = tmp_path / "out"
    extra = ["--normalized-gradient"] if normalized else []
    args = _args(tiny_base, pairs_file, out, "--max-steps", "4", "--batch-size", "1", "--optim", "sgd",
                 "--lr", lr, "--scheduler", "constant", "--max-grad-norm", "0", "--no-lora", *extra)
    meta = dpo.run(dpo.build_trainer(args, PAIRS), args, PAIRS)
    rows = _rows(out)
    assert len(rows) == 4 and meta["normalized_gradient"] is normalized
    for row in rows:
        for side in ("w", "l"):
            pred, step, meas = (float(row[f"{k}_d{side}"]) for k in ("pred", "step", "meas"))
            assert abs(meas) > 1e-3, "the step is too small to measure"
            assert step == pytest.approx(pred, rel=1e-3), "the update is not the (normalized) DPO gradient"
            assert abs(pred - meas) <= 0.10 * abs(meas), f"first order off by more than 10%: {pred} vs {meas}"
        if normalized:  # the paper's point: to first order a normalized pair step is always the ideal case
            assert row["case_pred"] == "ideal"
            assert float(row["pred_dw"]) >= 0 >= float(row["pred_dl"])


# -- a LoRA run end to end ---------------------------------------------------------------------------


def test_lora_run_writes_policy_metadata_and_diagnostics(tiny_base, pairs_file, tmp_path, capsys):
    out = tmp_path / "policy"
    code = dpo.main(["--base", str(tiny_base), "--pairs", str(pairs_file), "--out", str(out), "--beta", "0.2",
                     "--max-steps", "4", "--batch-size", "2", "--lr", "5e-3", "--lora-r", "4", "--save-steps", "2"])
    assert code == 0
    assert "ideal case measured" in capsys.readouterr().out
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "entanglement.csv", "entanglement_summary.json"):
        assert (out / name).is_file(), name
    assert (out / "entanglement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "checkpoint-4").is_dir()
    meta = json.loads((out / "policymix.json").read_text())
    assert meta["beta"] == 0.2 and meta["reference"] == str(tiny_base) and meta["steps"] == 4
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_base)
    rows = _rows(out)
    assert sorted({int(r["step"]) for r in rows}) == [1, 2, 3, 4] and len(rows) == 8
    assert sum(float(r["margin"]) > 0 for r in rows if int(r["step"]) == 4) == 2  # training moved the margins

    # The saved adapter is the trained policy: it prefers the chosen answers more than the base does.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from policymix.lab.entanglement import sequence_logps

    run = dpo.build_trainer(_args(tiny_base, pairs_file, tmp_path / "probe"), PAIRS)
    batch = run.trainer.data_collator(list(run.trainer.train_dataset))
    seqs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    base = AutoModelForCausalLM.from_pretrained(tiny_base)
    base_logp = sequence_logps(base, *seqs)
    tuned_logp = sequence_logps(PeftModel.from_pretrained(base, out), *seqs)
    n = len(PAIRS)
    margin = (tuned_logp[:n] - base_logp[:n]) - (tuned_logp[n:] - base_logp[n:])
    assert bool((margin > 0).all())


def test_resume_continues_from_checkpoint(tiny_base, pairs_file, tmp_path):
    out = tmp_path / "policy"
    common = ["--max-grad-norm", "0", "--lora-r", "4", "--batch-size", "2", "--save-steps", "2"]
    assert dpo.main(["--base", str(tiny_base), "--pairs", str(pairs_file), "--out", str(out), "--max-steps", "2",
                     *common]) == 0
    assert dpo.main(["--base", str(tiny_base), "--pairs", str(pairs_file), "--out", str(out), "--max-steps", "3",
                     "--resume", *common]) == 0
    meta = json.loads((out / "policymix.json").read_text())
    assert meta["steps"] == 3
    assert [int(r["step"]) for r in _rows(out)] == [1, 1, 2, 2, 3, 3]  # no step logged twice, none lost

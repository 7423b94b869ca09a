"""Autoregressive reward models (GenARM): the loss, `policymix train arm`, and the `mixture.arm` recipe.

The loss is checked against an independent computation (a per-position loop over unpadded sequences,
the Bradley-Terry formula written with math); a trained ARM is served as an adapter of its base and
the recipe's greedy tokens are checked against the explicit weights it compiles to, through a live
server, and against a no-cache oracle of the mixture.
"""

from __future__ import annotations

import json
import math

import pytest

pytest.importorskip("trl", reason="the lab needs the `lab` extra: pip install -e '.[lab]'")
pytest.importorskip("peft", reason="the lab needs the `lab` extra: pip install -e '.[lab]'")

import torch  # noqa: E402

from policymix.config import GuardSpec, Recipe, parse_config  # noqa: E402
from policymix.errors import GuardRefusal, RecipeError  # noqa: E402
from policymix.lab import arm, dpo  # noqa: E402
from policymix.lab.arm_trainer import arm_loss, summed_logps  # noqa: E402
from policymix.lab.pairs import write_pairs  # noqa: E402
from policymix.mixing.guard import check_recipe  # noqa: E402
from policymix.mixing.recipes import PolicyInfo, compile_recipe  # noqa: E402

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


@pytest.fixture()
def pairs_file(tmp_path):
    path = tmp_path / "pairs.jsonl"
    write_pairs(path, PAIRS)
    return path


@pytest.fixture(scope="module")
def trained_arm(tiny_dir, tmp_path_factory):
    """An ARM (LoRA) trained on the tiny family's base: the folder and what `train arm` printed."""
    root = tmp_path_factory.mktemp("arm")
    pairs = root / "pairs.jsonl"
    write_pairs(pairs, PAIRS)
    out = root / "arm"
    code = arm.main(["--base", str(tiny_dir / "base"), "--pairs", str(pairs), "--out", str(out), "--beta", "0.5",
                     "--max-steps", "6", "--batch-size", "2", "--lr", "2e-2", "--lora-r", "4", "--save-steps", "3",
                     "--diag-every", "2"])
    assert code == 0
    return out


def _args(base, pairs, out, *extra):
    return arm.build_parser().parse_args(["--base", str(base), "--pairs", str(pairs), "--out", str(out), *extra])


def _independent_logp(model, prompt_ids: list[int], answer_ids: list[int]) -> float:
    """log pi(answer | prompt): one unpadded forward, a loop over the answer's positions."""
    ids = torch.tensor([prompt_ids + answer_ids])
    logits = model(input_ids=ids).logits[0].double()
    return sum(float(torch.log_softmax(logits[t - 1], -1)[ids[0, t]]) for t in range(len(prompt_ids), ids.shape[1]))


# -- the loss ----------------------------------------------------------------------------------------


@torch.no_grad()
def test_loss_is_bradley_terry_over_summed_logprobs(tiny_dir, pairs_file, tmp_path):
    beta = 0.7
    run = dpo.build_trainer(_args(tiny_dir / "base", pairs_file, tmp_path / "out", "--beta", str(beta),
                                  "--lora-r", "4"), PAIRS, kind="arm")
    trainer, model = run.trainer, run.trainer.model
    # the adapter starts as the base (LoRA B = 0): move it so the check is not at a special point
    torch.manual_seed(0)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
    model.eval()
    examples = list(trainer.train_dataset)
    batch = trainer.data_collator(examples)  # right-padded [chosen; rejected], as in training
    loss = trainer.compute_loss(model, batch)

    expect, margins = 0.0, []
    for ex in examples:
        w = _independent_logp(model, ex["prompt_ids"], ex["chosen_ids"])
        l = _independent_logp(model, ex["prompt_ids"], ex["rejected_ids"])
        margins.append(w - l)
        expect += math.log1p(math.exp(-beta * (w - l))) / len(examples)  # -log sigmoid(beta * margin)
    assert float(loss) == pytest.approx(expect, rel=1e-5, abs=1e-6)
    logps = summed_logps(model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    n = len(examples)
    assert [float(x) for x in logps[:n] - logps[n:]] == pytest.approx(margins, rel=1e-5, abs=1e-4)
    # no reference anywhere: the summed log-probabilities of the tokens, not ratios to another model
    assert margins != pytest.approx([0.0] * n, abs=1e-3)
    # the metric TRL logs as rewards/margins is beta times that margin
    assert trainer._metrics["eval"]["rewards/margins"][-1] == pytest.approx(beta * sum(margins) / n, rel=1e-4)


def test_arm_loss_function():
    w, l = torch.tensor([-3.0, -10.0]), torch.tensor([-5.0, -2.0])
    expect = (math.log1p(math.exp(-0.5 * 2.0)) + math.log1p(math.exp(-0.5 * -8.0))) / 2
    assert float(arm_loss(w, l, 0.5)) == pytest.approx(expect, rel=1e-6)


# -- `policymix train arm` ---------------------------------------------------------------------------


def test_train_arm_writes_kind_arm_metadata_and_diagnostics(trained_arm, tiny_dir):
    out = trained_arm
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer_config.json",
                 "entanglement.csv", "entanglement_summary.json"):
        assert (out / name).is_file(), name
    assert (out / "entanglement.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = json.loads((out / dpo.METADATA_FILE).read_text())
    assert meta["kind"] == "arm" and meta["beta"] == 0.5 and meta["loss"] == "arm-bradley-terry"
    assert meta["base"] == str(tiny_dir / "base") and "reference" not in meta and meta["steps"] == 6
    from policymix.registry import METADATA_FILE

    assert METADATA_FILE == dpo.METADATA_FILE  # the file the registry reads beta from

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
    tok_run = dpo.build_trainer(_args(tiny_dir / "base", out.parent / "pairs.jsonl", out.parent / "probe"), PAIRS,
                                kind="arm")  # its collator makes the batch exactly as training did
    batch = tok_run.trainer.data_collator(list(tok_run.trainer.train_dataset))
    seqs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    with torch.no_grad():
        before = summed_logps(base, *seqs)
        after = summed_logps(PeftModel.from_pretrained(base, out), *seqs)
    n = len(PAIRS)
    # the trained ARM rewards the chosen answers over the rejected ones more than the untrained base does
    assert float((after[:n] - after[n:]).mean()) > float((before[:n] - before[n:]).mean())
    # diagnostics against a zero reference: the CSV's margin is the summed log-probabilities' difference
    import csv

    with (out / "entanglement.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert sorted({int(r["step"]) for r in rows}) == [1, 3, 5] and len(rows) == 6
    for r in rows:
        assert float(r["margin"]) == pytest.approx(float(r["logp_w"]) - float(r["logp_l"]), abs=1e-4)


def test_cli_train_arm_refuses_bad_pairs_before_loading(tmp_path, capsys):
    from policymix.cli import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "chosen": "c"}\n')
    code = main(["train", "arm", "--base", str(tmp_path / "no-model"), "--pairs", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == dpo.EXIT_BAD_INPUT and "policymix train arm: error" in err and "line 1:" in err
    assert not (tmp_path / "o").exists()
    assert main(["train", "ppo"]) == 2 and "`dpo` or `arm`" in capsys.readouterr().err


# -- the recipe --------------------------------------------------------------------------------------

INFOS = {
    "base": PolicyInfo("base", "causal", 0),
    "arm": PolicyInfo("arm", "causal", 0, beta=0.5),
    "arm2": PolicyInfo("arm2", "causal", 0),
    "safe_arm": PolicyInfo("safe_arm", "causal", 0, reference="base", protected=True),
    "rm": PolicyInfo("rm", "reward", 0),
    "other": PolicyInfo("other", "causal", 1),
}
MIXTURES = {"guided": Recipe.model_validate({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.25}})}


def comp(recipe, model="base"):
    return compile_recipe(recipe, model, INFOS, MIXTURES)


@pytest.mark.parametrize("arms, beta", [({"arm": 1.0}, 0.5), ({"arm": 0.6, "arm2": -0.4}, 0.2),
                                        ({"arm": 2.0, "base": 1.0}, 4.0)])
def test_arm_recipe_is_the_weights_it_compiles_to(arms, beta):
    c = comp({"arm": {"base": "base", "arms": arms, "beta": beta}})
    expect = {"base": 1.0}
    for name, w in arms.items():
        expect[name] = expect.get(name, 0.0) + w / beta
    assert c.form == "arm" and c.weights == pytest.approx(expect) and beta in c.betas
    assert comp({"weights": expect}).weights == pytest.approx(c.weights)


def test_named_arm_mixture_by_model_and_by_field():
    assert comp(None, "guided").weights == pytest.approx({"base": 1.0, "arm": 4.0})
    assert comp("guided").mixture_name == "guided"
    cfg = parse_config({"policies": {"base": {"path": "b"}, "arm": {"path": "a"}},
                        "mixtures": {"guided": {"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}}}})
    assert cfg.mixtures["guided"].arm.beta == 0.5


@pytest.mark.parametrize("recipe, field", [
    ({"arm": {"base": "base", "arms": {"x": 1.0}, "beta": 0.5}}, "mixture.arm.arms.x"),
    ({"arm": {"base": "nope", "arms": {"arm": 1.0}, "beta": 0.5}}, "mixture.arm.base"),
    ({"arm": {"base": "base", "arms": {"rm": 1.0}, "beta": 0.5}}, "mixture.arm.arms.rm"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.0}}, "mixture.arm.beta"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": -1.0}}, "mixture.arm.beta"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": float("nan")}}, "mixture.arm.beta"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": float("inf")}}, "mixture.arm.beta"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}}}, "mixture.arm.beta"),
    ({"arm": {"base": "base", "arms": {"arm": float("nan")}, "beta": 0.5}}, "mixture.arm.arms.arm"),
    ({"arm": {"base": "base", "arms": {"arm": "heavy"}, "beta": 0.5}}, "mixture.arm.arms.arm"),
    ({"arm": {"base": "base", "arms": {}, "beta": 0.5}}, "mixture.arm.arms"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5, "gamma": 1}}, "mixture.arm.gamma"),
    ({"arm": {"base": "base", "arms": {"other": 1.0}, "beta": 0.5}}, "mixture"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}, "beta": 0.1}, "mixture.beta"),
    ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}, "weights": {"arm": 1.0}}, "mixture"),
])
def test_bad_arm_recipes_name_the_field(recipe, field):
    with pytest.raises(RecipeError) as err:
        comp(recipe)
    assert err.value.param == field and err.value.status == 400


def test_guard_refuses_a_protected_arm_with_negative_weight():
    guard = GuardSpec()
    inverted = comp({"arm": {"base": "base", "arms": {"arm": 1.0, "safe_arm": -0.5}, "beta": 1.0}})
    with pytest.raises(GuardRefusal) as err:
        check_recipe(inverted, INFOS, guard)
    assert err.value.status == 403 and "safe_arm" in err.value.message
    check_recipe(inverted, INFOS, guard, allow_inversion=True)  # a lab key may
    check_recipe(comp({"arm": {"base": "base", "arms": {"safe_arm": 0.5}, "beta": 1.0}}), INFOS, guard)
    with pytest.raises(GuardRefusal, match="beta bounds"):  # the decoding beta is bounded like DeRa's
        check_recipe(comp({"arm": {"base": "base", "arms": {"arm": 1e-6}, "beta": 1e-5}}), INFOS, guard)
    with pytest.raises(GuardRefusal, match="weight bound"):  # 1 / beta past max_abs_weight
        check_recipe(comp({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.01}}), INFOS, guard)


# -- a trained ARM served: the recipe through a live server equals its explicit weights ---------------


@pytest.fixture(scope="module")
def arm_config(tiny_dir, trained_arm):
    return parse_config({
        "policies": {
            "base": {"path": str(tiny_dir / "base")},
            "arm": {"path": str(tiny_dir / "base"), "adapter": str(trained_arm)},
            "safe_arm": {"path": str(tiny_dir / "base"), "adapter": str(trained_arm), "protected": True,
                         "reference": "base"},
        },
        "mixtures": {"guided": {"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}}},
    })


@pytest.fixture(scope="module")
def arm_registry(arm_config):
    from policymix.registry import load_registry

    return load_registry(arm_config)


@pytest.fixture(scope="module")
def arm_server(arm_registry, arm_config):
    from api_helpers import LiveServer
    from policymix.api import build_app
    from policymix.engine.native import NativeEngine

    with LiveServer(build_app(NativeEngine(arm_registry), arm_config, env={})) as srv:
        yield srv


def test_served_arm_reads_its_beta(arm_registry):
    assert arm_registry.policies["arm"].beta == 0.5  # from policymix.json next to the adapter


def test_arm_recipe_greedy_tokens_equal_explicit_weights_live(arm_server):
    import openai

    sdk = openai.OpenAI(base_url=f"{arm_server.url}/v1", api_key="none", max_retries=0, timeout=120)
    recipes = {
        "arm": {"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}},
        "weights": {"weights": {"base": 1.0, "arm": 2.0}},
        "named": "guided",
        "base": {"weights": {"base": 1.0}},
    }
    out = {}
    for name, mixture in recipes.items():
        r = sdk.completions.create(model="base", prompt="Hello world", max_tokens=16, temperature=0, logprobs=1,
                                   extra_body={"mixture": mixture, "ignore_eos": True})
        out[name] = (r.choices[0].logprobs.tokens, r.choices[0].logprobs.token_logprobs,
                     r.model_extra["policymix"]["weights"])
    assert out["arm"][2] == pytest.approx({"base": 1.0, "arm": 2.0}) == out["named"][2]
    assert out["arm"][0] == out["weights"][0] == out["named"][0]
    assert out["arm"][1] == pytest.approx(out["weights"][1], abs=1e-6)
    # the guidance moves the distribution away from the base alone: the equality above is not vacuous
    assert out["arm"][1] != pytest.approx(out["base"][1], abs=1e-3)
    # bad recipes over HTTP: 400 naming the field; a protected ARM subtracted: 403
    import httpx

    for mixture, field in ((({"arm": {"base": "base", "arms": {"x": 1.0}, "beta": 0.5}}), "mixture.arm.arms.x"),
                           ({"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0}}, "mixture.arm.beta")):
        resp = httpx.post(f"{arm_server.url}/v1/completions", timeout=60,
                          json={"model": "base", "prompt": "x", "max_tokens": 2, "mixture": mixture})
        assert resp.status_code == 400 and resp.json()["error"]["param"] == field
    resp = httpx.post(f"{arm_server.url}/v1/completions", timeout=60, json={
        "model": "base", "prompt": "x", "max_tokens": 2,
        "mixture": {"arm": {"base": "base", "arms": {"arm": 1.0, "safe_arm": -1.0}, "beta": 1.0}}})
    assert resp.status_code == 403 and resp.json()["error"]["code"] == "mixing_guard"


@torch.no_grad()
def test_arm_recipe_matches_no_cache_oracle(arm_registry):
    from engine_helpers import make_request, oracle_mixed_logprobs, run_until_done, submit
    from policymix.engine.core import EngineCore

    core = EngineCore(arm_registry)
    recipe = {"arm": {"base": "base", "arms": {"arm": 1.0}, "beta": 0.5}}
    col = submit(core, make_request(core, "base", recipe, "Hello world", max_tokens=8, temperature=0,
                                    ignore_eos=True, logprobs=5))
    run_until_done(core, [col])
    state = core.render(make_request(core, "base", recipe, "Hello world"))
    assert state.weights == pytest.approx({"base": 1.0, "arm": 2.0})
    out = []
    for ev in col.events:
        expect = oracle_mixed_logprobs(arm_registry, state.weights, state.prompts, out)
        assert ev.token_id == int(torch.argmax(expect))
        assert ev.logprob == pytest.approx(float(expect[ev.token_id]), abs=1e-4)
        out.append(ev.token_id)


# -- the report command --------------------------------------------------------------------------------


def test_arm_report_runs_end_to_end_on_the_tiny_family(tiny_dir, tmp_path):
    from policymix.lab import arm_report

    out = tmp_path / "docs"
    argv = ["--base", str(tiny_dir / "base"), "--work", str(tmp_path / "work"), "--out-dir", str(out),
            "--steps", "1", "--batch-size", "2", "--prompts", "18", "--max-tokens", "3", "--diag-every", "1",
            "--betas", "1,0.5", "--arm-betas", "0.5,2"]
    assert arm_report.main(argv) == 0
    report = json.loads((out / "arm.json").read_text())
    assert report["settings"]["held_pairs"] == 25 and report["accuracy"]["pairs"] == 25
    assert set(report["accuracy"]) == {"base", "arm-b0.5", "arm-b2", "dpo_implicit", "pairs"}
    assert list(report["results"]) == ["base", "DPO-concise", "arm-b0.5, beta=1", "arm-b0.5, beta=0.5",
                                       "arm-b2, beta=0.5"]
    assert report["results"]["arm-b0.5, beta=0.5"]["weights"] == {"base": 1.0, "arm-b0.5": 2.0}
    assert all(len(r["answers"]) == 18 for r in report["results"].values())
    assert len(set(report["prompts"])) == 18 and report["prompts"][:16] == arm_report.EVAL_PROMPTS
    assert not any(t["reused"] for t in report["timings"]["train"].values())
    meta = json.loads((tmp_path / "work" / "arm-concise-b2" / "policymix.json").read_text())
    assert meta["kind"] == "arm" and meta["beta"] == 2.0
    md = (out / "arm.md").read_text()
    assert "| arm-b0.5, beta=0.5 | base: 1, arm-b0.5: 2 |" in md and "## Held-out pairs (25 pairs)" in md
    for png in ("arm.png", "entanglement-concise-arm.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (out / "arm.md").unlink()
    assert arm_report.main(["--out-dir", str(out), "--render-only"]) == 0 and (out / "arm.md").read_text() == md
    train = [json.loads(x)["prompt"] for x in (tmp_path / "work" / "train.jsonl").read_text().splitlines()]
    assert not set(train) & set(report["prompts"])  # no prompt of the generation was trained on

    # a second run reuses the trained folders (same settings) and measures the same
    assert arm_report.main(argv) == 0
    again = json.loads((out / "arm.json").read_text())
    assert all(t["reused"] for t in again["timings"]["train"].values())
    assert again["accuracy"] == report["accuracy"]
    assert {k: r["answers"] for k, r in again["results"].items()} == {k: r["answers"] for k, r in report["results"].items()}
    # other settings train again
    assert arm_report.main([*argv[:-2], "--arm-betas", "0.5", "--lr", "1e-3"]) == 0
    third = json.loads((out / "arm.json").read_text())
    assert not any(t["reused"] for t in third["timings"]["train"].values())

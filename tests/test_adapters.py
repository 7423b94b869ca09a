"""LoRA adapters served unmerged, as lanes of their base's forward (adapters.py, registry, runner).

The oracle is independent of the engine: PEFT-merged copies of each adapter (``merge_and_unload``), each
run in full without a cache; the engine runs the base once per step with per-row adapters.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

peft = pytest.importorskip("peft", reason="peft is not installed (make install-lab installs it)")

from engine_helpers import full_logprobs, make_request, run_until_done, submit  # noqa: E402
from policymix.config import parse_config  # noqa: E402
from policymix.engine.core import EngineCore  # noqa: E402
from policymix.engine.protocol import SpeculativeSpec  # noqa: E402
from policymix.errors import ConfigError  # noqa: E402
from policymix.registry import load_registry  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base_dir, out, rank, seed, **extra):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS, init_lora_weights=False, **extra)
    model = peft.get_peft_model(base, cfg)
    with torch.no_grad():  # adapters that move the distribution visibly
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(3.0)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a1": _adapter(tiny_dir / "base", root / "a1", 16, 1), "a2": _adapter(tiny_dir / "base", root / "a2", 4, 2)}


@pytest.fixture(scope="module")
def registry(tiny_dir, adapters):
    return load_registry(parse_config({"policies": {
        "base": {"path": str(tiny_dir / "base")},
        "a1": {"path": str(tiny_dir / "base"), "adapter": str(adapters["a1"]), "reference": "base", "beta": 0.1},
        "a2": {"path": str(adapters["a2"]), "reference": "base"},  # an adapter folder as the path
        "formal": {"path": str(tiny_dir / "base"), "system_prompt": "Answer formally."},
        "small": {"path": str(tiny_dir / "small")},
    }, "server": {"max_num_seqs": 32}}))


@pytest.fixture(scope="module")
def merged(tiny_dir, adapters):
    """Independent copies: the base, and each adapter merged into a fresh base."""
    from transformers import AutoModelForCausalLM

    out = {"base": AutoModelForCausalLM.from_pretrained(tiny_dir / "base").eval(),
           "small": AutoModelForCausalLM.from_pretrained(tiny_dir / "small").eval()}
    for name, path in adapters.items():
        base = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
        out[name] = peft.PeftModel.from_pretrained(base, path).merge_and_unload().eval()
    out["formal"] = out["base"]
    return out


@torch.inference_mode()
def oracle(merged, plan, output, V):
    """log_softmax(sum_k w_k log_softmax(l_k)) over the V tokens, by full no-cache forwards of the merged copies."""
    total = None
    for stream, w in plan.weights.items():
        if w == 0:
            continue
        logits = merged[plan.policy_of(stream)](input_ids=torch.tensor([plan.prompts[stream] + output])).logits
        term = w * torch.log_softmax(logits[0, -1, :V].float(), -1)
        total = term if total is None else total + term
    return torch.log_softmax(total, -1)


def test_adapters_share_their_base_and_are_not_merged(registry):
    base, a1, a2, formal = (registry.policies[n] for n in ("base", "a1", "a2", "formal"))
    assert a1.weights is a2.weights is base.weights is formal.weights  # one PEFT model holds all of them
    assert (a1.adapter, a2.adapter, base.adapter) == ("a1", "a2", None)
    core = EngineCore(registry)
    assert set(core.runners) == {"base", "small"}  # one runner per set of weights
    assert core.runners["base"].adapters == {"a1": "a1", "a2": "a2"}
    # the base's linear layers are prepacked for oneDNN under the grouped LoRA layers
    packed = {n for n, m in base.weights.named_modules() if type(m).__name__ == "PackedLinear"}
    assert core.runners["base"].packed_linears == 0 or (packed and not any(".lora_" in n for n in packed))
    grouped = [n for n, m in base.weights.named_modules() if type(m).__name__ == "GroupedLoRA"]
    assert len(grouped) == len(TARGETS) * base.weights.config.num_hidden_layers


RECIPES = [
    ("a1", None),
    ("base", {"weights": {"a1": 1.5, "base": -0.5}}),  # negative weight on the base
    ("a1", {"reference": "base", "policy": "a1", "beta": 0.1, "beta_prime": 0.05}),  # DeRa over an adapter
    ("base", {"reference": "base", "objectives": {"a1": 0.6, "a2": 0.4}}),  # MOD over adapters
    ("base", {"weights": {"a2": 1.0, "v": 0.5, "small": -0.3},
              "prompt_variants": {"v": {"policy": "a1", "prompt": "Another context entirely"}}}),
    ("formal", {"weights": {"formal": 1.0, "a2": 0.5}}),  # a prompted policy beside an adapter of its base
]


def test_mixtures_over_adapters_equal_merged_copies(registry, merged):
    V = registry.policies["base"].vocab_size
    core = EngineCore(registry)
    rng = random.Random(3)
    busy = [submit(core, make_request(core, rng.choice(["a1", "a2", "base", "formal", "small"]), None,
                                      f"Busy {i}", max_tokens=rng.randint(10, 40), temperature=0.8, ignore_eos=True))
            for i in range(6)]
    for _ in range(3):
        core.step()
    cols = []
    for i, (model, mix) in enumerate(RECIPES):
        req = make_request(core, model, mix, ["Hello world", "Paris is the capital"][i % 2], max_tokens=12,
                           temperature=0, logprobs=V, ignore_eos=True)
        cols.append((req, submit(core, req)))
        core.step()  # each joins a busy engine at another step
    run_until_done(core, [c for _, c in cols] + busy)
    worst = 0.0
    for req, col in cols:
        plan = core.render(req).plan
        out: list[int] = []
        for ev in col.events:
            expect = oracle(merged, plan, out, V)
            worst = max(worst, float((full_logprobs(ev, V) - expect).abs().max()))
            assert ev.token_id == int(expect.argmax())
            out.append(ev.token_id)
        assert len(out) == 12
    assert worst < 1e-4, worst


def test_greedy_n_and_speculative_drafts_over_adapters_match_the_oracle(registry, merged):
    V = registry.policies["base"].vocab_size
    core = EngineCore(registry)
    mix = {"weights": {"a1": 1.2, "a2": -0.2}}
    plain = submit(core, make_request(core, "base", mix, "The quick brown fox", max_tokens=14, temperature=0,
                                      ignore_eos=True))
    forked = submit(core, make_request(core, "base", mix, "The quick brown fox", max_tokens=14, temperature=0,
                                       ignore_eos=True, n=2))
    drafted = submit(core, make_request(core, "base", mix, "The quick brown fox", max_tokens=14, temperature=0,
                                        ignore_eos=True, speculative=SpeculativeSpec("a2", 3)))
    run_until_done(core, [plain, forked, drafted])
    plan = core.render(make_request(core, "base", mix, "The quick brown fox", max_tokens=14, temperature=0)).plan
    expect: list[int] = []
    for _ in range(14):
        expect.append(int(oracle(merged, plan, expect, V).argmax()))
    assert plain.tokens() == forked.tokens(0) == forked.tokens(1) == drafted.tokens() == expect
    assert drafted.done.sequences[0].speculative["drafted"] > 0  # the adapter drafted on the shared weights


def test_the_view_of_a_policy_applies_its_adapter_alone(registry, merged):
    ids = torch.tensor([registry.policies["base"].tokenizer("Hello world").input_ids])
    with torch.inference_mode():
        for name in ("a1", "a2", "base"):
            got = registry.policies[name].model(input_ids=ids).logits
            torch.testing.assert_close(got, merged[name](input_ids=ids).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("extra, words", [
    ({"use_dora": True}, "use_dora"),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
])
def test_an_adapter_that_cannot_be_a_lane_is_refused_at_start(tiny_dir, tmp_path, extra, words):
    path = _adapter(tiny_dir / "base", tmp_path / "bad", 4, 5, **extra)
    cfg = parse_config({"policies": {"base": {"path": str(tiny_dir / "base")},
                                     "odd": {"path": str(tiny_dir / "base"), "adapter": str(path)}}})
    with pytest.raises(ConfigError, match=rf"^policies\.odd: .*{words}") as err:
        load_registry(cfg)
    assert "\n" not in str(err.value)


def test_an_adapter_on_an_embedding_is_refused_at_start(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "base")
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["embed_tokens", "q_proj"]))
    model.save_pretrained(tmp_path / "emb")
    assert json.loads((tmp_path / "emb" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    cfg = parse_config({"policies": {"base": {"path": str(tiny_dir / "base")},
                                     "emb": {"path": str(tiny_dir / "base"), "adapter": str(tmp_path / "emb")}}})
    with pytest.raises(ConfigError, match=r"^policies\.emb: LoRA on .*embed_tokens"):
        load_registry(cfg)

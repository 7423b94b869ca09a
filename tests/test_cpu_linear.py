"""oneDNN-prepacked linear layers: the same products as nn.Linear, all-or-nothing, off when asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from engine_helpers import make_request, run_until_done, submit
from policymix.engine.core import EngineCore
from policymix.engine.cpu_linear import PackedLinear, can_pack, pack_linears

pytestmark = pytest.mark.skipif(not can_pack("cpu", torch.float32),
                                reason="this torch build has no oneDNN (mkldnn) linear ops")


def _load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _linears(model):
    return sum(type(m) is nn.Linear for m in model.modules())


def test_packed_model_gives_the_same_logits(tiny_dir):
    plain, packed = _load(tiny_dir / "base"), _load(tiny_dir / "base")
    n = _linears(plain)
    assert pack_linears(packed) == n > 0
    assert _linears(packed) == 0 and sum(isinstance(m, PackedLinear) for m in packed.modules()) == n
    assert pack_linears(packed) == 0  # already packed (policies sharing weights): left alone
    ids = torch.randint(0, plain.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        want, got = plain(input_ids=ids).logits, packed(input_ids=ids).logits
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("failure", ["wrong", "raises"])
def test_failed_packing_leaves_the_model_as_it_was(tiny_dir, monkeypatch, failure):
    model = _load(tiny_dir / "base")
    n = _linears(model)
    if failure == "wrong":
        monkeypatch.setattr(PackedLinear, "forward", lambda self, x: torch.zeros(*x.shape[:-1], self.out_features))
    else:
        def broken(self, linear):
            raise RuntimeError("no oneDNN kernel for this CPU")
        monkeypatch.setattr(PackedLinear, "__init__", broken)
    assert pack_linears(model) == 0
    assert _linears(model) == n  # every layer still the loaded nn.Linear


def test_engine_distributions_equal_with_and_without_packing(tiny_config):
    """The same requests (a mixture with a negative weight, one policy alone) through two registries
    loaded from disk, one packed: tokens identical, full mixed distributions within 1e-4."""
    from policymix.registry import load_registry

    outs = {}
    for mode in ("torch", "onednn"):
        cfg = tiny_config.model_copy(update={"server": tiny_config.server.model_copy(update={"cpu_linear": mode})})
        core = EngineCore(load_registry(cfg))
        packed = sum(r.packed_linears for r in core.runners.values())
        assert (packed > 0) == (mode == "onednn")
        V = core.registry.policies["base"].vocab_size
        cols = [submit(core, make_request(core, "base", mix, prompt, max_tokens=12, temperature=0, logprobs=V,
                                          ignore_eos=True))
                for mix, prompt in [({"weights": {"base": 1.3, "dpo": -0.3}}, "Hello world"),
                                    (None, "Paris is the capital")]]
        run_until_done(core, cols)
        outs[mode] = cols
    for a, b in zip(outs["torch"], outs["onednn"]):
        assert a.tokens() == b.tokens()
        for ea, eb in zip(a.events, b.events):
            da, db = dict(ea.top_logprobs), dict(eb.top_logprobs)
            assert da.keys() == db.keys() and max(abs(da[t] - db[t]) for t in da) < 1e-4

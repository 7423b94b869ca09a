"""The pieces behind the benchmark figures: roofline floors, the anchors' median run, the serving-load
workload and static batcher (seconds, tiny models; speeds are never judged)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from benchmarks import roofline, serving_load  # noqa: E402
from benchmarks.anchors.suite import run_anchor_suite  # noqa: E402
from benchmarks.models import load_policies, load_tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from policymix.tiny_models import build_family

    torch.set_num_threads(1)
    paths = build_family(tmp_path_factory.mktemp("bench-parts"), ["base", "tuned", "untuned"])
    return load_policies(paths), load_tokenizer(paths["base"])


def test_cached_positions_sums_every_steps_cache_length():
    # a 3-token prompt generating 4 tokens reads caches of 3, 4, 5, 6; a 1-token one generating 2: 1, 2
    assert roofline.cached_positions([3, 1], [4, 2]) == 3 + 4 + 5 + 6 + 1 + 2


def test_policy_shape_counts_what_a_step_reads(tiny):
    models, _ = tiny
    m = models["base"]
    cfg = m.config
    shape = roofline.PolicyShape.of(m)
    emb = m.get_input_embeddings().weight
    params = sum(p.numel() for p in m.parameters())
    assert shape.weight_bytes == (params - emb.numel()) * 4  # untied: the input embedding is only gathered
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    assert shape.kv_bytes_per_token == 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 4
    assert shape.flops_per_row == 2 * (params - emb.numel())


def test_policy_shape_sees_onednn_packed_weights(tmp_path):
    from policymix.engine.cpu_linear import can_pack, pack_linears
    from policymix.tiny_models import build_family

    if not can_pack("cpu", torch.float32):
        pytest.skip("no oneDNN packing in this torch build")
    paths = build_family(tmp_path, ["base"])
    model = load_policies(paths)["base"]
    before = roofline.PolicyShape.of(model)
    assert pack_linears(model) > 0
    assert roofline.PolicyShape.of(model) == before  # same bytes, held outside the parameters now


def test_decode_floor_is_the_larger_of_bandwidth_and_compute():
    shape = roofline.PolicyShape(weight_bytes=1000, kv_bytes_per_token=10, flops_per_row=2000, attn_flops_per_token=4)
    roof = roofline.Roofline(threads=1, bandwidth_bps=1e4, flops=1e5)
    f = roofline.decode_floor([shape, shape], steps=5, rows=10, positions=20, roof=roof)
    assert f["bytes"] == 2 * (1000 * 5 + 10 * 20) and f["flops"] == 2 * (2000 * 10 + 4 * 20)
    assert f["bandwidth_floor_s"] == pytest.approx(10400 / 1e4) and f["compute_floor_s"] == pytest.approx(40160 / 1e5)
    assert f["floor_s"] == f["bandwidth_floor_s"] and f["bound"] == "bandwidth"
    fr = roofline.fractions(f, wall_s=2.08)
    assert fr["bandwidth_fraction"] == pytest.approx(0.5) and fr["roofline_fraction"] == pytest.approx(0.5)


def test_roofline_measures_and_reloads(tmp_path):
    assert roofline.main(["--quick", "--threads", "1", "--out", str(tmp_path / "r")]) == 0
    roofs = roofline.load_rooflines(tmp_path / "r.json")
    assert set(roofs) == {1} and roofs[1].bandwidth_bps > 1e8 and roofs[1].flops > 1e8


def test_anchor_suite_reports_the_median_run(tiny):
    models, tok = tiny
    results = run_anchor_suite(models, tok, ["Hello world", "Paris is"], max_new_tokens=3, batch_sizes=[1],
                               include=["hf"], repeats=3)
    (r,) = results
    runs = r.params["tok_s_runs"]
    assert len(runs) == 3 and round(r.tok_s, 2) == sorted(runs)[1]


def test_serving_workload_and_arrivals_are_fixed_by_the_seed(tiny):
    _, tok = tiny
    a = serving_load.workload(20, 16, 256, tok, seed=1)
    assert a == serving_load.workload(20, 16, 256, tok, seed=1)
    assert all(16 <= r.prompt_len == len(r.prompt) <= 256 and 16 <= r.output_len <= 256 for r in a)
    assert not set(tok.all_special_ids) & {i for r in a for i in r.prompt}
    times = serving_load.poisson(200, rate=50.0, seed=2)
    assert times == sorted(times) and 2.0 < times[-1] < 6.0  # mean gap 1/50 s


def test_static_batcher_waits_for_a_batch_or_the_timeout(tiny):
    models, tok = tiny
    reqs = serving_load.workload(3, 2, 5, tok, seed=0)
    # two requests at once fill a batch of 2 at t=0; the third waits the 0.2 s timeout alone
    results, duration = serving_load.serve_static(models, tok, reqs, [0.0, 0.0, 0.05], batch=2, timeout=0.2)
    assert [r.output_tokens for r in results] == [r.output_len for r in reqs]
    assert results[2].ttft >= 0.2 - 1e-3  # it waited for the timeout after its arrival
    for r in results:
        assert 0 < r.ttft <= r.latency and len(r.itl) == r.output_tokens - 1
    assert duration >= 0.25


def test_left_padding_puts_every_prompt_at_the_right_edge():
    ids, mask = serving_load._left_pad([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_a_lane_reads_no_weights_of_its_own():
    shape = roofline.PolicyShape(weight_bytes=1000, kv_bytes_per_token=10, flops_per_row=2000, attn_flops_per_token=4)
    lane = shape.lane()
    assert lane.weight_bytes == 0 and (lane.kv_bytes_per_token, lane.flops_per_row) == (10, 2000)

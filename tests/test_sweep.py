"""`policymix sweep`: a CSV and a PNG of reward and KL over the weights."""

from __future__ import annotations

import csv

import pytest
import yaml

from policymix.sweep import fill, main, weight_grid


def test_template_and_grid():
    assert weight_grid("0:1:0.25") == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert fill({"weights": {"a": "$w", "b": "1-$w"}, "x": [1, "-$w*2"]}, 0.25) == \
        {"weights": {"a": 0.25, "b": 0.75}, "x": [1, -0.5]}
    with pytest.raises(ValueError):
        fill({"a": "__import__('os')"} | {"b": "$w + os"}, 0.1)


def test_sweep_writes_csv_and_png(tmp_path, tiny_dir):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({"policies": {"base": {"path": str(tiny_dir / "base")},
                                                "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1}}}))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hello world\nParis is\nThe quick brown\n")
    out = tmp_path / "out" / "sweep"
    rc = main(["--config", str(cfg), "--recipe", '{"weights": {"dpo": "$w", "base": "1-$w"}}', "--weights", "0:1:0.5",
               "--prompts", str(prompts), "--reference", "base", "--scorer", "implicit:dpo,base,0.1",
               "--max-tokens", "6", "--out", str(out)])
    assert rc == 0
    summary = list(csv.DictReader(open(f"{out}_summary.csv")))
    assert [float(r["weight"]) for r in summary] == [0.0, 0.5, 1.0]
    kls = [float(r["mean_kl"]) for r in summary]
    assert kls[0] < 1e-5 < kls[1]  # the reference alone has KL 0 to itself
    rewards = [float(r["mean_reward"]) for r in summary]
    assert rewards[2] > rewards[0]  # more weight on dpo, more of dpo's implicit reward
    assert len(list(csv.DictReader(open(out.with_suffix(".csv"))))) == 9
    assert out.with_suffix(".png").stat().st_size > 10_000


def test_sweep_bad_input_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "p.txt"
    prompts.write_text("hi\n")
    rc = main(["--recipe", "{not json", "--prompts", str(prompts), "--reference", "base"])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("policymix sweep: error:")

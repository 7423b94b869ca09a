"""The README's performance block: generated from the committed result files, every number traceable to one,
headline ratios like against like; and ``make bench --quick`` end to end (seconds, numbers not judged)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from benchmarks import summary
from benchmarks.report import RESULTS_DIR

NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def _numbers_of(obj, out: list[float]) -> list[float]:
    """Every number of a JSON document: numeric leaves and the numbers written inside strings (dates, shapes)."""
    if isinstance(obj, bool):
        return out
    if isinstance(obj, (int, float)):
        out.append(float(obj))
    elif isinstance(obj, str):
        out += [float(n) for n in NUMBER.findall(obj)]
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _numbers_of(k, out)
            _numbers_of(v, out)
    elif isinstance(obj, list):
        for v in obj:
            _numbers_of(v, out)
    return out


def _committed_numbers() -> list[float]:
    pool: list[float] = []
    for path in sorted(RESULTS_DIR.glob("*.json")):
        if path.stem != "summary":  # the block must trace past the summary, to the benchmarks' own files
            _numbers_of(json.loads(path.read_text()), pool)
    for path in sorted(RESULTS_DIR.glob("*.md")):
        if path.stem != "summary":
            pool += [float(n) for n in NUMBER.findall(path.read_text())]
    return pool


def _shown(token: str, pool: list[float]) -> bool:
    """``token`` as printed (``12.3``, ``834``) is some committed value rounded to the printed decimals."""
    decimals = len(token.split(".")[1]) if "." in token else 0
    want = float(token)
    return any(abs(round(v, decimals) - want) < 1e-9 for v in pool)


def _figure_cells(block: str) -> list[str]:
    """The measured parts of the block: the CPU and GPU cells of the table, and the sources' lines."""
    cells = []
    for line in block.splitlines():
        if line.startswith("| ") and not line.startswith("| what") and not line.startswith("|---"):
            cells += [c.strip() for c in line.strip("|").split(" | ")[1:]]
        elif line.startswith("- `"):
            cells.append(line)
    return cells


def test_readme_block_is_generated_from_the_committed_results():
    assert summary.readme_section() == summary.readme_block(summary.build(RESULTS_DIR)).strip(), (
        "README.md's performance block is stale: run `python -m benchmarks.summary`")


def test_every_number_in_the_readme_block_is_in_a_committed_result_file():
    pool = _committed_numbers()
    cells = _figure_cells(summary.readme_section())
    assert len(cells) >= 20  # the table and its sources were found
    missing = [(tok, cell) for cell in cells for tok in summary.numbers_in(cell) if not _shown(tok, pool)]
    assert not missing


def test_a_number_that_no_result_file_holds_is_caught():
    pool = _committed_numbers()
    assert not _shown("123456.789", pool)
    assert summary.numbers_in("**1.94x** (834 vs 438 tok/s; `cpu_linear: 3`), commit 62ea55d-dirty") == [
        "1.94", "834", "438"]


def test_headline_ratios_compare_equal_batch_sizes():
    from benchmarks.core_cpu import CONTENDERS, RATIOS

    batch = {key: c for key, _name, _n, c, _cores in CONTENDERS}
    for key, num, den, what in RATIOS:
        assert key == f"{num}_over_{den.replace('hf_generate', 'hf').replace('proxy_loop', 'loop')}"
        if batch[num] != batch[den]:
            assert what.startswith("cross-batch"), key
        else:
            assert not what.startswith("cross-batch"), key
    for row in summary.build(RESULTS_DIR)["rows"]:
        if "across batch sizes" in row["what"]:
            assert "**" not in row["cpu"] + row["gpu"]  # never a bold headline


def test_compare_flags_ratios_that_moved_more_than_ten_percent():
    a = {"ratios": {"x": 2.0, "y": 1.0, "only_a": 3.0}}
    b = {"ratios": {"x": 2.15, "y": 1.2, "only_b": 1.0}}
    bad = summary.compare(a, b)
    assert len(bad) == 1 and bad[0].startswith("y:")


def test_write_readme_replaces_only_the_block(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"# t\n\nbefore\n{summary.BEGIN}\nold\n{summary.END}\nafter\n")
    assert summary.write_readme("| a | 1 |", readme)
    assert readme.read_text() == f"# t\n\nbefore\n{summary.BEGIN}\n| a | 1 |\n{summary.END}\nafter\n"
    assert not summary.write_readme("| a | 1 |", readme)
    readme.write_text("no markers")
    with pytest.raises(ValueError):
        summary.write_readme("x", readme)


def test_make_bench_quick_runs_every_job_and_summarises(tmp_path):
    """``python -m benchmarks.all --quick``: every benchmark on tiny models, 1 repeat; the results, the
    summary with a figure in every row, and the committed results and README left alone."""
    from benchmarks import all as bench_all

    readme_before = summary.README.read_text()
    committed = {p: p.read_bytes() for p in RESULTS_DIR.rglob("*") if p.is_file()}
    with pytest.raises(SystemExit):  # toy numbers never go into benchmarks/results
        bench_all.main(["--quick"])
    assert bench_all.main(["--quick", "--out-dir", str(tmp_path)]) == 0
    for job in bench_all.JOBS:
        if job.quick is not None and bench_all.available(job.needs) is None:
            for stem in job.outputs():
                data = json.loads((tmp_path / f"{stem}.json").read_text())
                assert data["meta"]["threads"] and data["meta"]["date"]
                assert (tmp_path / f"{stem}.md").read_text().startswith("# ")
    result = json.loads((tmp_path / "summary.json").read_text())
    assert set(result["meta"]["job_seconds"]) == {j.name for j in bench_all.JOBS if j.quick is not None
                                                  and bench_all.available(j.needs) is None}
    assert all(summary.MISSING not in row["cpu"] for row in result["rows"]), result["rows"]
    r = result["ratios"]
    assert r["engine_proxy_c16_over_loop_b16"] > 0 and r["engine_proxy_c1_over_loop_b1"] > 0
    assert 0 < r["roofline_engine_proxy_c1"] and 0 < r["roofline_proxy_loop_b1"]
    assert {"serving_tok_s_ratio_20", "serving_tok_s_ratio_200"} <= set(r)
    core = json.loads((tmp_path / "core_cpu.json").read_text())
    for row in core["overhead"] + list(core["anchors_roofline"].values()):
        assert row["roofline_fraction"] >= row["bandwidth_fraction"] > 0  # every decode figure has its fractions
    assert summary.compare(result, result) == []
    assert summary.README.read_text() == readme_before
    assert {p: p.read_bytes() for p in RESULTS_DIR.rglob("*") if p.is_file()} == committed

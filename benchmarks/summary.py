"""The headline figures, read from the result files, and the README's performance block built from them.

    python -m benchmarks.summary                     # benchmarks/results/summary.{md,json} + README block
    python -m benchmarks.summary --compare A.json B.json   # two summaries' ratios, within 10%?

Every figure is taken from a result file of ``benchmarks/results/`` (never typed in): each row names its
sources. Ratios compare equal batch sizes (engine at 16 concurrent against the loop at batch 16, 1
against 1); a cross-batch ratio only appears on a line of its own that names both sides. Where a result
file predates a figure (written before that benchmark measured it) the row says so instead of a number.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from benchmarks.report import RESULTS_DIR, git_commit, machine_info

README = Path(__file__).resolve().parents[1] / "README.md"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"
GPU_RESULT = "gpu_check_h100_2026-11-26_graphs"  # lent GPUs run benchmarks/gpu_check.sh; not part of make bench
MISSING = "not in the committed results yet (`make bench`)"


def x(v: float) -> str:
    return f"{v:.2f}x" if v < 10 else f"{v:.0f}x"


def t(v: float) -> str:
    return f"{v:.0f}" if v >= 100 else f"{v:.1f}"


class Results:
    """The JSON result files of one directory, by stem; records which ones a summary used."""

    def __init__(self, root: Path, gpu_root: Path = RESULTS_DIR):
        self.root, self.gpu_root, self.used = Path(root), Path(gpu_root), {}

    def get(self, stem: str) -> dict | None:
        path = self.root / f"{stem}.json"
        if not path.exists() and stem == GPU_RESULT:
            path = self.gpu_root / f"{stem}.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        meta = data.get("meta") or {k: data[k] for k in ("date", "device", "torch") if k in data}
        self.used[stem] = {k: meta.get(k) for k in ("date", "commit", "threads", "command", "load_avg_1m")
                           if meta.get(k) is not None}
        return data


def _overhead(r: Results, ratios: dict) -> tuple[str, str]:
    cpu, gpu = MISSING, MISSING
    core = r.get("core_cpu")
    if core and core.get("overhead"):
        rows = core["overhead"]
        lo, hi = min(o["ratio"] for o in rows), max(o["ratio"] for o in rows)
        concs = sorted({o["concurrency"] for o in rows})
        ks = sorted({o["K"] for o in rows})
        cpu = f"{lo:.2f}-{hi:.2f} for K = {ks[0]}-{ks[-1]} at {', '.join(map(str, concs))} concurrent"
        if "roofline_fraction" in rows[0]:
            fr = [o["roofline_fraction"] for o in rows]
            cpu += f" (roofline fraction {min(fr):.2f}-{max(fr):.2f})"
        for o in rows:
            ratios[f"overhead_c{o['concurrency']}_k{o['K']}"] = o["ratio"]
    g = r.get(GPU_RESULT)
    if g:
        rows = [o for o in g["rows"] if "ratio_mix_over_sum" in o]
        concs = sorted({o["concurrency"] for o in rows})
        gpu = (f"{min(o['ratio_mix_over_sum'] for o in rows):.2f}-{max(o['ratio_mix_over_sum'] for o in rows):.2f} "
               f"(0.5B, 7B; {concs[0]}-{concs[-1]} concurrent)")
    return cpu, gpu


def _anchor(core: dict | None, new: str, old: str | None = None) -> float | None:
    """A figure of core_cpu's anchors section by its key (``old``: its key before like-for-like keys)."""
    if not core or "anchors" not in core:
        return None
    a = core["anchors"]
    return a.get(new, a.get(old) if old else None)


def _gpu_proxy(r: Results, conc: int) -> dict | None:
    g = r.get(GPU_RESULT)
    rows = [o for o in (g or {}).get("rows", []) if "engine_proxy_tok_s" in o and o["concurrency"] == conc]
    return rows[0] if rows else None


def _roof(core: dict | None, key: str) -> dict | None:
    return (core or {}).get("anchors_roofline", {}).get(key)


def _fractions(core: dict | None, a: str, b: str) -> str:
    """'; roofline fractions A vs B' when the result file has them."""
    ra, rb = _roof(core, a), _roof(core, b)
    return f"; roofline fractions {ra['roofline_fraction']:.2f} vs {rb['roofline_fraction']:.2f}" if ra and rb else ""


def _proxy_rows(r: Results, ratios: dict) -> list[tuple[str, str, str]]:
    core = r.get("core_cpu")
    out = []
    for c in (16, 1):
        eng, loop = _anchor(core, f"engine_proxy_c{c}", "engine_proxy_c16" if c == 16 else None), \
            _anchor(core, f"proxy_loop_b{c}")
        ratio = _anchor(core, f"engine_proxy_c{c}_over_loop_b{c}", "engine_proxy_over_loop_b16" if c == 16 else None)
        cpu = MISSING
        if eng and loop and ratio:
            ratios[f"engine_proxy_c{c}_over_loop_b{c}"] = ratio
            cpu = f"**{x(ratio)}** ({t(eng)} vs {t(loop)} tok/s, one core each{_fractions(core, f'engine_proxy_c{c}', f'proxy_loop_b{c}')})"
            same = _anchor(core, f"engine_torch_proxy_c{c}_over_loop_b{c}",
                           "engine_torch_proxy_over_loop_b16" if c == 16 else None)
            if same:
                ratios[f"engine_torch_proxy_c{c}_over_loop_b{c}"] = same
                cpu += f"; {x(same)} with the loop's kernels (`cpu_linear: torch`)"
            par = _anchor(core, f"engine_parallel_proxy_c{c}_over_loop_b{c}")
            if par:
                ratios[f"engine_parallel_proxy_c{c}_over_loop_b{c}"] = par
                cpu += f"; {x(par)} policy-parallel (engine on {_roof(core, f'engine_parallel_proxy_c{c}')['cores']} cores)"
        g = _gpu_proxy(r, c)
        gpu = f"**{x(g['ratio_engine_over_loop'])}** ({t(g['engine_proxy_tok_s'])} vs {t(g['proxy_loop_tok_s'])} tok/s, 0.5B)" \
            if g else "-"
        target = " (>= 1x)" if c == 16 else ""
        out.append((f"proxy-tuning mixture: engine at {c} concurrent against the proxy-tuning loop at batch {c}{target}",
                    cpu, gpu))
    eng, loop1 = _anchor(core, "engine_proxy_c16"), _anchor(core, "proxy_loop_b1")
    cross = _anchor(core, "engine_proxy_c16_over_loop_b1", "engine_proxy_over_loop_b1")
    g16, g1 = _gpu_proxy(r, 16), _gpu_proxy(r, 1)
    out.append(("secondary, across batch sizes: the engine at 16 concurrent against the loop at batch 1 (issue 2's "
                ">= 4x CPU, >= 5x GPU)",
                f"{x(cross)} ({t(eng)} vs {t(loop1)} tok/s)" if cross and eng and loop1 else MISSING,
                f"{x(g16['engine_proxy_tok_s'] / g1['proxy_loop_tok_s'])} ({t(g16['engine_proxy_tok_s'])} vs "
                f"{t(g1['proxy_loop_tok_s'])} tok/s)" if g16 and g1 else "-"))
    return out


def _one_policy(r: Results, ratios: dict) -> tuple[str, str, str]:
    core = r.get("core_cpu")
    parts = []
    for c in (16, 1):
        ratio = _anchor(core, f"engine_1pol_c{c}_over_hf_b{c}", "engine_1pol_over_hf_b16" if c == 16 else None)
        eng, hf = _anchor(core, f"engine_1pol_c{c}"), _anchor(core, f"hf_generate_b{c}")
        if ratio and eng and hf:
            ratios[f"engine_1pol_c{c}_over_hf_b{c}"] = ratio
            part = (f"{'**' + x(ratio) + '**' if c == 16 else x(ratio)} at {c} ({t(eng)} vs {t(hf)} tok/s"
                    + _fractions(core, f"engine_1pol_c{c}", f"hf_generate_b{c}"))
            same = _anchor(core, f"engine_torch_1pol_c{c}_over_hf_b{c}",
                           "engine_torch_1pol_over_hf_b16" if c == 16 else None)
            if same:
                ratios[f"engine_torch_1pol_c{c}_over_hf_b{c}"] = same
                part += f"; {x(same)} with torch's linears"
            parts.append(part + ")")
    return ("one policy: engine at 16 (and 1) concurrent against HF `generate` at batch 16 (and 1) (>= 1x)",
            "; ".join(parts) or MISSING, "-")


def _roofline(r: Results, ratios: dict) -> tuple[str, str, str]:
    core = r.get("core_cpu")
    cpu = MISSING
    eng, loop = _roof(core, "engine_proxy_c1"), _roof(core, "proxy_loop_b1")
    if eng and loop:
        bw = core["rooflines"].get("1", core["rooflines"].get(1, {})).get("bandwidth_gbs")
        cpu = (f"engine **{eng['bandwidth_fraction']:.2f}** ({eng['ms_per_step']:.1f} ms/step against a "
               f"{eng['bandwidth_floor_ms_per_step']:.1f} ms floor at {bw:.1f} GB/s), the loop "
               f"{loop['bandwidth_fraction']:.2f} ({loop['ms_per_step']:.1f} ms/step)")
        ratios["roofline_engine_proxy_c1"] = eng["bandwidth_fraction"]
        ratios["roofline_proxy_loop_b1"] = loop["bandwidth_fraction"]
    g = r.get(GPU_RESULT)
    gpu = "-"
    if g:
        row = [o for o in g["rows"] if o["shape"] == "qwen2-7b" and o["concurrency"] == 1 and "step_ms_single" in o][0]
        gpu = (f"7B, one policy: {row['step_ms_single']:.1f} ms vs {row['floor_ms_per_policy_step']:.1f} ms floor "
               "(CUDA graphs)")
    return ("decode at one request against the memory-bandwidth floor (fraction = floor / step time): the "
            "proxy-tuning mixture (3 policies)", cpu, gpu)


def _serving(r: Results, ratios: dict) -> tuple[str, str, str]:
    what = ("serving: Poisson arrivals, prompt and output lengths 16-256, the engine against the proxy-tuning loop "
            "behind a static batcher (>= 1.5x at saturation, lower median latency)")
    load = r.get("serving_load_cpu")
    if load:
        by = {}
        for row in load["rows"]:
            by.setdefault(row["rate_req_s"], {})[row["contender"]] = row
        parts = []
        for rate, rows in sorted(by.items()):
            e, s = rows["engine"], rows["static batcher"]
            ratios[f"serving_tok_s_ratio_{rate:g}"] = e["tok_s_ratio"]
            parts.append(f"{rate:g} req/s: {'**' + x(e['tok_s_ratio']) + '**' if rate == max(by) else x(e['tok_s_ratio'])}"
                         f" ({t(e['tok_s'])} vs {t(s['tok_s'])} tok/s), latency p50 {e['latency_p50_s']:.1f} vs "
                         f"{s['latency_p50_s']:.1f} s, p99 {e['latency_p99_s']:.1f} vs {s['latency_p99_s']:.1f} s, "
                         f"TTFT p99 {e['ttft_p99_ms']:.0f} vs {s['ttft_p99_ms']:.0f} ms")
        return what, "; ".join(parts), "-"
    core = r.get("core_cpu")
    if core and core.get("serving"):  # the earlier, single-run version inside core_cpu
        hi, lo = max(core["serving"], key=lambda s: s["rate_req_s"]), min(core["serving"], key=lambda s: s["rate_req_s"])
        return what, (f"{x(hi['throughput_ratio'])} at {hi['rate_req_s']:g} req/s ({x(lo['throughput_ratio'])} at "
                      f"{lo['rate_req_s']:g} req/s); median latency {hi['engine_median_latency_s']:.1f} s vs "
                      f"{hi['static_median_latency_s']:.1f} s; one run each (`core_cpu`, before `serving_load`)"), "-"
    return what, MISSING, "-"


def _ttft(r: Results, ratios: dict) -> tuple[str, str, str]:
    what = "TTFT p99 over HTTP at 80% of the measured max throughput (proxy mixture, 32-token prompts, 64 new)"
    h = r.get("serve_http_cpu")
    if h:
        s = h["summary"]
        ratios["http_max_req_s"] = s["max_req_s"]
        return what, (f"{s['ttft_p99_ms']:.0f} ms at {s['rate_req_s']:.1f} req/s (max {s['max_req_s']:.1f} req/s at "
                      f"{s['max_concurrency']} concurrent)"), "-"
    sat, at80 = r.get("serve_cpu_saturated"), r.get("serve_cpu_80pct")
    if sat and at80:
        return what, (f"{at80['summary']['ttft_ms']['p99']:.0f} ms at {float(at80['config']['request_rate']):.1f} req/s "
                      f"(max {sat['summary']['request_throughput']:.1f} req/s at {sat['config']['max_concurrency']} "
                      "concurrent; one run each)"), "-"
    return what, MISSING, "-"


def _simple(r: Results, ratios: dict) -> list[tuple[str, str, str]]:
    out = []
    core = r.get("core_cpu")
    b = (core or {}).get("best_of")
    out.append(("best-of-8 / one sample of the same length (<= 2x)",
                f"{x(b['best_of_8_over_single'])}" if b else MISSING, "-"))
    if b:
        ratios["best_of_8_over_single"] = b["best_of_8_over_single"]
    sc = r.get("scoring_cpu")
    if sc:
        ratios["scoring_engine_over_hf"] = sc["summary"]["engine_over_hf"]
        ratios["scoring_mixture_over_sum"] = sc["summary"]["mixture_over_sum"]
        ratios["scoring_beside_p99_ratio"] = sc["gaps"]["p99_ratio"]
    out.append(("prompt scoring, 16 x 256-token prompts: one policy against HF's batched forward (>= 0.8x); a "
                "3-policy mixture against the sum of its parts (<= 1.1x)",
                f"**{x(sc['summary']['engine_over_hf'])}**; {x(sc['summary']['mixture_over_sum'])}" if sc else MISSING,
                "-"))
    out.append(("8 streams beside a 4k-token scoring request: inter-token p99 against the streams alone (< 3x)",
                f"{x(sc['gaps']['p99_ratio'])} (warm engine)" if sc else MISSING, "-"))
    gd = r.get("guidance_cpu")
    if gd:
        for row in gd["rows"]:
            ratios[f"guidance_c{row['concurrency']}"] = row["ratio"]
    out.append(("a guided request (CFG) against its two contexts served alone (<= 1.1x)",
                ", ".join(f"{x(row['ratio'])} at {row['concurrency']} in flight" for row in gd["rows"]) if gd
                else MISSING, "-"))
    return out


def build(results_dir: str | Path = RESULTS_DIR) -> dict:
    """The summary of the result files in ``results_dir`` (GPU figures from the committed GPU result)."""
    r = Results(Path(results_dir))
    ratios: dict[str, float] = {}
    rows = [("K-policy mixture / sum of the K alone (<= 1.10)", *_overhead(r, ratios))]
    rows += _proxy_rows(r, ratios)
    rows.append(_one_policy(r, ratios))
    rows.append(_roofline(r, ratios))
    rows.append(_serving(r, ratios))
    rows.append(_ttft(r, ratios))
    rows += _simple(r, ratios)
    info = machine_info()
    core = r.get("core_cpu") or {}
    return {"meta": {"commit": git_commit(), "date": info["date"], "cpu": info["cpu"], "cpu_count": info["cpu_count"],
                     "torch": info.get("torch"), "threads": (core.get("meta") or {}).get("threads", 1),
                     "results_dir": str(results_dir)},
            "sources": dict(sorted(r.used.items())),
            "rows": [{"what": w, "cpu": c, "gpu": g} for w, c, g in rows], "ratios": ratios}


def readme_block(summary: dict) -> str:
    """The README's performance table and its provenance, as markdown."""
    lines = ["| what (target) | CPU: 1 thread, 3 policies of 20M parameters (hidden 256, vocab 32k) | "
             "GPU: H100, Qwen2 shapes, bf16 |", "|---|---|---|"]
    lines += [f"| {row['what']} | {row['cpu']} | {row['gpu']} |" for row in summary["rows"]]
    lines += ["", "CPU figures are medians of at least 3 side-by-side repeats unless a row says one run. Sources "
              "(`benchmarks/results/`; each file records its machine, its load and its command):", ""]
    for stem, src in summary["sources"].items():
        extra = f", commit {src['commit']}" if src.get("commit") else ""
        lines.append(f"- `{stem}.md`: {src.get('date', 'undated')}{extra}")
    lines += ["", "Regenerate: `make bench` (every CPU benchmark on a quiet machine, then this block), or "
              "`python -m benchmarks.summary` to rebuild the block from the committed results; the GPU column is "
              "`bash benchmarks/gpu_check.sh` on a lent GPU. What each benchmark measures, its command, repeats "
              "and run time: [benchmarks/README.md](benchmarks/README.md)."]
    return "\n".join(lines)


def write_readme(block: str, readme: Path = README) -> bool:
    """Replace the text between the markers; True when the README changed."""
    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{readme} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{BEGIN}\n{block}\n{END}{tail}"
    if new != text:
        readme.write_text(new)
    return new != text


def readme_section(readme: Path = README) -> str:
    text = readme.read_text()
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def compare(a: dict, b: dict, tolerance: float = 0.10) -> list[str]:
    """The ratios of two summaries that differ by more than ``tolerance`` (relative to the first)."""
    bad = []
    for key in sorted(set(a["ratios"]) & set(b["ratios"])):
        va, vb = a["ratios"][key], b["ratios"][key]
        if abs(vb - va) > tolerance * abs(va):
            bad.append(f"{key}: {va:.3f} vs {vb:.3f} ({(vb - va) / va:+.1%})")
    return bad


def write(summary: dict, results_dir: str | Path = RESULTS_DIR) -> Path:
    out = Path(results_dir) / "summary"
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
    m = summary["meta"]
    md = ["# Benchmark summary", "", f"- commit: {m['commit']}", f"- date: {m['date']}",
          f"- machine: {m['cpu']}, {m['cpu_count']} cores", f"- torch threads: {m['threads']}"]
    if m.get("job_seconds"):
        md.append("- run times: " + ", ".join(f"{k} {v:.0f} s" for k, v in m["job_seconds"].items()))
    md += ["",
          readme_block(summary), "", "## Ratios (what `--compare` checks)", "",
          "| ratio | value |", "|---|---|"] + [f"| {k} | {v:.3f} |" for k, v in summary["ratios"].items()]
    out.with_suffix(".md").write_text("\n".join(md) + "\n")
    return out


NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?")


def numbers_in(text: str) -> list[str]:
    """The numbers of a text, as written (``12.3``, ``834``); commit hashes and names are skipped."""
    return NUMBER.findall(re.sub(r"`[^`]*`|\b[0-9a-f]{7,}(?:-dirty)?\b", " ", text))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default=str(RESULTS_DIR))
    ap.add_argument("--no-readme", dest="readme", action="store_false", help="leave README.md as it is")
    ap.add_argument("--compare", nargs=2, metavar=("A", "B"), help="two summary.json files")
    args = ap.parse_args(argv)
    if args.compare:
        a, b = (json.loads(Path(p).read_text()) for p in args.compare)
        bad = compare(a, b)
        shared = len(set(a["ratios"]) & set(b["ratios"]))
        print("\n".join(bad) or f"all {shared} shared ratios agree within 10%")
        return 1 if bad else 0
    summary = build(args.results)
    path = write(summary, args.results)
    print(f"wrote {path}.md and {path}.json")
    if args.readme:
        print("README.md " + ("updated" if write_readme(readme_block(summary)) else "unchanged"))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""``make bench``: every benchmark whose figure the README or the docs quote, with the repeats they state,
then the summary (``results/summary.{md,json}``) and the README's performance block.

    python -m benchmarks.all                            # all of them, into benchmarks/results/ (see JOBS)
    python -m benchmarks.all --only roofline,core_cpu   # some of them (then the summary)
    python -m benchmarks.all --out-dir /tmp/run2 --no-readme   # a second run beside the committed one
    python -m benchmarks.all --quick --out-dir /tmp/q   # CI smoke: tiny sizes, 1 repeat, seconds
    python -m benchmarks.all --list                     # the jobs, their commands and run times

A full run starts each benchmark in a process of its own (``OMP_NUM_THREADS=1``) so that none inherits
another's allocator or thread state; ``--quick`` runs them in this process (the imports are paid once).
Jobs that need something absent here (the embedded SmolLM2, vLLM) are skipped with a message. The
GPU check is not a job: it runs on a lent GPU (``bash benchmarks/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.report import RESULTS_DIR

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Job:
    name: str  # the result stem it writes (``{out}/{name}.{md,json}``)
    module: str
    args: tuple[str, ...]  # ``{out}``: the output directory
    minutes: float  # a full run on the quiet 2-core VM, one torch thread
    what: str
    quick: tuple[str, ...] | None = ()  # extra arguments with --quick; None: not run with --quick
    needs: str | None = None  # "smollm2" | "vllm"
    stems: tuple[str, ...] = field(default=())  # result stems, when not just ``name``

    def outputs(self) -> tuple[str, ...]:
        return self.stems or (self.name,)

    def argv(self, out: Path, quick: bool) -> list[str]:
        args = [a.replace("{out}", str(out)) for a in self.args]
        return args + list(self.quick or ()) + (["--quick"] if quick and self.quick is not None else [])


T1 = ("--threads", "1")
JOBS = (
    Job("roofline_cpu", "benchmarks.roofline", ("--out", "{out}/roofline_cpu"), 0.3,
        "copy/triad bandwidth and GEMM FLOP/s at 1 and all threads: the floors of every decode figure"),
    Job("core_cpu", "benchmarks.core_cpu", (*T1, "--repeats", "3", "--roofline", "{out}/roofline_cpu.json",
                                             "--out", "{out}/core_cpu"), 6,
        "mixing overhead; engine against HF generate and the proxy-tuning loop at equal batches; best-of-8; memory"),
    Job("serving_load_cpu", "benchmarks.serving_load", (*T1, "--repeats", "3", "--out", "{out}/serving_load_cpu"), 9,
        "Poisson arrivals, lengths 16-256, 3 loads: engine against the static-batch proxy-tuning loop"),
    Job("serve_http_cpu", "benchmarks.serve_http", ("--repeats", "3", "--out", "{out}/serve_http_cpu"), 2,
        "a real server: max throughput at 16 in flight, TTFT at 80% of it"),
    Job("anchors_cpu", "benchmarks.anchors", (*T1, "--max-new-tokens", "128", "--repeats", "3",
                                              "--out", "{out}/anchors_cpu"), 4.5,
        "the anchor baselines alone: proxy-tuning loop, DeRa, HF generate at batch 1 and 16"),
    Job("scoring_cpu", "benchmarks.scoring", (*T1, "--repeats", "3", "--out", "{out}/scoring_cpu"), 2,
        "prompt logprobs against HF's batched forward; streams beside a 4k-token scoring request"),
    Job("guidance_cpu", "benchmarks.guidance", (*T1, "--repeats", "3", "--out", "{out}/guidance_cpu"), 0.5,
        "a CFG request against its two contexts served alone"),
    Job("speculative_cpu", "benchmarks.speculative", (*T1, "--repeats", "3", "--out", "{out}/speculative_cpu"), 15,
        "speculative decoding of mixtures, policy-parallel steps, the crossover (docs/api.md, docs/engine.md)",
        needs="smollm2"),
    Job("cpu_linear_smollm2", "benchmarks.cpu_linear", (*T1, "--repeats", "3", "--out", "{out}/cpu_linear_smollm2"), 3,
        "oneDNN-prepacked linears against torch's on SmolLM2 (docs/engine.md)", quick=None, needs="smollm2"),
    Job("vllm_cpu", "benchmarks.vllm_cpu", ("vllm", "--repeats", "3", "--out", "{out}/vllm_cpu"), 4,
        "the vLLM engine: three policies alone and mixed (docs/vllm.md)", quick=None, needs="vllm",
        stems=("vllm_cpu_vllm",)),
    Job("vllm_cpu_native", "benchmarks.vllm_cpu", ("native", "--repeats", "3", "--out", "{out}/vllm_cpu"), 1,
        "the native engine on the same family (docs/vllm.md)", quick=None, stems=("vllm_cpu_native",)),
)


def available(need: str | None) -> str | None:
    """None when the job can run here, else why not."""
    if need == "vllm":
        try:
            importlib.import_module("vllm")
        except Exception as err:  # noqa: BLE001 - any failure to import means: not here
            return f"vLLM does not import ({type(err).__name__}; `make install-vllm`)"
    if need == "smollm2":
        try:
            from policymix.embedded import smollm2_dir

            smollm2_dir()
        except Exception as err:  # noqa: BLE001
            return f"the embedded SmolLM2 is not installed ({type(err).__name__}; `make install`)"
    return None


def shown(out: Path) -> Path:
    """``out`` relative to the repository when inside it (the commands that result files record)."""
    return out.relative_to(REPO) if out.is_relative_to(REPO) else out


def run_job(job: Job, out: Path, quick: bool) -> float:
    argv = job.argv(out if quick else shown(out), quick)  # a process of its own runs in the repository
    start = time.perf_counter()
    if quick:
        mod = importlib.import_module(job.module)
        rc = (getattr(mod, "main", None) or importlib.import_module(f"{job.module}.__main__").main)(argv)
    else:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
            [str(REPO / "server"), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}  # this checkout
        rc = subprocess.run([sys.executable, "-m", job.module, *argv], cwd=REPO, env=env).returncode
    if rc:
        raise RuntimeError(f"{job.module} exited with {rc}")
    return time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out-dir", default=str(RESULTS_DIR))
    ap.add_argument("--only", help="comma-separated job names (see --list)")
    ap.add_argument("--skip", default="", help="comma-separated job names")
    ap.add_argument("--quick", action="store_true", help="CI smoke: tiny sizes, 1 repeat (never into results/)")
    ap.add_argument("--no-readme", dest="readme", action="store_false", help="leave README.md as it is")
    ap.add_argument("--list", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out_dir).resolve()
    if args.quick and out == RESULTS_DIR.resolve():
        ap.error("--quick writes toy numbers: give it an --out-dir other than benchmarks/results")
    names = {j.name for j in JOBS}
    chosen = set(args.only.split(",")) if args.only else names
    skip = set(filter(None, args.skip.split(",")))
    if (chosen | skip) - names:
        ap.error(f"unknown jobs {sorted((chosen | skip) - names)}; choose from {sorted(names)}")
    jobs = [j for j in JOBS if j.name in chosen - skip and not (args.quick and j.quick is None)]
    if args.list:
        for j in JOBS:
            print(f"{j.name:20s} ~{j.minutes:g} min  python -m {j.module} {shlex.join(j.argv(shown(out), False))}")
        print(f"total ~{sum(j.minutes for j in JOBS):g} min")
        return 0
    out.mkdir(parents=True, exist_ok=True)
    done: dict[str, float] = {}
    skipped = []
    for job in jobs:
        why = available(job.needs)
        if why:
            skipped.append(f"{job.name}: {why}")
            print(f"skip {job.name}: {why}", flush=True)
            continue
        print(f"== {job.name}: python -m {job.module} {shlex.join(job.argv(shown(out), args.quick))}", flush=True)
        done[job.name] = round(run_job(job, out, args.quick), 1)
    from benchmarks import summary

    result = summary.build(out)
    result["meta"]["job_seconds"], result["meta"]["skipped"] = done, skipped  # the run times benchmarks/README quotes
    path = summary.write(result, out)
    print("\n".join(["ran:", *(f"{k}: {v:.0f} s" for k, v in done.items())] + (["skipped:", *skipped] if skipped else [])))
    print(f"wrote {path}.md and {path}.json")
    if args.readme and not args.quick and out == RESULTS_DIR.resolve():
        print("README.md " + ("updated" if summary.write_readme(summary.readme_block(result)) else "unchanged"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

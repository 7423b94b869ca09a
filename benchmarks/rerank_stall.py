"""Does reward-model reranking of a best-of request stall the other streams?

    OMP_NUM_THREADS=1 python -m benchmarks.rerank_stall --threads 1 --out benchmarks/results/rerank_stall_cpu

The native engine scores a finished best-of request's candidates with its reward model on a separate
thread (``OutputProcessor._close`` -> a one-worker ``ThreadPoolExecutor``), not on the step thread.
This benchmark drives ``NativeEngine`` in-process with asyncio and records when each ``TokenEvent``
of a stream arrives; the inter-token latency (ITL) is the gap between consecutive arrivals of one
stream, pooled over the streams. Scenarios, run alternately ``--repeats`` times (medians quoted):

A. baseline: ``--streams`` greedy streaming requests (ignore_eos, ``--stream-tokens`` tokens each);
B. the same streams plus, once every stream has its first token, best-of-``--best-of`` requests
   (temperature 1.0, n=1, reranked by the reward model, ``--bo-tokens`` tokens each) submitted back
   to back until the streams end, so reward-model scoring overlaps the streams' decoding;
C. (control, ``--no-control`` to skip) as B but reranked by mean logprob (no reward model): the
   best-of candidates still join the batch, so B/C isolates the scoring itself from the larger batch.

Target: ITL p99 of B within 1.2x of A. Also reported: how many best-of requests were scored during
B, and how long one reward-model scoring of ``--best-of`` candidates takes alone
(``policymix.rerank.reward_model_scores`` called directly on the step-free main thread).

Models: the benchmark policy ``base`` (``benchmarks.models``: hidden 256, 4 layers, 32k vocab) and a
random Llama sequence classifier (``tiny_models.build_policy(..., reward=True)``) large enough that
scoring 16 candidates takes many decode steps, so that a stall would be visible.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.models import PROMPTS, build_bench_models
from benchmarks.report import machine_info, markdown_table, write_report

_ids = itertools.count()


def pct(xs: list[float], q: float) -> float:
    """Nearest-rank-interpolated percentile (numpy's default 'linear')."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def build_reward_model(cache_dir: Path, tokenizer_dir: Path, hidden: int, layers: int, heads: int,
                       intermediate: int) -> Path:
    """A random Llama sequence classifier on the benchmark tokenizer, cached by its shape."""
    from policymix.tiny_models import build_policy

    spec = {"hidden": hidden, "layers": layers, "heads": heads, "intermediate": intermediate,
            "tokenizer": str(Path(tokenizer_dir).resolve()), "format": 1}
    path = cache_dir / f"rm-h{hidden}-l{layers}-i{intermediate}"
    manifest = path / "bench_manifest.json"
    if manifest.exists() and json.loads(manifest.read_text()) == spec:
        return path
    build_policy(path, tokenizer_dir, seed=1234, hidden=hidden, layers=layers, heads=heads, kv_heads=heads,
                 intermediate=intermediate, init_std=0.02, max_positions=4096, reward=True)
    manifest.write_text(json.dumps(spec))
    return path


class ThreadScorer:
    """Diagnostic E: the same reward-model scoring looping on a plain thread of this process (no engine)."""

    def __init__(self, rm, prompt, comps):
        self.rm, self.prompt, self.comps = rm, prompt, comps
        self.count = 0
        self._go = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        threading.Thread(target=self._loop, daemon=True, name="bench-scorer").start()

    def _loop(self) -> None:
        from policymix.rerank import reward_model_scores

        while True:
            self._go.wait()
            self._idle.clear()
            with torch.inference_mode():
                while self._go.is_set():
                    reward_model_scores(self.rm, self.prompt, self.comps)
                    self.count += 1
            self._idle.set()

    def start(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._go.clear()
        self._idle.wait()


def _process_scorer(rm_path: str, prompt_text: str, comps: list[str], threads: int, go, idle, stop, count) -> None:
    import os
    import types

    os.environ["OMP_NUM_THREADS"] = str(threads)
    import torch as _torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from policymix.engine.protocol import Prompt
    from policymix.rerank import reward_model_scores

    _torch.set_num_threads(threads)
    rm = types.SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(rm_path),
                               model=AutoModelForSequenceClassification.from_pretrained(rm_path).eval())
    prompt = Prompt(text=prompt_text)
    with _torch.inference_mode():
        reward_model_scores(rm, prompt, comps)  # warm-up
        idle.set()
        while not stop.is_set():
            if not go.wait(0.05):
                continue
            idle.clear()
            while go.is_set():
                reward_model_scores(rm, prompt, comps)
                with count.get_lock():
                    count.value += 1
            idle.set()


class ProcessScorer:
    """Diagnostic D: the same scoring looping in another process: shares the CPUs, not the GIL."""

    def __init__(self, rm_path, prompt, comps, threads):
        import multiprocessing as mp

        ctx = mp.get_context("spawn")
        self._go, self._idle, self._stop = ctx.Event(), ctx.Event(), ctx.Event()
        self._count = ctx.Value("i", 0)
        self.proc = ctx.Process(target=_process_scorer, daemon=True, args=(
            str(rm_path), prompt.text, comps, threads, self._go, self._idle, self._stop, self._count))
        self.proc.start()
        FOREIGN.pids.add(self.proc.pid)
        if not self._idle.wait(300):
            raise RuntimeError("the scoring process did not start")

    @property
    def count(self) -> int:
        return self._count.value

    def start(self) -> None:
        self._go.set()

    def stop(self) -> None:
        self._go.clear()
        self._idle.wait()

    def close(self) -> None:
        self._stop.set()
        self.proc.join(10)


class ForeignCPU:
    """CPU seconds used on this machine by processes other than ours (the VM is shared: another job's
    tests would slow every scenario and make the ratios lie). Linux /proc only; None elsewhere."""

    def __init__(self):
        self.pids = {os.getpid()}
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def _snap(self):
        try:
            f = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
            user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in f[:7])
            busy = user + nice + system + irq + softirq
            own = 0
            for pid in list(self.pids):
                try:
                    st = Path(f"/proc/{pid}/stat").read_text()
                except OSError:
                    continue
                fields = st[st.rindex(")") + 2:].split()
                own += int(fields[11]) + int(fields[12])  # utime, stime (all threads)
            return busy, own
        except (OSError, ValueError, IndexError):
            return None

    def start(self):
        return self._snap()

    def since(self, snap) -> float | None:
        now = self._snap()
        if snap is None or now is None:
            return None
        return max(0.0, ((now[0] - snap[0]) - (now[1] - snap[1])) / self.tick)

    def wait_quiet(self, max_wait_s: float, window_s: float = 1.0, frac: float = 0.1) -> float:
        """Until a ``window_s`` window sees foreign CPU under ``frac`` of one CPU; returns seconds waited."""
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < max_wait_s:
            snap = self.start()
            time.sleep(window_s)
            used = self.since(snap)
            if used is None or used < frac * window_s:
                break
        return time.perf_counter() - t0


FOREIGN = ForeignCPU()


def matmul_probe(iters: int = 200) -> float:
    """ms per iteration of a fixed decode-sized matmul pair (24 rows through 256x1024 and a 32k x 256 head)."""
    g = torch.Generator().manual_seed(0)
    a, w, x = torch.randn(256, 1024, generator=g), torch.randn(32000, 256, generator=g), torch.randn(24, 256, generator=g)
    x @ a, x @ w.T
    t0 = time.perf_counter()
    for _ in range(iters):
        x @ a, x @ w.T
    return (time.perf_counter() - t0) / iters * 1e3


def machine_contention(scorer: "ProcessScorer") -> dict:
    """How much a second busy process slows this one on this machine, with no engine and no GIL involved."""
    alone = [matmul_probe() for _ in range(2)]
    scorer.start()
    time.sleep(0.3)
    busy = [matmul_probe() for _ in range(2)]
    scorer.stop()
    alone.append(matmul_probe())
    return {"probe_ms_alone": statistics.median(alone), "probe_ms_with_other_process_scoring": statistics.median(busy),
            "slowdown": statistics.median(busy) / statistics.median(alone)}


def load(args):
    from policymix.config import parse_config
    from policymix.registry import load_registry

    models = build_bench_models(args.cache_dir)
    rm_path = build_reward_model(Path(args.cache_dir).parent / "rerank-stall", models.tokenizer_dir, args.rm_hidden,
                                 args.rm_layers, args.rm_heads, args.rm_intermediate)
    cfg = parse_config({
        "policies": {"base": {"path": str(models.paths["base"].resolve()), "dtype": "float32"},
                     "rm": {"path": str(rm_path.resolve()), "kind": "reward", "dtype": "float32"}},
        "server": {"max_num_seqs": max(32, args.streams + args.best_of), "max_best_of": args.best_of,
                   "max_queue": 1000},
    })
    return load_registry(cfg), rm_path


def make_request(registry, prompt: str, rerank_kind: str | None = None, **sampling):
    from policymix.engine.protocol import GenerationRequest, Prompt, RerankSpec, SamplingParams
    from policymix.mixing.recipes import compile_recipe

    recipe = compile_recipe(None, "base", registry.infos(), registry.config.mixtures)
    rerank = None
    if rerank_kind == "reward_model":
        rerank = RerankSpec(kind="reward_model", reward_model="rm")
    elif rerank_kind == "logprob":
        rerank = RerankSpec(kind="logprob")
    return GenerationRequest(f"stall-{next(_ids)}", "base", recipe, Prompt(text=prompt), SamplingParams(**sampling),
                             rerank=rerank)


async def run_scenario(engine, args, label: str, rerank_kind: str | None, background=None) -> dict:
    """The streams alone, or with back-to-back best-of requests (``rerank_kind``) or a ``background``
    scorer (diagnostics) overlapping them."""
    from policymix.engine.protocol import RequestDone, TokenEvent

    reg = engine.registry
    arrivals: list[list[float]] = [[] for _ in range(args.streams)]
    errors: list[str] = []
    first_token = [asyncio.Event() for _ in range(args.streams)]
    streams_over = asyncio.Event()
    t_streams_end = [0.0]

    async def stream(i: int) -> None:
        req = make_request(reg, PROMPTS[i % len(PROMPTS)], max_tokens=args.stream_tokens, temperature=0.0,
                           ignore_eos=True)
        async for ev in engine.generate(engine.plan(req)):
            if isinstance(ev, TokenEvent):
                arrivals[i].append(time.perf_counter())
                first_token[i].set()
            elif isinstance(ev, RequestDone) and ev.error:
                errors.append(f"stream {i}: {ev.error_code}: {ev.error}")
        first_token[i].set()

    bo = {"completed": 0, "completed_during_streams": 0, "latencies_s": [], "candidates": [], "errors": 0}

    async def best_of_loop() -> None:
        for e in first_token:  # the streams are decoding: their prefills are not in the ITL gaps
            await e.wait()
        k = 0
        while not streams_over.is_set():
            req = make_request(reg, PROMPTS[(args.streams + k) % len(PROMPTS)], rerank_kind=rerank_kind,
                               max_tokens=args.bo_tokens, temperature=1.0, n=1, best_of=args.best_of,
                               ignore_eos=True, seed=1000 + k)
            k += 1
            t0 = time.perf_counter()
            async for ev in engine.generate(engine.plan(req)):
                if isinstance(ev, RequestDone):
                    t1 = time.perf_counter()
                    if ev.error:
                        bo["errors"] += 1
                        errors.append(f"best-of: {ev.error_code}: {ev.error}")
                        continue
                    bo["completed"] += 1
                    bo["completed_during_streams"] += not streams_over.is_set()
                    bo["latencies_s"].append(t1 - t0)
                    bo["candidates"].append(len(ev.candidates or []))

    async def background_loop() -> None:
        for e in first_token:
            await e.wait()
        background.start()

    steps0, timers0 = engine.core.steps, dict(engine.core.timers)
    cpu0 = FOREIGN.start()
    bg0 = background.count if background is not None else 0
    start = time.perf_counter()
    tasks = [asyncio.create_task(stream(i)) for i in range(args.streams)]
    side = asyncio.create_task(best_of_loop()) if rerank_kind else None
    bg = asyncio.create_task(background_loop()) if background is not None else None
    await asyncio.gather(*tasks)
    streams_over.set()
    t_streams_end[0] = time.perf_counter()
    if side is not None:
        await side  # the last best-of request finishes: the engine is idle before the next scenario
    if bg is not None:
        await bg
        bg_during = background.count - bg0
        await asyncio.get_running_loop().run_in_executor(None, background.stop)
        bo["completed_during_streams"] = bg_during  # scorings finished while the streams ran
        bo["completed"] = background.count - bg0
    foreign = FOREIGN.since(cpu0)
    steps = engine.core.steps - steps0
    fwd = sum(v - timers0.get(k, 0.0) for k, v in engine.core.timers.items() if k.startswith("forward:"))

    itl = [b - a for arr in arrivals for a, b in zip(arr, arr[1:])]
    return {
        "scenario": label, "rerank": rerank_kind or getattr(background, "label", None), "streams": args.streams,
        "tokens_per_stream": [len(a) for a in arrivals],
        "itl_p50_ms": pct(itl, 50) * 1e3, "itl_p90_ms": pct(itl, 90) * 1e3, "itl_p99_ms": pct(itl, 99) * 1e3,
        "itl_max_ms": max(itl) * 1e3 if itl else float("nan"), "itl_mean_ms": statistics.fmean(itl) * 1e3,
        "itl_count": len(itl), "streams_wall_s": t_streams_end[0] - start,
        "foreign_cpu_s": foreign, "wall_s": time.perf_counter() - start,
        "engine_steps": steps, "ms_per_step_forward": fwd / steps * 1e3 if steps else None,
        "best_of_completed": bo["completed"], "best_of_completed_during_streams": bo["completed_during_streams"],
        "best_of_latency_median_s": statistics.median(bo["latencies_s"]) if bo["latencies_s"] else None,
        "best_of_candidates": sorted(set(bo["candidates"])), "errors": errors,
    }


def scoring_alone(registry, args, repeats: int = 5) -> dict:
    """One reward-model scoring of ``best_of`` candidates, called directly (the engine idle)."""
    from policymix.engine.protocol import Prompt
    from policymix.rerank import reward_model_scores

    rm = registry.policies["rm"]
    base = registry.policies["base"]
    g = torch.Generator().manual_seed(0)
    # candidates like the engine's: bo_tokens random ids of the policy's vocabulary, decoded to text
    comps = [base.tokenizer.decode(torch.randint(10, base.vocab_size, (args.bo_tokens,), generator=g).tolist(),
                                   skip_special_tokens=True) for _ in range(args.best_of)]
    prompt = Prompt(text=PROMPTS[args.streams % len(PROMPTS)])
    lens = [len(rm.tokenizer(prompt.text + c).input_ids) for c in comps]
    times = []
    with torch.inference_mode():
        reward_model_scores(rm, prompt, comps)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            reward_model_scores(rm, prompt, comps)
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in rm.model.parameters())
    return {"candidates": args.best_of, "rm_tokens_per_candidate_max": max(lens),
            "rm_tokens_per_candidate_mean": statistics.fmean(lens), "rm_params_m": n_params / 1e6,
            "scoring_s_median": statistics.median(times), "scoring_s_all": times}, prompt, comps


async def run_all(registry, args, backgrounds: dict) -> dict:
    from policymix.engine.native import NativeEngine

    engine = NativeEngine(registry)
    await engine.start()
    scenarios = [("A", None), ("B", "reward_model")] + ([] if args.no_control else [("C", "logprob")])
    scenarios += [(label, None) for label in backgrounds]
    try:
        # warm-up: the first forwards pack weights, allocate the cache; first reward-model call too
        warm = argparse.Namespace(**{**vars(args), "stream_tokens": 8, "bo_tokens": 4})
        for label, kind in scenarios:
            await run_scenario(engine, warm, label, kind, backgrounds.get(label))
        runs: list[dict] = []
        discarded: list[dict] = []
        loop = asyncio.get_running_loop()
        for r in range(args.repeats):
            for attempt in range(args.retries + 1):
                waited = await loop.run_in_executor(None, FOREIGN.wait_quiet, args.quiet_wait_s)
                batch = []
                for label, kind in scenarios:
                    res = await run_scenario(engine, args, label, kind, backgrounds.get(label))
                    res["repeat"], res["attempt"], res["waited_for_quiet_s"] = r, attempt, waited
                    batch.append(res)
                    print(json.dumps({k: v for k, v in res.items() if k != "tokens_per_stream"}), flush=True)
                busy = [b for b in batch if b["foreign_cpu_s"] is not None
                        and b["foreign_cpu_s"] > args.max_foreign * b["wall_s"]]
                out_of_time = time.perf_counter() - args.t_start > args.max_wall_s
                if not busy or attempt == args.retries or out_of_time:
                    for b in batch:
                        b["contaminated"] = bool(busy)
                    runs += batch
                    break
                print(f"repeat {r}: other processes used the CPUs during {[b['scenario'] for b in busy]}; retrying",
                      flush=True)
                discarded += batch
    finally:
        await engine.shutdown(5.0)
    if engine._dead:
        raise RuntimeError(f"the engine died: {engine._dead}")
    return {"runs": runs, "discarded": discarded, "scenarios": [s for s, _ in scenarios]}


def summarize(runs: list[dict], scenarios: list[str]) -> tuple[list[dict], dict]:
    """Medians over the repeats no other process disturbed (over all of them when none was clean)."""
    clean = [r for r in runs if not r.get("contaminated")]
    runs = clean or runs
    rows = []
    for s in scenarios:
        rs = [r for r in runs if r["scenario"] == s]
        row = {"scenario": s, "rerank": rs[0]["rerank"] or "-"}
        for k in ("itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "itl_max_ms", "ms_per_step_forward", "streams_wall_s",
                  "best_of_completed", "best_of_completed_during_streams", "best_of_latency_median_s"):
            vals = [r[k] for r in rs if r[k] is not None]
            row[k] = statistics.median(vals) if vals else None
        rows.append(row)
    by = {r["repeat"]: {} for r in runs}
    for r in runs:
        by[r["repeat"]][r["scenario"]] = r
    ratios = {"B_over_A_p99": statistics.median(v["B"]["itl_p99_ms"] / v["A"]["itl_p99_ms"] for v in by.values()),
              "B_over_A_p50": statistics.median(v["B"]["itl_p50_ms"] / v["A"]["itl_p50_ms"] for v in by.values())}
    for d in ("D", "E"):
        if d in scenarios:
            ratios[f"{d}_over_A_p99"] = statistics.median(v[d]["itl_p99_ms"] / v["A"]["itl_p99_ms"] for v in by.values())
    if "C" in scenarios:
        ratios["C_over_A_p99"] = statistics.median(v["C"]["itl_p99_ms"] / v["A"]["itl_p99_ms"] for v in by.values())
        ratios["B_over_C_p99"] = statistics.median(v["B"]["itl_p99_ms"] / v["C"]["itl_p99_ms"] for v in by.values())
    ratios["repeats_used"] = sorted(by)
    ratios["used_contaminated"] = not clean
    ratios["per_repeat_B_over_A_p99"] = [v["B"]["itl_p99_ms"] / v["A"]["itl_p99_ms"] for v in by.values()]
    return rows, ratios


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.rerank_stall", description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (set OMP_NUM_THREADS to match)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--stream-tokens", type=int, default=256,
                   help="long enough that several best-of requests are scored while the streams run")
    p.add_argument("--best-of", type=int, default=16)
    p.add_argument("--bo-tokens", type=int, default=32)
    p.add_argument("--rm-hidden", type=int, default=768)
    p.add_argument("--rm-layers", type=int, default=6)
    p.add_argument("--rm-heads", type=int, default=12)
    p.add_argument("--rm-intermediate", type=int, default=2048)
    p.add_argument("--no-control", action="store_true", help="skip scenario C (best-of reranked by logprob)")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="skip D and E (the streams with the same scoring looping in another process / a thread)")
    p.add_argument("--max-foreign", type=float, default=0.05,
                   help="a repeat is redone when other processes used more than this fraction of one CPU in a scenario")
    p.add_argument("--retries", type=int, default=3, help="redos of a contaminated repeat")
    p.add_argument("--max-wall-s", type=float, default=360.0,
                   help="no more redos once the run has taken this long (the last try is kept, flagged)")
    p.add_argument("--quiet-wait-s", type=float, default=60.0,
                   help="before each repeat, wait up to this long for the machine to be quiet")
    p.add_argument("--target", type=float, default=1.2, help="the p99 ratio B/A the engine should stay under")
    p.add_argument("--cache-dir", default=".cache/bench-models")
    p.add_argument("--out", default="benchmarks/results/rerank_stall_cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    t_start = args.t_start = time.perf_counter()
    registry, rm_path = load(args)
    alone, prompt, comps = scoring_alone(registry, args)
    print(json.dumps(alone), flush=True)
    backgrounds = {}
    if not args.no_diagnostics:
        backgrounds["D"] = ProcessScorer(rm_path, prompt, comps, args.threads)
        backgrounds["D"].label = "(RM loop, other process)"
        backgrounds["E"] = ThreadScorer(registry.policies["rm"], prompt, comps)
        backgrounds["E"].label = "(RM loop, plain thread)"
    contention = None
    try:
        if "D" in backgrounds:
            for _ in range(args.retries + 1):
                FOREIGN.wait_quiet(args.quiet_wait_s)
                snap = FOREIGN.start()
                t0 = time.perf_counter()
                contention = machine_contention(backgrounds["D"])
                contention["foreign_cpu_s"] = FOREIGN.since(snap)
                if (contention["foreign_cpu_s"] or 0) <= args.max_foreign * (time.perf_counter() - t0):
                    break
            print(json.dumps(contention), flush=True)
        res = asyncio.run(run_all(registry, args, backgrounds))
    finally:
        if "D" in backgrounds:
            backgrounds["D"].close()
    rows, ratios = summarize(res["runs"], res["scenarios"])
    b = next(r for r in rows if r["scenario"] == "B")
    a = next(r for r in rows if r["scenario"] == "A")
    errors = [e for r in res["runs"] for e in r["errors"]]
    data = {"config": {k: v for k, v in vars(args).items() if k not in ("out", "t_start")}, "scoring_alone": alone,
            "machine_contention": contention,
            "summary": rows, "ratios": ratios, "runs": res["runs"], "discarded_runs": res["discarded"],
            "errors": errors,
            "verdict": {"target": args.target, "met": ratios["B_over_A_p99"] <= args.target},
            "total_wall_s": time.perf_counter() - t_start}

    table = markdown_table(rows, [
        ("scenario", "scenario"), ("rerank", "best-of rerank / background"), ("itl_p50_ms", "ITL p50 ms"),
        ("itl_p90_ms", "ITL p90 ms"), ("itl_p99_ms", "ITL p99 ms"), ("itl_max_ms", "ITL max ms"),
        ("ms_per_step_forward", "forward ms/step"), ("best_of_completed_during_streams", "scorings done during streams"),
        ("best_of_latency_median_s", "best-of latency s")])
    table += "\n\n" + markdown_table([{
        "b_over_a": ratios["B_over_A_p99"], "c_over_a": ratios.get("C_over_A_p99"),
        "b_over_c": ratios.get("B_over_C_p99"), "d_over_a": ratios.get("D_over_A_p99"),
        "e_over_a": ratios.get("E_over_A_p99"), "target": args.target,
        "met": "yes" if data["verdict"]["met"] else "NO",
        "scoring_ms": alone["scoring_s_median"] * 1e3, "step_ms": a["itl_p50_ms"],
        "steps": alone["scoring_s_median"] * 1e3 / a["itl_p50_ms"] if a["itl_p50_ms"] else None}], [
        ("b_over_a", "p99 B / A"), ("c_over_a", "p99 C / A"), ("b_over_c", "p99 B / C"),
        ("d_over_a", "p99 D / A"), ("e_over_a", "p99 E / A"), ("target", "target (B / A)"),
        ("met", "met"), ("scoring_ms", f"one RM scoring of {args.best_of}, alone, ms"),
        ("step_ms", "A's ITL p50 ms"), ("steps", "scoring / A's ITL p50")])
    contention_note = "" if contention is None else (
        f"\nMachine check (no engine): a fixed decode-sized matmul loop takes {contention['probe_ms_alone']:.1f} ms per "
        f"iteration alone and {contention['probe_ms_with_other_process_scoring']:.1f} ms while the scoring loop of D runs "
        f"in another process ({contention['slowdown']:.2f}x; other processes used "
        f"{contention['foreign_cpu_s'] or 0:.2f} CPU s meanwhile). A ratio near 1 means the two vCPUs do not slow "
        f"each other, so D/A measures what else is shared.\n")
    notes = f"""
Medians over {len(ratios['repeats_used'])} of {args.repeats} repeats, scenarios run alternately ({', '.join(res['scenarios'])} per repeat)
on one `NativeEngine` after a short warm-up of each. ITL = gap between consecutive `TokenEvent` arrivals of one
stream (asyncio consumer in the same process), pooled over the {args.streams} streams
({args.stream_tokens} greedy tokens each, ignore_eos). Ratios are taken within each repeat, then the median
(per repeat B/A p99: {', '.join(f'{x:.2f}' for x in ratios['per_repeat_B_over_A_p99'])}).

- A: the {args.streams} streams alone.
- B: the same streams plus back-to-back best-of-{args.best_of} requests (temperature 1, n=1,
  {args.bo_tokens} tokens, reranked by the reward model `rm`), started once every stream has its first token
  and kept going until the streams end; the median repeat scored {b['best_of_completed_during_streams']} of
  them while the streams ran.
- C (control): as B, but reranked by mean logprob (no reward model). The {args.best_of} candidates still join
  the batch, so C/A is the cost of the larger batch and B/C the cost of reward-model scoring itself.
- D (diagnostic): the streams alone in the engine while the same reward-model scoring (the {args.best_of}
  candidates of the "alone" measurement) loops in *another process* ({args.threads} thread): the floor set by
  sharing the machine's {machine_info()['cpu_count']} CPUs, with no GIL shared.
- E (diagnostic): as D but the loop runs on a plain thread of this process (the engine's design without the
  best-of decode): E vs D is what sharing the GIL (and the process's allocator, OpenMP runtime) adds.

Models: policy `base` from `benchmarks.models` (hidden 256, 4 layers, 32k vocab, float32); reward model a random
`LlamaForSequenceClassification` (hidden {args.rm_hidden}, {args.rm_layers} layers, MLP {args.rm_intermediate},
{alone['rm_params_m']:.1f}M parameters, same tokenizer). One scoring of {args.best_of} candidates
(~{alone['rm_tokens_per_candidate_mean']:.0f} tokens each) by `policymix.rerank.reward_model_scores` alone:
{alone['scoring_s_median'] * 1e3:.0f} ms, about {alone['scoring_s_median'] * 1e3 / a['itl_p50_ms']:.0f} of A's
median inter-token gaps: scoring on the step thread would show as gaps of that size in B's ITL tail
(B's largest gap, median over repeats: {b['itl_max_ms']:.0f} ms).
{contention_note}
Shared VM: CPU time used by other processes is measured during every scenario (from /proc); a repeat
where it exceeded {args.max_foreign:.0%} of one CPU in any scenario was redone (up to {args.retries} times).
Tries discarded: {len(res['discarded']) // len(res['scenarios'])}; repeats still contaminated after the last try:
{len({r['repeat'] for r in res['runs'] if r.get('contaminated')})} (left out of the medians unless no repeat was clean;
here the medians use repeats {ratios['repeats_used']}{', contaminated' if ratios['used_contaminated'] else ''}).
All tries, kept and discarded, are in the JSON with their foreign CPU seconds.

Reading: B/A = {ratios['B_over_A_p99']:.2f} against the {args.target}x target. C/A = {ratios.get('C_over_A_p99', float('nan')):.2f}
is the same best-of traffic without a reward model (its 16 candidates decode in the streams' batch, so the
step grows from {args.streams} to {args.streams + args.best_of} sequences while one is in flight), B/C =
{ratios.get('B_over_C_p99', float('nan')):.2f} what reward-model scoring adds on top, D/A =
{ratios.get('D_over_A_p99', float('nan')):.2f} and E/A = {ratios.get('E_over_A_p99', float('nan')):.2f} the cost of the scoring
computation alone running beside the streams (another process / a thread of this one).

Engine errors seen: {len(errors)}{(' (first: ' + errors[0] + ')') if errors else ''}.
"""
    meta = machine_info() | {"threads": args.threads, "command": "OMP_NUM_THREADS=1 python -m benchmarks.rerank_stall "
                             + " ".join(shlex.quote(x) for x in (argv if argv is not None else sys.argv[1:]))}
    write_report(args.out, "Reward-model reranking against other streams' inter-token latency (CPU)", meta, table,
                 data, notes)
    print(table)
    print(notes)
    return 0


if __name__ == "__main__":
    sys.exit(main())

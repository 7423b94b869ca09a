"""vLLM (CPU) against the native engine: each of three policies alone and their mixture, 1 and 16 concurrent.

    OMP_NUM_THREADS=1 python -m benchmarks.vllm_cpu vllm     # then the same with `native`

One engine per process (vLLM spawns workers). The ratio printed is the mixture's time per token over the
sum of the three policies' served alone by the same engine (issue 7's limit for vLLM: 1.3x).
"""
import asyncio, os, sys, time
os.environ.setdefault("OMP_NUM_THREADS", "1")
import torch; torch.set_num_threads(1)
from policymix.config import parse_config
from policymix.engine.protocol import GenerationRequest, Prompt, SamplingParams, RequestDone

ROOT = os.environ.get("POLICYMIX_BENCH_DIR", ".cache/bench-vllm-family")
NAMES = ["base", "dpo", "small"]
TOKENS = 64

async def one(eng, model, mixture, i):
    rec = eng.compile(model, mixture)
    req = GenerationRequest(f"b{time.time_ns()}-{i}", model, rec, Prompt(text=f"Hello world {i}"),
                            SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True))
    n = 0
    async for ev in eng.generate(eng.plan(req)):
        if not isinstance(ev, RequestDone): n += 1
    return n

async def measure(eng, model, mixture, conc, reps=2):
    await asyncio.gather(*(one(eng, model, mixture, i) for i in range(conc)))  # warm-up
    best = 0
    for _ in range(reps):
        t = time.perf_counter()
        n = sum(await asyncio.gather(*(one(eng, model, mixture, i) for i in range(conc))))
        best = max(best, n / (time.perf_counter() - t))
    return best

if __name__ == "__main__":
    if not os.path.exists(ROOT):
        from policymix.tiny_models import build_family
        build_family(ROOT, NAMES, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=512)
    cfg = parse_config({"policies": {n: {"path": f"{ROOT}/{n}"} for n in NAMES},
                        "server": {"max_num_seqs": 16, "max_model_len": 256}})
    mix = {"weights": {"base": 1.0, "dpo": 0.5, "small": -0.5}}
    kind = sys.argv[1]
    if kind == "vllm":
        from policymix.engine.vllm import VllmEngine
        eng = VllmEngine.from_config(cfg, progress=False)
    else:
        from policymix.engine.native import NativeEngine
        eng = NativeEngine.from_config(cfg, progress=False)
    async def main():
        await eng.start()
        for conc in (1, 16):
            singles = [await measure(eng, n, None, conc) for n in NAMES]
            mixed = await measure(eng, "base", mix, conc)
            # time per token of the three alone, summed, vs the mixture's
            ratio = (1 / mixed) / sum(1 / s for s in singles)
            print(f"{kind} conc={conc}: alone tok/s {[round(s) for s in singles]}, mixture {mixed:.0f} tok/s, "
                  f"mixture time / sum of alone = {ratio:.2f}", flush=True)
        await eng.shutdown(1)
    asyncio.run(main())

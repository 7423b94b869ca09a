"""Where a decode step's time goes on the GPU: the engine's forward against a plain HF decode loop.

Run on a lent CUDA machine (see gpu_check.sh); prints torch.profiler tables.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "server"), str(ROOT)]


def main() -> int:
    from transformers import DynamicCache

    import benchmarks.gpu_check as g
    from benchmarks.engine_bench import registry_from_models, run_engine

    shape = sys.argv[1] if len(sys.argv) > 1 else "qwen2-0.5b"
    models = g.build(shape, 1)
    m = models["p0"]
    tok = g.wordlevel_tokenizer(g.SHAPES[shape]["vocab_size"])
    reg = registry_from_models(models, tok, device=g.DEVICE, dtype=g.DTYPE)
    prompts = torch.randint(4, 1000, (1, 128)).tolist()
    run_engine(reg, {"p0": 1.0}, prompts, 8, 1, sync=g._sync)
    r = run_engine(reg, {"p0": 1.0}, prompts, 64, 1, sync=g._sync)
    print(f"engine: {r.wall_s / r.steps * 1e3:.2f} ms/step  timers {r.timers}")
    ids = torch.tensor(prompts, device=g.DEVICE)
    with torch.no_grad():
        cache = DynamicCache(config=m.config)
        out = m(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        g._sync()
        t = time.perf_counter()
        for _ in range(64):
            out = m(input_ids=out.logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True, logits_to_keep=1)
        g._sync()
        print(f"HF DynamicCache decode: {(time.perf_counter() - t) / 64 * 1e3:.2f} ms/step")
    acts = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if g.DEVICE == "cuda" else [])
    with torch.profiler.profile(activities=acts) as prof:
        run_engine(reg, {"p0": 1.0}, prompts, 16, 1, sync=g._sync)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
    if g.DEVICE == "cuda":
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(main())

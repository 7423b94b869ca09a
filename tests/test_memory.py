"""A long run of requests (finishes, aborts, n > 1, best-of, prompt variants) leaves the engine's memory flat."""

from __future__ import annotations

import gc

import psutil

from engine_helpers import make_request, run_until_done, submit
from policymix.engine.core import EngineCore


def test_long_run_leaves_no_cache_behind(tiny_registry):
    core = EngineCore(tiny_registry)
    proc = psutil.Process()

    def wave(i):
        cols, aborted = [], []
        for j in range(12):
            # the same shapes every wave (lengths, models, n), other seeds: the caches' working size is reached
            # in the warm-up, so any growth after it would be a leak
            kw = dict(max_tokens=4 + (j * 7) % 21, temperature=1.0, seed=i * 100 + j, ignore_eos=True)
            if j % 4 == 1:
                kw["n"] = 2
            if j % 4 == 2:
                kw["best_of"] = 3
            mixture = {"weights": {"base": 0.5, "small": 0.5}} if j % 6 == 0 else \
                {"guidance": {"policy": "base", "scale": 1.5, "negative_prompt": f"Not {j}"}} if j % 6 == 3 else None
            req = make_request(core, ["base", "dpo", "formal"][j % 3], mixture, f"Prompt {j}", **kw)
            col = submit(core, req)
            (aborted if j % 5 == 4 else cols).append((req, col))
        for _ in range(3):
            core.step()
        for req, _ in aborted:
            core.abort(req.request_id)
        run_until_done(core, [c for _, c in cols])
        assert all(not r.slots for r in core.runners.values())
        assert all(v == 0 for v in core.reserved.values())
        assert not core.running and not core.waiting

    for i in range(3):  # warm-up: caches grow to their working size
        wave(i)
    gc.collect()
    kv_after_warmup = sum(r.cache.nbytes() for r in core.runners.values())
    rss_after_warmup = proc.memory_info().rss
    for i in range(3, 23):
        wave(i)
    gc.collect()
    assert sum(r.cache.nbytes() for r in core.runners.values()) == kv_after_warmup
    assert proc.memory_info().rss - rss_after_warmup < 64 * 2**20  # flat, up to allocator noise

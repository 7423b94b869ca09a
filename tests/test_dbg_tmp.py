import asyncio, time, httpx
from test_reliability import native_server, slow_down, auth

def test_dbg(tiny_registry):
    with native_server(tiny_registry, [("single", {"max_concurrent": 1}), ("other", {})], max_num_seqs=1, max_queue=1) as (srv, engine):
        slow_down(engine, 0.02)
        import traceback
        real_abort = engine.abort
        async def abort(rid):
            print("ABORT", rid); traceback.print_stack(limit=12)
            await real_abort(rid)
        engine.abort = abort
        real_post = engine._post
        def post(item):
            print("POST", item); traceback.print_stack(limit=14)
            real_post(item)
        engine._post = post
        t0 = time.monotonic()
        async def run():
            async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
                long_body = {"model": "base", "prompt": "Hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
                short = {"model": "base", "prompt": "Hi", "max_tokens": 2}
                async with c.stream("POST", "/v1/completions", json=long_body, headers=auth("single")) as r:
                    await anext(r.aiter_lines())
                    print("running", len(engine.core.running), engine.core.max_num_seqs, engine.core.max_queue)
                    async def one(i):
                        x = await c.post("/v1/completions", json=short, headers=auth("other"))
                        print(i, x.status_code, round(time.monotonic()-t0, 3), x.text[:100], engine.stats()["waiting"], len(engine.core.running))
                        return x
                    burst = [asyncio.create_task(one(i)) for i in range(4)]
                    for _ in range(300):
                        if sum(t.done() for t in burst) >= 3: break
                        await asyncio.sleep(0.01)
                    print("loop end", round(time.monotonic()-t0, 3), engine.stats(), [s.req.request_id for s in engine.core.running], [s.req.request_id for s in engine.core.waiting])
                return await asyncio.gather(*burst)
        asyncio.run(run())

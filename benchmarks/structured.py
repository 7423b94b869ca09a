"""The cost of constrained decoding (structured outputs) as a fraction of a decode step (CPU).

    OMP_NUM_THREADS=1 python -m benchmarks.structured --threads 1 --out benchmarks/results/structured_cpu

The benchmark model set (random Llama policies, hidden 256, 4 layers, vocab 32k), greedy, ``--concurrency``
(16) requests in flight in a closed loop, each under a JSON schema (compact JSON), one policy and the
three-policy proxy-tuning mixture. Reported per decode step, medians over ``--repeats``:

- ``mask``: the engine's own ``grammar`` timer: every constrained row's xgrammar bitmask filled and applied
  to the mixed scores (``engine/structured.py``, ``mask_rows``);
- ``advance``: the matchers advanced by the step's tokens, replayed afterwards on the same tokens (this
  runs inside the output processor, whose timer also holds detokenization);
- ``step``: the wall time of a step; the fraction is ``(mask + advance) / (step - mask - advance)``: the
  constrained step against the same step without the grammar. The issue's bound is 10%.
"""

from __future__ import annotations

import argparse
import itertools
import shlex
import statistics
import sys
import time

from benchmarks.anchors.common import torch_threads
from benchmarks.engine_bench import registry_from_models
from benchmarks.models import PROMPTS, build_bench_models, load_policies, load_tokenizer
from benchmarks.report import machine_info, markdown_table, write_report
from policymix.engine.core import EngineCore
from policymix.engine.protocol import Constraint, GenerationRequest, Prompt, RequestDone, SamplingParams
from policymix.engine.structured import new_matcher
from policymix.mixing.recipes import compile_recipe

_ids = itertools.count()

SCHEMA = {  # an order form: bounded numbers, enums, a short pattern string, a nested array
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0, "maximum": 99999},
        "status": {"enum": ["open", "paid", "shipped", "cancelled"]},
        "customer": {"type": "string", "pattern": "^[A-Za-z ]{1,12}$"},
        "express": {"type": "boolean"},
        "items": {"type": "array", "maxItems": 3, "items": {
            "type": "object", "properties": {"sku": {"type": "integer", "minimum": 0, "maximum": 999},
                                             "qty": {"type": "integer", "minimum": 1, "maximum": 9}},
            "required": ["sku", "qty"]}},
    },
    "required": ["id", "status", "customer", "express", "items"],
}
RECIPES = {"one policy": {"weights": {"base": 1.0}},
           "proxy tuning (3 policies)": {"proxy": {"base": "base", "tuned": "tuned", "untuned": "untuned",
                                                   "alpha": 1.0}}}


def serve(core: EngineCore, mixture: dict, prompts: list[list[int]], concurrency: int, tokens: int) -> dict:
    """Serve every prompt under SCHEMA, ``concurrency`` in flight; seconds, steps and the engine's grammar time."""
    reg = core.registry
    recipe = compile_recipe(mixture, "base", reg.infos(), {})
    pending, done = list(enumerate(prompts)), {}
    eos = reg.policies["base"].tokenizer.eos_token_id  # (the in-memory registry records no EOS ids)

    def submit(i, ids):
        req = GenerationRequest(f"g{next(_ids)}", "base", recipe, Prompt(token_ids=ids),
                                SamplingParams(max_tokens=tokens, temperature=0.0, stop_token_ids=[eos]),
                                constraint=Constraint("json", SCHEMA, any_whitespace=False))
        state = core.render(req)
        state.emit = lambda ev: done.__setitem__(i, ev) if isinstance(ev, RequestDone) else None
        core.add(state)

    core.timers.clear()
    steps0 = core.steps
    start = time.perf_counter()
    for _ in range(min(concurrency, len(pending))):
        submit(*pending.pop(0))
    while core.has_work():
        before = len(done)
        core.step()
        for _ in range(len(done) - before):
            if pending:
                submit(*pending.pop(0))
    wall = time.perf_counter() - start
    done = [done[i] for i in sorted(done)]
    assert all(d.error is None for d in done), [d.error for d in done]
    outs = [d.sequences[0].token_ids for d in done]
    # the matchers' advance, replayed on the same tokens (its cost inside a step is the same calls)
    grammar = core.render(GenerationRequest("replay", "base", recipe, Prompt(token_ids=prompts[0]),
                                            SamplingParams(max_tokens=tokens, temperature=0.0, stop_token_ids=[eos]),
                                            constraint=Constraint("json", SCHEMA, any_whitespace=False))).plan.grammar
    matchers = [new_matcher(grammar) for _ in outs]
    t = time.perf_counter()
    for m, out in zip(matchers, outs):
        for tok in out:
            assert m.accept_token(tok)
    advance = time.perf_counter() - t
    return {"s": wall, "steps": core.steps - steps0, "tokens": sum(len(o) for o in outs),
            "mask_s": core.timers.get("grammar", 0.0), "advance_s": advance,
            "finished_stop": sum(d.sequences[0].finish_reason == "stop" for d in done) / len(done)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--tokens", type=int, default=160)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/structured_cpu")
    args = ap.parse_args(argv)
    models = build_bench_models()
    tok = load_tokenizer(models.tokenizer_dir)
    rows, data = [], {}
    with torch_threads(args.threads):
        reg = registry_from_models(load_policies(models.paths), tok, max_num_seqs=max(64, args.concurrency))
        prompts = [tok(PROMPTS[i % len(PROMPTS)]).input_ids for i in range(args.requests)]
        core = EngineCore(reg)
        if core.parallel is not None:
            core.parallel.shutdown()
            core.parallel = None
        serve(core, RECIPES["one policy"], prompts[: args.concurrency], args.concurrency, 16)  # warm up
        for label, mixture in RECIPES.items():
            per = [serve(core, mixture, prompts, args.concurrency, args.tokens) for _ in range(args.repeats)]
            step = statistics.median(r["s"] / r["steps"] for r in per)
            mask = statistics.median(r["mask_s"] / r["steps"] for r in per)
            adv = statistics.median(r["advance_s"] / r["steps"] for r in per)
            rows.append({"recipe": label, "step_ms": step * 1e3, "mask_ms": mask * 1e3, "advance_ms": adv * 1e3,
                         "fraction": (mask + adv) / (step - mask - adv),
                         "tok_s": statistics.median(r["tokens"] / r["s"] for r in per),
                         "stop": statistics.median(r["finished_stop"] for r in per)})
            data[label] = per
    args_text = " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    cmd = "OMP_NUM_THREADS=1 python -m benchmarks.structured " + args_text
    meta = {**machine_info(), "threads": args.threads, "concurrency": args.concurrency, "requests": args.requests,
            "command": cmd}
    table = markdown_table(rows, [("recipe", "recipe"), ("step_ms", "decode step (ms)"),
                                  ("mask_ms", "mask fill + apply (ms/step)"),
                                  ("advance_ms", "matcher advance (ms/step)"),
                                  ("fraction", "grammar / unconstrained step"), ("tok_s", "tok/s"),
                                  ("stop", "requests ending on the grammar's stop")])
    notes = ("Greedy, compact JSON (`structured_outputs.disable_any_whitespace`), the schema in "
             "`benchmarks/structured.py`. The mask is xgrammar's bitmask filled per constrained row and applied to "
             "the mixed scores [16, 32000] (whole forbidden 32-token words by one broadcast add, mixed words bit "
             "by bit); the advance is one `accept_token` per generated token.")
    md, js = write_report(args.out, "Structured outputs: the grammar's cost per decode step (CPU)", meta, table,
                          {"rows": rows, "runs": data}, notes)
    print(md.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

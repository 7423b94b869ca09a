"""``python -m benchmarks.serve``: load a running OpenAI-compatible server with streaming completions.

Requests arrive as a Poisson process (``--burstiness 1``) or a gamma process (other burstiness) at
``--request-rate`` per second, or all at once (rate inf), optionally capped at ``--max-concurrency``
in flight. Same wire format as vLLM's server, so the same run drives policymix or vLLM:

    python -m benchmarks.serve --base-url http://127.0.0.1:8000 --model base \\
        --mixture '{"proxy": {"base": "base", "tuned": "tuned", "untuned": "untuned", "alpha": 1.0}}' \\
        --num-prompts 64 --input-len 32 --output-len 128 --max-concurrency 16 --vocab-size 32000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

from .memory import ProcessRssSampler, mib
from .report import RESULTS_DIR, machine_info, write_report
from .serve_client import RequestResult, build_payload, stream_completion
from .serve_data import SampleRequest, jsonl_requests, random_requests
from .serve_metrics import summarize, summary_table


@dataclass
class ServeConfig:
    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    mixture: dict | str | None = None  # the request's "mixture" field (policymix); None for vLLM
    dataset: str = "random"  # random | jsonl
    dataset_path: str | None = None
    num_prompts: int = 100
    input_len: int = 128
    output_len: int = 128
    range_ratio: float = 0.0  # lengths uniform in [len * (1 - r), len * (1 + r)]
    prompt_kind: str = "ids"  # ids | text
    vocab_size: int | None = None
    tokenizer: str | None = None  # local HF tokenizer dir (exact prompt lengths for text)
    request_rate: float = math.inf  # requests/s; inf: all at once
    burstiness: float = 1.0  # gamma shape: 1 Poisson, < 1 burstier, > 1 more regular
    max_concurrency: int | None = None
    ignore_eos: bool = True
    temperature: float = 0.0
    seed: int = 0
    server_pid: int | None = None  # sample this process's RSS (and children's) during the run
    api_key: str | None = None
    timeout_s: float = 600.0
    extra_body: dict = field(default_factory=dict)
    test_request: bool = True  # one request first, fail fast if the server cannot answer
    save_requests: bool = False  # per-request timings in the JSON


def load_requests(cfg: ServeConfig) -> list[SampleRequest]:
    if cfg.dataset == "jsonl":
        if not cfg.dataset_path:
            raise ValueError("--dataset jsonl needs --dataset-path")
        return jsonl_requests(cfg.dataset_path, cfg.output_len, cfg.num_prompts)
    if cfg.dataset != "random":
        raise ValueError(f"unknown dataset {cfg.dataset!r}")
    tokenizer = None
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer)
    return random_requests(cfg.num_prompts, cfg.input_len, cfg.output_len, cfg.range_ratio, cfg.prompt_kind,
                           cfg.vocab_size, tokenizer, cfg.seed)


async def _arrivals(requests: list[SampleRequest], rate: float, burstiness: float, rng: random.Random):
    """Yield requests spaced by gamma(shape=burstiness, mean=1/rate) gaps (exponential when shape 1)."""
    for i, req in enumerate(requests):
        yield req
        if math.isfinite(rate) and i < len(requests) - 1:
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def benchmark(cfg: ServeConfig, requests: list[SampleRequest]) -> tuple[list[RequestResult], dict]:
    """Send every request, return per-request results and the summary (with peak server memory)."""
    if cfg.request_rate <= 0 or cfg.burstiness <= 0:
        raise ValueError("request rate and burstiness must be > 0")
    url = cfg.base_url.rstrip("/") + cfg.endpoint
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else None
    limits = httpx.Limits(max_connections=cfg.max_concurrency, max_keepalive_connections=cfg.max_concurrency)
    semaphore = asyncio.Semaphore(cfg.max_concurrency) if cfg.max_concurrency else None

    def payload(req: SampleRequest) -> dict:
        return build_payload(cfg.model, req.prompt, req.output_len, cfg.ignore_eos, cfg.temperature,
                             cfg.mixture, cfg.extra_body)

    async with httpx.AsyncClient(timeout=httpx.Timeout(cfg.timeout_s), limits=limits) as client:
        if cfg.test_request:
            first = await stream_completion(client, url, payload(requests[0]), headers)
            if not first.success:
                raise RuntimeError(f"test request to {url} failed: {first.error}")

        async def one(req: SampleRequest) -> RequestResult:
            if semaphore is None:
                return await stream_completion(client, url, payload(req), headers)
            async with semaphore:
                return await stream_completion(client, url, payload(req), headers)

        sampler = ProcessRssSampler(cfg.server_pid).start() if cfg.server_pid else None
        start = time.perf_counter()
        tasks = []
        async for req in _arrivals(requests, cfg.request_rate, cfg.burstiness, random.Random(cfg.seed)):
            tasks.append(asyncio.create_task(one(req)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    if sampler is not None:
        sampler.stop()
        summary["server_rss_start_mib"] = mib(sampler.start_bytes)
        summary["peak_server_rss_mib"] = mib(sampler.peak_bytes)
    return list(results), summary


def run_serve_benchmark(cfg: ServeConfig) -> dict:
    """Run the benchmark; returns ``{"config", "summary", "requests"?}`` ready for JSON."""
    requests = load_requests(cfg)
    results, summary = asyncio.run(benchmark(cfg, requests))
    out = {"config": {k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                      for k, v in asdict(cfg).items() if k != "api_key"}, "summary": summary}
    if cfg.save_requests:
        out["requests"] = [{k: v for k, v in asdict(r).items() if k != "text"} for r in results]
    return out


def write_serve_results(result: dict, stem: str | Path, command: str = "") -> tuple[Path, Path]:
    cfg = result["config"]
    arrivals = ("all at once" if cfg["request_rate"] == "inf"
                else f"{cfg['request_rate']} req/s, burstiness {cfg['burstiness']}")
    dataset = (f"jsonl {cfg['dataset_path']}" if cfg["dataset"] == "jsonl" else
               f"random {cfg['prompt_kind']}, input {cfg['input_len']}, output {cfg['output_len']}, "
               f"range ratio {cfg['range_ratio']}")
    meta = {
        **machine_info(),
        "server": cfg["base_url"] + cfg["endpoint"],
        "model": cfg["model"],
        "mixture": json.dumps(cfg["mixture"]) if cfg["mixture"] is not None else "-",
        "requests": f"{cfg['num_prompts']} ({dataset}), ignore_eos {cfg['ignore_eos']}, "
                    f"temperature {cfg['temperature']}",
        "arrivals": arrivals + (f", max concurrency {cfg['max_concurrency']}" if cfg["max_concurrency"] else ""),
    }
    if command:
        meta["command"] = command
    return write_report(stem, "Serving benchmark", meta, summary_table(result["summary"]), result)


def _json_or_name(text: str) -> dict | str:
    """'{"weights": ...}' -> a recipe dict; a bare word (or a JSON string) -> a named mixture."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_args(argv: list[str] | None = None) -> tuple[ServeConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve", description=__doc__.splitlines()[0])
    p.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8000")
    p.add_argument("--endpoint", default="/v1/completions")
    p.add_argument("--model", required=True)
    p.add_argument("--mixture", type=_json_or_name, default=None, help="a JSON recipe, or a named mixture")
    p.add_argument("--dataset", choices=["random", "jsonl"], default="random")
    p.add_argument("--dataset-path")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--range-ratio", type=float, default=0.0)
    p.add_argument("--prompt-kind", choices=["ids", "text"], default="ids")
    p.add_argument("--vocab-size", type=int, help="token ids are drawn from [0, vocab-size)")
    p.add_argument("--tokenizer", help="local tokenizer dir: ids avoid special tokens, text has exact length")
    p.add_argument("--request-rate", type=float, default=math.inf)
    p.add_argument("--burstiness", type=float, default=1.0)
    p.add_argument("--max-concurrency", type=int)
    p.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--server-pid", type=int, help="sample this server's peak RSS during the run")
    p.add_argument("--api-key")
    p.add_argument("--timeout", dest="timeout_s", type=float, default=600.0)
    p.add_argument("--extra-body", type=json.loads, default={}, help="JSON merged into every request body")
    p.add_argument("--no-test-request", dest="test_request", action="store_false")
    p.add_argument("--save-requests", action="store_true", help="per-request timings in the JSON")
    p.add_argument("--result-dir", default=str(RESULTS_DIR))
    p.add_argument("--result-name", default=None, help="file stem (default serve-<model>-<time>)")
    p.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args(argv)
    keys = ServeConfig.__dataclass_fields__.keys()
    cfg = ServeConfig(**{k: v for k, v in vars(args).items() if k in keys})
    return cfg, args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    result = run_serve_benchmark(cfg)
    print(summary_table(result["summary"]))
    if args.save:
        name = args.result_name or f"serve-{cfg.model}-{time.strftime('%Y%m%d-%H%M%S')}"
        command = "python -m benchmarks.serve " + shlex.join(argv if argv is not None else sys.argv[1:])
        md, js = write_serve_results(result, Path(args.result_dir) / name, command)
        print(f"wrote {md} and {js}", file=sys.stderr)
    return 0 if result["summary"]["failed"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())

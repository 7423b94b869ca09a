"""``VllmEngine``: the EngineClient over one vLLM ``AsyncLLM`` per tokenizer family.

The engines live on a private asyncio loop in one background thread (as the native engine's core
lives on its thread), so the API may call from any event loop; events come back through each
request's queue with ``call_soon_threadsafe``. A request of ``best_of`` sequences is ``best_of``
vLLM requests of one sequence each (vLLM's own ``n`` does the same inside; doing it here lets a
stop string end one sequence and keeps the seeds per sequence). Each vLLM request carries its
weights over the family's policies in ``SamplingParams.extra_args``.
"""

from __future__ import annotations

import asyncio
import json
from contextlib import aclosing
import logging
import os
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from ...config import Config
from ...errors import ConfigError, PolicymixError
from ...registry import Registry
from ..protocol import (EngineError, EngineEvent, ErrorKind, GenerationRequest, PromptEvent, PromptLogprob, RequestDone,
                        RequestPlan, TokenEvent)
from ..requests import RegistryEngineClient, event_stream
from ..sequence import SequenceOutput
from ..structured import bounded_strings
from .catalog import load_catalog
from .checkpoint import Member, read_config, attr_name, build_checkpoint
from .channel import CHANNEL_KEY, Receiver, new_address
from .jobs import Job
from .settings import VllmSettings, cpu_threads_bind

log = logging.getLogger("policymix.engine.vllm")

POLICY_LOGPROBS_TIMEOUT_S = 120.0  # a token's per-policy logprobs arrive one engine step after the token


@dataclass
class _Family:
    members: list[str]  # policy names, in composite order
    folder: Path
    llm: Any = None  # vllm AsyncLLM


def _kv_bytes_per_token(path: str, dtype_bytes: int, tp: int = 1, pp: int = 1) -> int:
    """KV bytes per token that one worker holds: its share of the KV heads (tensor parallel; replicated
    when there are fewer heads than workers) and of the layers (pipeline parallel)."""
    cfg = read_config(path)
    text = cfg.get("text_config") or cfg
    heads = text.get("num_attention_heads", 1)
    head_dim = text.get("head_dim") or text.get("hidden_size", 64) // heads
    kv_heads = max(1, text.get("num_key_value_heads", heads) // tp)
    layers = -(-text.get("num_hidden_layers", 1) // pp)
    return 2 * layers * kv_heads * head_dim * dtype_bytes


class VllmEngine(RegistryEngineClient):
    def __init__(self, registry: Registry, paths: dict[str, str], settings: VllmSettings | None = None,
                 progress: Callable[[str], None] | None = None):
        self.registry = registry
        self.paths = paths
        self.settings = settings or VllmSettings()
        self._progress = progress or (lambda msg: None)
        self.families: dict[int, _Family] = {}
        self.unservable: dict[str, str] = {}  # policy -> why the vLLM engine cannot run it
        self._jobs: dict[str, tuple[Job, Future]] = {}
        self._receiver: Receiver | None = None  # per-policy logprobs from the workers (channel.py)
        self._running_seqs = 0
        self._draining = False
        self._dead: str | None = None
        self.on_fatal: Callable[[str], None] | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="policymix-vllm", daemon=True)
        self._thread.start()
        try:
            self._plan()
            for family, fam in self.families.items():
                self._progress(f"starting vLLM for family {family}: {', '.join(fam.members)} ({fam.folder})")
                t = time.monotonic()
                self._call(self._start(family, fam)).result()
                self._progress(f"vLLM for family {family} ready in {time.monotonic() - t:.0f} s")
        except BaseException:
            self._close_now()
            raise

    @classmethod
    def from_config(cls, cfg: Config, progress: bool = True, settings: VllmSettings | None = None) -> "VllmEngine":
        """``settings`` default to the config's ``server.vllm`` with ``POLICYMIX_VLLM_*`` overrides."""
        import torch

        settings = settings or VllmSettings.resolve(cfg.server.vllm)
        spec = settings.spec
        if spec.pipeline_parallel_size > 1 and spec.enforce_eager and not torch.cuda.is_available():
            # vllm/v1/worker/cpu_model_runner.py: warming_up_model returns at once in eager mode, so the
            # later stages' intermediate-tensor buffers are never made (an AssertionError at the first step)
            raise ConfigError("server.vllm.pipeline_parallel_size: on CPU, vLLM 0.32 runs pipeline stages only "
                              "with enforce_eager: false (docs/vllm.md, Settings)")
        if spec.max_model_len is not None:  # vLLM's context cap is the API's too (registry.check_length)
            cfg = cfg.model_copy(deep=True)
            cfg.server.max_model_len = spec.max_model_len
        report = (lambda msg: print(msg, flush=True)) if progress else None
        registry, paths = load_catalog(cfg, progress=report)
        return cls(registry, paths, settings, progress=report)

    # ----- start ------------------------------------------------------------------------------

    def _plan(self) -> None:
        """One composite per family: its causal policies without a system prompt, in config order."""
        from ...embedded import cache_root

        reg = self.registry
        cache = self.settings.cache_dir or cache_root() / "vllm"
        by_family: dict[int, list[str]] = {}
        for name, p in reg.policies.items():
            if p.kind != "causal":
                continue
            if p.system_prompt:
                self.unservable[name] = (f"policy {name!r} has a system prompt; the vLLM engine runs every policy "
                                         "of a family on one prompt (use --engine native for prompted policies)")
                continue
            by_family.setdefault(p.family, []).append(name)
        for family, names in by_family.items():
            members = [Member(n, self.paths[n], attr_name(i)) for i, n in enumerate(names)]
            tok = reg.policies[names[0]].tokenizer
            folder = build_checkpoint(members, tok, reg.max_model_len(family), cache)
            self.families[family] = _Family(names, folder)

    def _engine_args(self, family: int, fam: _Family):
        import torch
        from vllm import AsyncEngineArgs

        from .table import WeightTable

        reg, s = self.registry, self.settings.spec
        srv = reg.config.server
        max_len = reg.max_model_len(family)
        on_cpu = not torch.cuda.is_available()
        spec = reg.policies[fam.members[0]].spec
        dtype = "float32" if on_cpu and spec.dtype == "auto" else spec.dtype  # the native engine's choice on CPU
        kw: dict[str, Any] = {}
        kv_bytes = s.kv_cache_memory_bytes
        if kv_bytes is None and (on_cpu or srv.kv_budget_tokens):
            per_token = sum(_kv_bytes_per_token(self.paths[n], 4 if dtype == "float32" else 2,
                                                s.tensor_parallel_size, s.pipeline_parallel_size)
                            for n in fam.members)
            tokens = srv.kv_budget_tokens or max(max_len, min(srv.max_num_seqs * max_len, 16384))
            kv_bytes = per_token * (tokens + 64)  # a few blocks of slack for vLLM's block rounding
        if kv_bytes is not None:
            kw["kv_cache_memory_bytes"] = kv_bytes
        if s.gpu_memory_utilization is not None:
            kw["gpu_memory_utilization"] = s.gpu_memory_utilization
        return AsyncEngineArgs(
            # the tokenizer is loaded for vLLM's structured-output backend only (requests are token ids, never
            # detokenized there)
            model=str(fam.folder), tokenizer=str(fam.folder), skip_tokenizer_init=False, dtype=dtype,
            max_model_len=max_len, max_num_seqs=srv.max_num_seqs, enforce_eager=s.enforce_eager,
            tensor_parallel_size=s.tensor_parallel_size, pipeline_parallel_size=s.pipeline_parallel_size,
            distributed_executor_backend=s.distributed_executor_backend, logits_processors=[WeightTable],
            generation_config="vllm", seed=0, disable_log_stats=True,
            hf_overrides={CHANNEL_KEY: self._receiver.address},
            async_scheduling=False,  # the weight table reads each sampled token from the request's output list
            max_logprobs=-1,  # the API caps top_logprobs; the engine may return whole distributions (tests)
            **kw)

    async def _start(self, family: int, fam: _Family) -> None:
        # The weight table follows the legacy model runner's batch; the V2 runner (GPU default) has
        # another logits-processor interface. Both sub-models would write one torch.compile cache file.
        os.environ["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if not self.settings.spec.enforce_eager:
            os.environ["VLLM_DISABLE_COMPILE_CACHE"] = "1"
        self._bind_cpu_threads()
        from vllm.v1.engine.async_llm import AsyncLLM

        from .plugin import register

        register()
        if self._receiver is None:
            self._receiver = Receiver(new_address())
            self._receiver.start()
        fam.llm = AsyncLLM.from_engine_args(self._engine_args(family, fam))

    def _bind_cpu_threads(self) -> None:
        """CPU workers' OpenMP threads (vLLM reads VLLM_CPU_OMP_THREADS_BIND in the processes it spawns)."""
        import torch

        spec = self.settings.spec
        if spec.cpu_threads_bind is not None:
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = spec.cpu_threads_bind
        elif (self.settings.world_size > 1 and not torch.cuda.is_available()
              and not os.environ.get("VLLM_CPU_OMP_THREADS_BIND")):
            os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind(self.settings.world_size,
                                                                       sorted(os.sched_getaffinity(0)))

    def _call(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    # ----- EngineClient -----------------------------------------------------------------------

    def plan(self, request: GenerationRequest) -> RequestPlan:
        """The shared plan, refused where a policy it runs cannot run here (raises naming the field)."""
        for name in request.recipe.active:
            if name in self.unservable:
                raise PolicymixError(self.unservable[name], param="mixture" if request.recipe.form != "single" else "model")
        c = request.constraint
        if c is not None and not c.any_whitespace:  # vLLM's xgrammar backend reads it from the engine's config only
            raise PolicymixError("structured_outputs.disable_any_whitespace is not available per request on --engine "
                                 "vllm (vLLM reads it from the engine's config); use --engine native",
                                 param="structured_outputs.disable_any_whitespace")
        if request.search is not None:
            raise PolicymixError("search is not available on --engine vllm (a beam branches mid-sequence); use "
                                 "--engine native", param="search")
        if request.speculative is not None:
            raise PolicymixError("speculative is not available on --engine vllm: vLLM's own speculative decoding "
                                 "verifies against one model, not a mixture (docs/vllm.md); use --engine native",
                                 param="speculative")
        if request.rerank is not None and request.rerank.prune_every is not None:
            raise PolicymixError("rerank.prune is not available on --engine vllm (candidates are separate vLLM "
                                 "requests scored at the end); use --engine native", param="rerank.prune")
        if request.recipe.variants:
            which = "guidance" if request.recipe.form == "guidance" else \
                "context_aware" if request.recipe.form == "context_aware" else "prompt_variants"
            raise PolicymixError(f"prompt variants (mixture.{which}) are not available on --engine vllm: a variant "
                                 "needs its own cache rows beside its policy's, and the composite runs one prompt per "
                                 "request (docs/vllm.md); use --engine native", param=f"mixture.{which}")
        plan = super().plan(request)
        for name in plan.observers:
            if name in self.unservable:
                raise PolicymixError(self.unservable[name], param="rerank.implicit")
        return plan

    def _job(self, plan: RequestPlan) -> Job:
        fam = self.families[plan.request.recipe.family]
        weights = [float(plan.weights.get(name, 0.0)) for name in fam.members]
        # every policy of a family sees one rendering here (prompted policies are refused at start)
        tokenizer = self.registry.policies[plan.leader].tokenizer
        return Job(plan, weights, tokenizer, policies={n: fam.members.index(n) for n in plan.weights})

    async def generate(self, plan: RequestPlan) -> AsyncIterator[EngineEvent]:
        if self._dead or self._draining:
            raise EngineError(ErrorKind.OVERLOADED, "the engine is not accepting requests (shutting down or stopped)",
                              "engine_stopped")
        srv = self.registry.config.server
        if self._waiting() >= srv.max_num_seqs + srv.max_queue:  # the native engine's rule
            raise EngineError(ErrorKind.OVERLOADED, f"the server is full ({srv.max_queue} requests waiting)",
                              "server_overloaded")
        job = self._job(plan)
        rid = plan.request.request_id

        def start(emit) -> None:
            job.emit = emit
            self._jobs[rid] = (job, self._call(self._run(job)))

        def finish(done: bool) -> None:
            entry = self._jobs.pop(rid, None)
            if not done and entry is not None:  # the client went away: abort its vLLM requests now
                entry[1].cancel()

        async with aclosing(event_stream(start, finish)) as events:  # closed at once if our consumer leaves
            async for ev in events:
                yield ev

    def _waiting(self) -> int:
        """Requests inside that have not produced a token yet (queued in vLLM, or in their prefill)."""
        return sum(1 for job, _ in self._jobs.values() if not any(s.output_ids for s in job.seqs))

    async def abort(self, request_id: str) -> None:
        entry = self._jobs.get(request_id)
        if entry is not None:
            entry[1].cancel()

    def is_healthy(self) -> bool:
        if self._dead is not None or not self._thread.is_alive():
            return False
        return all(f.llm is not None and not f.llm.errored for f in self.families.values())

    def stats(self) -> dict[str, Any]:
        unfinished = {f: fam.llm.output_processor.get_num_unfinished_requests()
                      for f, fam in self.families.items() if fam.llm is not None}
        waiting = self._waiting()
        return {"running": self._running_seqs, "running_requests": len(self._jobs) - waiting, "waiting": waiting,
                "forwards": {}, "vllm_unfinished": unfinished}

    async def start(self) -> None:
        return None  # vLLM's engines run from construction on

    async def shutdown(self, deadline_s: float = 30.0) -> None:
        """Stop admitting; let running requests finish until the deadline, then abort the rest."""
        self._draining = True
        end = time.monotonic() + deadline_s
        while self._jobs and time.monotonic() < end:
            await asyncio.sleep(0.02)
        for _, fut in list(self._jobs.values()):
            fut.cancel()
        await asyncio.get_running_loop().run_in_executor(None, self._close_now)

    def _close_now(self) -> None:
        for fam in self.families.values():
            if fam.llm is not None:
                try:
                    fam.llm.shutdown()
                except Exception:  # noqa: BLE001 - best effort at exit
                    log.exception("vLLM shutdown failed")
                fam.llm = None
        if self._receiver is not None and self._loop.is_running():
            self._call(self._close_receiver()).result(timeout=10)
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)

    # ----- on the engine loop -----------------------------------------------------------------

    async def _close_receiver(self) -> None:
        self._receiver.shutdown()
        self._receiver = None

    async def _run(self, job: Job) -> None:
        tasks = [asyncio.ensure_future(self._run_seq(job, job.new_seq(i))) for i in range(job.best_of)]
        self._running_seqs += len(tasks)
        expired = False

        def expire() -> None:  # still queued in vLLM at the deadline (no token yet): drop it, as the native engine does
            nonlocal expired
            if not any(s.output_ids for s in job.seqs):
                expired = True
                for t in tasks:
                    t.cancel()

        deadline = job.req.deadline
        timer = asyncio.get_running_loop().call_later(max(0.0, deadline - time.monotonic()), expire) \
            if deadline is not None else None
        try:
            await asyncio.gather(*tasks)
            scores = None  # job.done: the implicit reward or the mean logprob
            rr = job.req.rerank
            if job.plan.sampling.reranked and rr is not None and rr.kind == "reward_model":
                from ...rerank import reward_model_scores

                rm = self.registry.policies[rr.reward_model]
                texts = [s.detok.text for s in job.seqs]
                scores = await asyncio.get_running_loop().run_in_executor(
                    None, reward_model_scores, rm, job.req.prompt, texts)
            final = job.done(scores)
        except asyncio.CancelledError:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # each aborts its vLLM request
            me = asyncio.current_task()
            if not expired or (me is not None and getattr(me, "cancelling", lambda: 0)()):
                raise
            final = job.plan.failure(ErrorKind.OVERLOADED, "the request waited in the queue longer than its deadline",
                                     "queue_timeout")
        except Exception as err:  # noqa: BLE001 - fail this request, keep serving
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            final = self._failure(job, err)
        finally:
            if timer is not None:
                timer.cancel()
            self._running_seqs -= len(tasks)
        job.emit(final)  # last: the counts are right when the client sees the end

    def _failure(self, job: Job, err: Exception) -> RequestDone:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        kind, code = ErrorKind.INTERNAL, "engine_error"
        if isinstance(err, (VLLMClientError, ValueError)):
            kind, code = ErrorKind.BAD_INPUT, "invalid_request"
        elif isinstance(err, EngineDeadError):
            self._dead = f"{type(err).__name__}: {err}"
            if self.on_fatal:
                self.on_fatal(self._dead)
        else:
            log.exception("vLLM request %s failed", job.req.request_id, exc_info=err)
        return job.plan.failure(kind, f"{type(err).__name__}: {err}", code)

    def _sampling_params(self, job: Job, seq: SequenceOutput):
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        from .plugin import KEY_ARG, OBSERVE_ARG, REFERENCE_ARG, WEIGHTS_ARG

        plan = job.plan
        sp = plan.sampling
        extra: dict[str, Any] = {WEIGHTS_ARG: job.weights}
        if job.req.needs_policy_logprobs:
            extra[OBSERVE_ARG] = sorted(job.policies.values())
            extra[KEY_ARG] = self._seq_key(job, seq)
            if plan.signal_pair is not None:
                extra[REFERENCE_ARG] = job.policies[plan.signal_pair.reference]
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos else plan.eos_ids)
        prompt_k = sp.prompt_logprobs if seq.index == 0 else None  # the prompt is scored once
        return SamplingParams(
            n=1, max_tokens=max(1, sp.max_tokens),  # max_tokens 0 (scoring only): its one token is dropped
            prompt_logprobs=prompt_k, temperature=sp.temperature, top_p=sp.top_p,
            top_k=sp.top_k if sp.top_k > 0 else 0, min_p=sp.min_p, seed=plan.seed(seq.index),
            stop_token_ids=sorted(stop_ids), ignore_eos=True,  # EOS is one of the stop ids (min_tokens blocks them)
            min_tokens=sp.min_tokens, logprobs=sp.logprobs or 0,  # the chosen token's logprob always
            presence_penalty=sp.presence_penalty, frequency_penalty=sp.frequency_penalty,
            repetition_penalty=sp.repetition_penalty, logit_bias=dict(sp.logit_bias) or None,
            detokenize=False, output_kind=RequestOutputKind.DELTA, extra_args=extra,
            structured_outputs=vllm_constraint(job.req.constraint))

    @staticmethod
    def _seq_key(job: Job, seq: SequenceOutput) -> str:
        return f"{job.req.request_id}#{seq.index}"

    async def _run_seq(self, job: Job, seq: SequenceOutput) -> None:
        from vllm.inputs import TokensPrompt

        llm = self.families[job.req.recipe.family].llm
        k = job.plan.sampling.logprobs
        key = self._seq_key(job, seq)
        watch = job.req.needs_policy_logprobs
        if watch:
            self._receiver.open(key)
        # prefix-cache blocks are shared only between requests that run the same policies (composite.py)
        salt = ",".join(sorted(job.policies))
        stream = llm.generate(TokensPrompt(prompt_token_ids=job.prompt, cache_salt=salt),
                              self._sampling_params(job, seq), request_id=key)
        try:
            async for out in stream:
                if out.prompt_logprobs is not None and seq.index == 0 and not job.prompt_sent:
                    job.prompt_sent = True
                    job.emit(_prompt_event(job.prompt, out.prompt_logprobs, job.plan.sampling.prompt_logprobs))
                    if job.plan.sampling.max_tokens == 0:  # scoring only: no token
                        seq.finish_reason = "length"
                        return
                o = out.outputs[0]
                for j, tok in enumerate(o.token_ids):
                    lps = o.logprobs[j] if o.logprobs else {}
                    ev = TokenEvent(index=seq.index, token_id=tok, text="",
                                    logprob=lps[tok].logprob if tok in lps else None)
                    if k:
                        top = sorted((lp.rank, t, lp.logprob) for t, lp in lps.items()
                                     if lp.rank is not None and lp.rank <= k)
                        ev.top_logprobs = [(t, v) for _, t, v in top[:k]]
                    if watch:  # sent by the worker one engine step later (channel.py)
                        values, kl = await self._receiver.wait(key, len(seq.output_ids),
                                                               timeout=POLICY_LOGPROBS_TIMEOUT_S)
                        job.observe(ev, seq, values, kl)
                    job.advance(seq, tok, ev)
                    if seq.finished:
                        return
                if o.finish_reason is not None and not seq.finished:  # vLLM ended first (e.g. aborted)
                    seq.finish_reason = o.finish_reason
                    return
        finally:
            await stream.aclose()  # a sequence that we end (stop string) is aborted in vLLM at once
            if watch:
                self._receiver.close(key)


def vllm_constraint(c):
    """A request's constraint as vLLM's ``StructuredOutputsParams`` (vLLM's xgrammar backend compiles it against
    the composite's mixed logits, which have the vocabulary's width): the same language as the native engine's
    grammar (its schema rewritten alike), so both mask the same tokens."""
    if c is None:
        return None
    from vllm.sampling_params import StructuredOutputsParams

    if c.kind == "json":
        return StructuredOutputsParams(json=json.dumps(bounded_strings(c.spec)))
    if c.kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    return StructuredOutputsParams(**{c.kind: c.spec})


def _prompt_event(prompt: list[int], logprobs: list, k: int) -> PromptEvent:
    """vLLM's prompt logprobs (per position a dict token -> Logprob, the first None) as the engines' event."""
    entries: list[PromptLogprob | None] = [None]
    for tid, lps in zip(prompt[1:], logprobs[1:]):
        top = sorted((lp.rank, t, lp.logprob) for t, lp in lps.items() if lp.rank is not None and lp.rank <= k)
        entries.append(PromptLogprob(lps[tid].logprob, lps[tid].rank, [(t, v) for _, t, v in top[:k]]))
    return PromptEvent(list(prompt), entries)

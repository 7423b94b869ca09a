"""Map OpenAI requests to engine GenerationRequests, and engine events back to OpenAI responses.

One flow serves both endpoints: compile the model/mixture, check the caller's key, build one engine
request per prompt, then either collect the events into one response or stream them as SSE
chunks. The endpoint-specific shapes (text vs. chat message, the two logprobs formats) live in
:mod:`policymix.api.shapes`.
"""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Awaitable, Callable

import anyio

from fastapi import Request
from starlette.requests import ClientDisconnect
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel

from ..config import Config
from ..engine.protocol import (
    SAMPLING_EPS,
    EngineClient,
    ErrorKind,
    GenerationRequest,
    ImplicitRewardSpec,
    ModelCard,
    Prompt,
    RequestDone,
    RequestPlan,
    RerankSpec,
    SearchSpec,
    SpeculativeSpec,
    SamplingParams,
    TokenEvent,
)
from ..errors import PolicymixError
from ..logs import engine_request_prefix
from ..mixing.guard import check_recipe
from ..mixing.recipes import CompiledRecipe, PolicyInfo
from ..registry import render_chat
from . import shapes
from .auth import ApiKey
from .errors import ApiError, engine_error, error_payload
from .metrics import RequestTracker, ServerMetrics
from .protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCardOut,
    ModelList,
    ImplicitRerankSpec,
    ModelPolicymix,
    RewardModelRerank,
    TokenizeRequest,
    TokenizeResponse,
    _Common,
)
from .streams import ClientGone, merged, unless_disconnected
from .structured import TOOL_CLOSE, ToolCalls, check_auto_template, constraint_of
from .tokens import TokenTextCache


@dataclass
class Job:
    """A validated request, ready to run: one engine request per prompt, n choices each."""

    shape: shapes.Shape
    response_id: str
    model: str
    recipe: CompiledRecipe
    plans: list[RequestPlan]  # one engine request per prompt, planned once
    n: int
    stream: bool
    include_usage: bool
    keep_events: bool  # logprobs or token signals need every TokenEvent
    tokenizer: Any  # of the recipe's family (an inline mixture may differ from `model`'s)
    echo: list[str] | None = None  # completions with echo: each prompt's text
    echo_logprobs: bool = False  # completions with echo and logprobs: the prompt tokens' logprobs come first
    prompt_logprobs: int | None = None  # vLLM's prompt_logprobs: top k per prompt position, in vLLM's shape
    key: ApiKey | None = None
    tool_calls: ToolCalls | None = None  # chat tools: the constrained output is returned as tool_calls
    created: int = field(default_factory=lambda: int(time.time()))


class Serving:
    def __init__(self, engine: EngineClient, config: Config, metrics: ServerMetrics):
        self.engine = engine
        self.config = config
        self.metrics = metrics
        self.token_texts = TokenTextCache()
        self._cards: list[ModelCard] | None = None
        # what the mixing guard needs to know of each policy (protected, floor) comes from the config
        self.guarded = {name: PolicyInfo(name, p.kind, -1, p.reference, p.beta, p.protected, p.floor,
                                         bool(p.system_prompt))
                        for name, p in config.policies.items()}

    def cards(self) -> list[ModelCard]:
        """The engine's models (fixed once it is loaded, so asked once)."""
        if self._cards is None:
            self._cards = self.engine.models()
        return self._cards

    # ------------------------------------------------------------------------------ simple routes

    def list_models(self, key: ApiKey | None) -> ModelList:
        allowed = None if key is None or key.spec.policies is None else set(key.spec.policies)
        cards = [
            ModelCardOut(id=c.name, max_model_len=c.max_model_len,
                         policymix=ModelPolicymix(kind=c.kind, family=c.family, weights=c.weights))
            for c in self.cards() if allowed is None or c.name in allowed
        ]
        return ModelList(data=cards)

    def model_card(self, name: str, key: ApiKey | None) -> ModelCardOut:
        for card in self.list_models(key).data:
            if card.id == name:
                return card
        raise ApiError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    def _tokenizer(self, model: str | None, key: ApiKey | None) -> tuple[str, Any]:
        """(model, its tokenizer); no model: the first served policy the key may use (vLLM serves one)."""
        if model is None:
            cards = [c for c in self.list_models(key).data if c.policymix.kind == "policy"]
            if not cards:
                raise ApiError(404, "no policy is served to this key", param="model", code="model_not_found")
            model = cards[0].id
        self.model_card(model, key)  # 404 for unknown or out-of-scope names
        return model, self.engine.tokenizer(model)

    def tokenizer_info(self, model: str | None, key: ApiKey | None) -> dict[str, Any]:
        """vLLM's /tokenizer_info: what lm-eval's remote tokenizer reads (special tokens, chat template)."""
        model, tok = self._tokenizer(model, key)
        template = getattr(tok, "chat_template", None)
        special = {name: getattr(tok, name, None) for name in ("eos_token", "bos_token", "pad_token", "unk_token")}
        return {"model": model, "tokenizer_class": type(tok).__name__, **special,
                "chat_template": template if isinstance(template, str) else None,
                "model_max_length": self.model_card(model, key).max_model_len, "vocab_size": len(tok)}

    def tokenize(self, body: TokenizeRequest, key: ApiKey | None) -> TokenizeResponse:
        model, tok = self._tokenizer(body.model, key)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "send exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            if not getattr(tok, "chat_template", None):
                raise ApiError(400, f"model `{model}` has no chat template", param="messages",
                               code="no_chat_template")
            text = render_chat(tok, [m.as_dict() for m in body.messages], bool(body.add_generation_prompt),
                               name=model)
            ids = tok(text, add_special_tokens=False).input_ids
        else:
            ids = tok(body.prompt, add_special_tokens=bool(body.add_special_tokens)).input_ids
        return TokenizeResponse(count=len(ids), max_model_len=self.model_card(model, key).max_model_len,
                                tokens=list(ids))

    def detokenize(self, body: DetokenizeRequest, key: ApiKey | None) -> DetokenizeResponse:
        _, tok = self._tokenizer(body.model, key)
        bad = [t for t in body.tokens if t >= len(tok)]
        if bad:
            raise ApiError(400, f"token id {bad[0]} is outside the vocabulary (0..{len(tok) - 1})", param="tokens")
        return DetokenizeResponse(prompt=tok.decode(body.tokens))

    # ----------------------------------------------------------------------------- generation

    async def completions(self, body: CompletionRequest, key: ApiKey | None, http: Request) -> Response:
        prompts = [Prompt(text=p) if isinstance(p, str) else Prompt(token_ids=list(p)) for p in body.prompts()]
        # echo with logprobs returns the prompt tokens' logprobs first (the first one null), as OpenAI's
        # legacy completions and vLLM do; max_tokens 0 with echo scores without generating
        if body.max_tokens == 0 and not body.echo and body.prompt_logprobs is None:
            raise ApiError(400, "max_tokens 0 only scores the prompt: it needs echo (with logprobs) or prompt_logprobs",
                           param="max_tokens")
        if body.max_tokens == 0 and max(body.n or 1, body.best_of or 1) > 1:
            raise ApiError(400, "max_tokens 0 scores the prompt once: n and best_of must be 1", param="max_tokens")
        echo_k = (body.logprobs or 0) if body.echo and (body.logprobs is not None or body.max_tokens == 0) else None
        job = self._prepare(body, key, prompts, shapes.COMPLETION, body.max_tokens, body.logprobs, "cmpl",
                            echo_k=echo_k)
        if body.echo:
            job.echo = [p.text if p.text is not None else job.tokenizer.decode(p.token_ids) for p in prompts]
            job.echo_logprobs = body.logprobs is not None
        return await self._respond(job, http)

    async def chat(self, body: ChatCompletionRequest, key: ApiKey | None, http: Request) -> Response:
        prompt = chat_prompt(body, bool(body.add_generation_prompt))
        if body.top_logprobs is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        max_tokens = body.max_completion_tokens or body.max_tokens
        job = self._prepare(body, key, [prompt], shapes.CHAT, max_tokens, logprobs, "chatcmpl")
        return await self._respond(job, http)

    def _prepare(self, body: _Common, key: ApiKey | None, prompts: list[Prompt], shape: shapes.Shape,
                 max_tokens: int | None, logprobs: int | None, prefix: str, echo_k: int | None = None) -> Job:
        recipe = self.engine.compile(body.model, body.mixture)
        if key is not None:
            key.authorize(body.model, body.mixture, recipe, body.search.scorer if body.search else body.rerank)
        search, rerank = _search(body, self.config.server.max_best_of)
        scorers = []  # implicit rewards that select text: the guard checks their coefficients too
        if rerank is not None and rerank.kind == "implicit":
            scorers.append(("search.scorer.implicit" if search is not None else "rerank.implicit", rerank.implicit))
        check_recipe(recipe, self.guarded, self.config.server.guard,
                     allow_inversion=key is not None and key.spec.allow_inversion,
                     who=key.name if key is not None else "anonymous", scorers=scorers)
        tokenizer = self.engine.tokenizer(recipe.policy_of(next(iter(recipe.active))))
        if search is not None and body.search.max_tokens is not None:
            max_tokens = body.search.max_tokens
        sampling = self._sampling(body, max_tokens, logprobs, len(tokenizer))
        if search is not None:
            sampling.best_of = search.beam_width * search.expand if search.beam_width * search.expand > 1 else None
        wanted = [k for k in (echo_k, body.prompt_logprobs) if k is not None]
        sampling.prompt_logprobs = max(wanted) if wanted else None  # one scoring pass serves both shapes
        if key is not None:
            key.check_limits(max_tokens, max(sampling.n, sampling.best_of or 1))
        default = self.config.server.speculative
        if default is not None and key is not None and default.draft != SpeculativeSpec.NGRAM \
                and not key.allows(default.draft):
            default = None  # the server's choice of draft never refuses a key: its requests run undrafted
        speculative = _speculative(body, default, search, rerank)
        constraint, tool_calls = constraint_of(body)
        if tool_calls is not None and tool_calls.auto:
            checked = set()  # every policy of the mixture renders the tools (their templates may differ)
            for name in recipe.active:
                tok = self.engine.tokenizer(recipe.policy_of(name))
                if id(tok) not in checked:
                    checked.add(id(tok))
                    check_auto_template(tok, prompts[0].tools or [])
            if body.parallel_tool_calls is False:  # at most one call: the model stops where the first one ends
                sampling.stop.append(TOOL_CLOSE)
        srv = self.config.server
        room = srv.max_queue + max(1, srv.max_num_seqs // sampling.candidates)  # prompts that can ever be in
        if len(prompts) > room:
            raise ApiError(400, f"a batch of {len(prompts)} prompts can never fit this server (at most {room} "
                           f"with {sampling.candidates} sequences each); split it", param="prompt")
        response_id = f"{prefix}-{uuid.uuid4().hex}"
        now = time.monotonic()
        timeout = self.config.server.request_timeout_s
        plans = []
        for i, prompt in enumerate(prompts):
            req = GenerationRequest(
                request_id=f"{engine_request_prefix()}{response_id}-{i}", model=body.model, recipe=recipe,
                prompt=prompt,
                sampling=sampling if i == 0 else _copy(sampling), rerank=rerank, search=search,
                return_token_signals=bool(body.return_token_signals),
                return_policy_logprobs=bool(body.return_token_signals),
                speculative=speculative, constraint=constraint, arrival_time=now, deadline=now + timeout,
                max_tokens_cap=key.spec.max_tokens if key is not None else None,
            )
            plan = self.engine.plan(req)  # bad input, a prompt past the context: raised here, naming the field
            if key is not None:  # every policy the plan runs or scores with: recipe, observers, reward model
                key.authorize_plan(plan)
            plans.append(plan)
        stream = bool(body.stream)
        include_usage = bool(stream and body.stream_options and body.stream_options.include_usage)
        keep = logprobs is not None or bool(body.return_token_signals)
        return Job(shape, response_id, body.model, recipe, plans, sampling.n, stream, include_usage, keep,
                   tokenizer, key=key, prompt_logprobs=body.prompt_logprobs, tool_calls=tool_calls)

    def _sampling(self, body: _Common, max_tokens: int | None, logprobs: int | None, vocab: int) -> SamplingParams:
        # best_of against n, temperature and the server's maximum is checked by the engine
        if body.min_tokens and max_tokens is not None and body.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({body.min_tokens}) must be <= max_tokens ({max_tokens})",
                           param="min_tokens")
        return SamplingParams(
            max_tokens=max_tokens,  # None (chat without it): what the context leaves, resolved by the plan
            temperature=1.0 if body.temperature is None else body.temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            top_k=-1 if body.top_k is None else body.top_k,
            min_p=body.min_p or 0.0,
            seed=body.seed,
            stop=list(body.stop or []),
            stop_token_ids=list(body.stop_token_ids or []),
            include_stop_str_in_output=bool(body.include_stop_str_in_output),
            ignore_eos=bool(body.ignore_eos),
            min_tokens=body.min_tokens or 0,
            logprobs=logprobs,
            presence_penalty=body.presence_penalty or 0.0,
            frequency_penalty=body.frequency_penalty or 0.0,
            repetition_penalty=1.0 if body.repetition_penalty is None else body.repetition_penalty,
            logit_bias=_logit_bias(body.logit_bias, vocab),
            skip_special_tokens=body.skip_special_tokens is not False,
            n=body.n or 1,
            best_of=body.best_of,
        )

    # ------------------------------------------------------------------------------- running

    async def _respond(self, job: Job, http: Request) -> Response:
        if job.key is not None:
            job.key.acquire(len(job.plans))
        trackers = [self.metrics.track(job.model) for _ in job.plans]
        events = self._events(job, trackers)
        try:
            if job.stream:  # wait for the first event: errors before any byte get a real status
                first = await unless_disconnected(http, anext(events))
                if isinstance(first[1], RequestDone) and first[1].error:
                    raise _engine_failure(first[1])
            else:
                body = await unless_disconnected(http, self._collect(job, events))
        except ClientGone:
            await self._close(job, events, trackers, "aborted")
            return Response(status_code=499)  # nobody reads it; uvicorn drops it
        except BaseException:
            await self._close(job, events, trackers, "error")
            raise
        if not job.stream:
            await self._close(job, events, trackers, "ok")
            return JSONResponse(body)
        return _EventStream(self._sse(job, first, events, trackers),
                            cleanup=lambda: self._close(job, events, trackers, "aborted"))

    async def _close(self, job: Job, events: AsyncIterator, trackers: list[RequestTracker], outcome: str) -> None:
        """Abort what is left, settle the metrics, give back the key's slot (idempotent)."""
        await events.aclose()
        for t in trackers:
            t.finish(outcome)
        if job.key is not None:
            job.key.release(len(job.plans))
            job.key = None

    async def _events(self, job: Job, trackers: list[RequestTracker]) -> AsyncIterator[tuple[int, Any]]:
        async with aclosing(merged(self.engine, job.plans)) as events:
            async for i, ev in events:
                if isinstance(ev, TokenEvent):
                    trackers[i].token(ev.index)
                elif isinstance(ev, RequestDone):
                    trackers[i].done(ev)
                yield i, ev

    async def _collect(self, job: Job, events: AsyncIterator) -> dict:
        acc = shapes.Accumulator(job.n, job.keep_events)
        async for i, ev in events:
            acc.add(i, ev)
            if isinstance(ev, RequestDone) and ev.error:
                raise _engine_failure(ev)
        texts = self.token_texts(job.tokenizer)
        return job.shape.response(job, acc, texts).model_dump(mode="json")

    async def _sse(self, job: Job, first: tuple[int, Any], events: AsyncIterator,
                   trackers: list[RequestTracker]) -> AsyncIterator[str]:
        """``data: {json}\\n\\n`` per chunk, ``data: [DONE]\\n\\n`` at the end (errors as an error event)."""
        acc = shapes.Accumulator(job.n, job.keep_events)
        writer = job.shape.stream_writer(job, acc, self.token_texts(job.tokenizer))
        outcome = "aborted"  # unless the loop finishes: a disconnect cancels this generator
        try:
            for chunk in writer.start():
                yield _data(chunk)
            item = first
            while item is not None:
                i, ev = item
                if isinstance(ev, RequestDone) and ev.error:
                    raise _engine_failure(ev)
                for chunk in writer.event(i, ev):
                    yield _data(chunk)
                item = await anext(events, None)
            for chunk in writer.finish():
                yield _data(chunk)
            outcome = "ok"
        except Exception as exc:  # after the headers went out, errors travel as an SSE event
            outcome = "error"
            yield _data(error_payload(exc)[1])
        finally:
            await self._close(job, events, trackers, outcome)
        yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """An SSE response whose cleanup runs even if the body never starts.

    Under an ASGI 2.4 server, ``send`` raises OSError once the client is gone; if that happens at the
    response start, Starlette never starts the body generator, so its ``finally`` never runs: the
    engine request and the key's concurrency slot would leak.
    """

    def __init__(self, body: AsyncIterator[str], cleanup: Callable[[], Awaitable[None]]):
        super().__init__(body, media_type="text/event-stream",
                         headers={"cache-control": "no-cache", "x-accel-buffering": "no"})
        self.cleanup = cleanup

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        except ClientDisconnect:  # (ASGI 2.4 servers) nobody is left to answer: not an application error
            pass
        finally:
            with anyio.CancelScope(shield=True):
                await self.cleanup()


def chat_prompt(body: ChatCompletionRequest, add_generation_prompt: bool = True) -> Prompt:
    """A chat request's prompt: its messages (tool turns included) and, for tool_choice auto, its tools (which
    the chat template renders)."""
    tools = None
    if body.tools and body.tool_choice in (None, "auto"):
        tools = [t.model_dump(exclude_none=True) for t in body.tools]
    return Prompt(messages=[m.as_dict() for m in body.messages], add_generation_prompt=add_generation_prompt,
                  tools=tools)


def _engine_failure(done: RequestDone) -> PolicymixError:
    return engine_error(done.error_kind or ErrorKind.INTERNAL, done.error, done.error_code)


# characters that some clients' line splitters take for line ends (Python's str.splitlines, httpx's
# aiter_lines): escaped in the JSON, where they can only stand inside strings, so every event is one line
_LINE_BREAKS = str.maketrans({"\u2028": "\\u2028", "\u2029": "\\u2029", "\x85": "\\u0085"})


def _data(obj: Any) -> str:
    if isinstance(obj, BaseModel):
        return f"data: {obj.model_dump_json(exclude_unset=True).translate(_LINE_BREAKS)}\n\n"
    return f"data: {json.dumps(obj, separators=(',', ':'))}\n\n"


def _logit_bias(raw: dict[str, float] | None, vocab: int) -> dict[int, float]:
    bias = {}
    for k, v in (raw or {}).items():
        try:
            tid = int(k)
        except ValueError:
            raise ApiError(400, f"logit_bias keys must be token ids, got {k!r}", param="logit_bias") from None
        if not 0 <= tid < vocab:
            raise ApiError(400, f"logit_bias token id {tid} is outside the vocabulary (0..{vocab - 1})",
                           param="logit_bias")
        bias[tid] = float(v)
    return bias


def _copy(s: SamplingParams) -> SamplingParams:
    return replace(s, stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), logit_bias=dict(s.logit_bias))


def _speculative(body: _Common, default, search: SearchSpec | None, rerank: RerankSpec | None) -> SpeculativeSpec | None:
    """The request's own ``speculative`` (null: off; the plan checks it), else the server's default, which stays
    off where a request cannot speculate (search, pruning: their candidates move in lockstep)."""
    if "speculative" in body.model_fields_set:
        s = body.speculative
        return None if s is None else SpeculativeSpec(s.draft, s.num_tokens)
    if default is None or search is not None or (rerank is not None and rerank.prune_every is not None):
        return None
    return SpeculativeSpec(default.draft, default.num_tokens)


def _search(body: _Common, max_best_of: int) -> tuple[SearchSpec | None, RerankSpec | None]:
    """The engine's search spec and the scorer that ranks beams (else the request's rerank), checked."""
    s = body.search
    if s is None:
        return None, _rerank(body.rerank)
    if body.rerank is not None or body.best_of is not None or (body.n or 1) != 1:
        raise ApiError(400, "search returns one sequence and ranks with search.scorer: drop n, best_of and rerank",
                       param="search")
    if body.temperature is not None and body.temperature < SAMPLING_EPS:
        raise ApiError(400, "search samples its chunks: it needs temperature > 0", param="search")
    if s.beam_width * s.expand > max_best_of:
        raise ApiError(400, f"search.beam_width x search.expand = {s.beam_width * s.expand} is above the server's "
                       f"maximum {max_best_of}", param="search")
    scorer = _rerank(s.scorer)
    if scorer.prune_every is not None or scorer.soft_temperature is not None:
        raise ApiError(400, "search.scorer takes a scorer only (no prune or soft)", param="search.scorer")
    return SearchSpec(s.beam_width, s.expand, s.chunk), scorer


def _rerank(spec: Any) -> RerankSpec | None:
    if spec is None:
        return None
    if isinstance(spec, str):
        return RerankSpec(kind="logprob")
    options = {"prune_every": spec.prune.every if spec.prune else None,
               "prune_keep": spec.prune.keep if spec.prune else None,
               "soft_temperature": spec.soft.temperature if spec.soft else None}
    if isinstance(spec, RewardModelRerank):  # an empty name too: the engine answers 400 naming the field
        return RerankSpec(kind="reward_model", reward_model=spec.reward_model, **options)
    if isinstance(spec, ImplicitRerankSpec):
        imp = spec.implicit
        return RerankSpec(kind="implicit", implicit=ImplicitRewardSpec(imp.policy, imp.reference, imp.beta), **options)
    return RerankSpec(kind="logprob", **options)

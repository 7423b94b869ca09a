"""Engine events -> OpenAI response bodies and stream chunks, for completions and chat.

Choice ``index`` is ``prompt_position * n + sequence_index`` (OpenAI's numbering for a batched
completions request). Streams end each choice with an empty chunk that carries its
``finish_reason`` (as OpenAI's chat does); the last of them carries the ``policymix`` object.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import TYPE_CHECKING, Any, Iterator, Protocol

from ..engine.protocol import PromptEvent, RequestDone, TokenEvent
from .protocol import (
    AssistantMessage,
    CandidateOut,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    ChoiceExtension,
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    DeltaMessage,
    PolicymixExtension,
    PromptTokenLogprob,
    TokenLogprob,
    TokenSignal,
    ToolCallDelta,
    TopLogprob,
    Usage,
)
from .structured import RequiredScanner, stream_safe
from .tokens import TokenTexts

if TYPE_CHECKING:
    from .serving import Job

_FLOOR = -9999.0  # what OpenAI-compatible servers send for a -inf logprob (JSON has no infinity)


def num(x: float | None) -> float | None:
    """A JSON-safe float: NaN -> null, +-inf -> +-9999."""
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return _FLOOR if x < 0 else -_FLOOR
    return float(x)


class Accumulator:
    """What a request produced so far: token events per choice (when needed) and RequestDones."""

    def __init__(self, n: int, keep_events: bool):
        self.n = n
        self.keep_events = keep_events
        self.events: dict[int, list[TokenEvent]] = defaultdict(list)
        self.dones: dict[int, RequestDone] = {}
        self.prompts: dict[int, PromptEvent] = {}  # per prompt position: its scored tokens

    def choice(self, i: int, seq_index: int) -> int:
        return i * self.n + seq_index

    def add(self, i: int, ev: TokenEvent | PromptEvent | RequestDone) -> None:
        if isinstance(ev, RequestDone):
            self.dones[i] = ev
        elif isinstance(ev, PromptEvent):
            self.prompts[i] = ev
        elif self.keep_events:
            self.events[self.choice(i, ev.index)].append(ev)

    def usage(self) -> Usage:
        p = sum(d.prompt_tokens for d in self.dones.values())
        c = sum(d.completion_tokens for d in self.dones.values())
        return Usage(prompt_tokens=p, completion_tokens=c, total_tokens=p + c)

    def choice_count(self) -> int:
        return sum(len(d.sequences) for d in self.dones.values())


# ------------------------------------------------------------------------------------ extension


def _signals(events: list[TokenEvent], texts: TokenTexts) -> list[TokenSignal]:
    return [
        TokenSignal(token=texts.text(e.token_id), token_id=e.token_id,
                    policy_logprobs={k: num(v) for k, v in e.policy_logprobs.items()} if e.policy_logprobs else None,
                    implicit_reward=num(e.implicit_reward), kl=num(e.kl))
        for e in events
    ]


def choice_extensions(job: "Job", acc: Accumulator, texts: TokenTexts) -> dict[int, ChoiceExtension]:
    signals = job.plans[0].request.return_token_signals
    out = {}
    for i, done in acc.dones.items():
        for s in done.sequences:
            idx = acc.choice(i, s.index)
            out[idx] = ChoiceExtension(
                kl_to_reference=num(s.kl_to_reference), implicit_reward=num(s.implicit_reward),
                token_signals=_signals(acc.events[idx], texts) if signals else None, speculative=s.speculative)
    return out


def extension(job: "Job", acc: Accumulator, per_choice: dict[int, ChoiceExtension]) -> PolicymixExtension:
    """The response's ``policymix`` object: what ran, best-of candidates, and choice 0's signals."""
    first = acc.dones[min(acc.dones)]
    candidates = None
    if any(d.candidates for d in acc.dones.values()):
        candidates = [
            CandidateOut(text=c.text, token_ids=list(c.token_ids), score=num(c.score) or 0.0,
                         finish_reason=c.finish_reason, prompt_index=i, probability=num(c.probability))
            for i, d in sorted(acc.dones.items()) for c in (d.candidates or [])
        ]
    head = per_choice.get(0, ChoiceExtension())
    generated = [d.generated_tokens for d in acc.dones.values() if d.generated_tokens is not None]
    return PolicymixExtension(
        weights=dict(first.weights or job.recipe.weights), mixture=job.recipe.mixture_name,
        variants={n: v.describe() for n, v in job.recipe.variants.items()} or None,
        candidates=candidates, kl_bound=num(first.kl_bound), kl_to_reference=head.kl_to_reference,
        implicit_reward=head.implicit_reward, token_signals=head.token_signals, speculative=head.speculative,
        usage={"generated_tokens": sum(generated)} if generated else None,
    )


# ------------------------------------------------------------------------------------- logprobs


def _logprobs_k(job: "Job") -> int | None:
    return job.plans[0].sampling.logprobs


def completion_logprobs(events: list[TokenEvent], texts: TokenTexts, k: int, offset: int = 0) -> CompletionLogprobs:
    """tokens / token_logprobs / top_logprobs (the top k plus the chosen token) / text_offset."""
    tokens, lps, tops, offsets = [], [], [], []
    for e in events:
        t = texts.text(e.token_id)
        top = {texts.text(tid): num(lp) for tid, lp in (e.top_logprobs or [])[:k]}
        top.setdefault(t, num(e.logprob))
        tokens.append(t)
        lps.append(num(e.logprob))
        tops.append(top)
        offsets.append(offset)
        offset += len(t)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def prompt_completion_logprobs(pe: PromptEvent, texts: TokenTexts, k: int) -> CompletionLogprobs:
    """The prompt's part of an echoed completion's logprobs: the first token's entries are null."""
    tokens, lps, tops, offsets, offset = [], [], [], [], 0
    for tid, lp in zip(pe.token_ids, pe.logprobs):
        t = texts.text(tid)
        tokens.append(t)
        offsets.append(offset)
        offset += len(t)
        if lp is None:
            lps.append(None)
            tops.append(None)
            continue
        top = {texts.text(i): num(v) for i, v in lp.top_logprobs[:k]}
        top.setdefault(t, num(lp.logprob))
        lps.append(num(lp.logprob))
        tops.append(top)
    return CompletionLogprobs(tokens=tokens, token_logprobs=lps, top_logprobs=tops, text_offset=offsets)


def joined(head: CompletionLogprobs, tail: CompletionLogprobs) -> CompletionLogprobs:
    end = head.text_offset[-1] + len(head.tokens[-1]) if head.tokens else 0
    return CompletionLogprobs(tokens=head.tokens + tail.tokens, token_logprobs=head.token_logprobs + tail.token_logprobs,
                              top_logprobs=head.top_logprobs + tail.top_logprobs,
                              text_offset=head.text_offset + [end + o for o in tail.text_offset])


def vllm_prompt_logprobs(pe: PromptEvent, texts: TokenTexts, k: int) -> list:
    """vLLM's ``prompt_logprobs``: per prompt token {token id: {logprob, rank, decoded_token}}, the token
    itself and the top k; the first token null."""
    out: list = []
    for tid, lp in zip(pe.token_ids, pe.logprobs):
        if lp is None:
            out.append(None)
            continue
        entry = {str(tid): PromptTokenLogprob(logprob=num(lp.logprob), rank=lp.rank, decoded_token=texts.text(tid))}
        for rank, (i, v) in enumerate(lp.top_logprobs[:k], start=1):
            entry.setdefault(str(i), PromptTokenLogprob(logprob=num(v), rank=rank, decoded_token=texts.text(i)))
        out.append(entry)
    return out


def _top(texts: TokenTexts, token_id: int, logprob: float | None) -> TopLogprob:
    s, b = texts(token_id)
    return TopLogprob(token=s, logprob=num(logprob) if logprob is not None else _FLOOR, bytes=list(b))


def chat_logprobs(events: list[TokenEvent], texts: TokenTexts, k: int) -> ChatLogprobs:
    content = []
    for e in events:
        head = _top(texts, e.token_id, e.logprob)
        tops = [_top(texts, tid, lp) for tid, lp in (e.top_logprobs or [])[:k]]
        content.append(TokenLogprob(token=head.token, logprob=head.logprob, bytes=head.bytes, top_logprobs=tops))
    return ChatLogprobs(content=content)


# ----------------------------------------------------------------------------------- the shapes


class Shape(Protocol):
    def response(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> Any: ...

    def stream_writer(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> "StreamWriter": ...


class StreamWriter:
    """Turns events into chunks: ``start()``, ``event(i, ev)`` per event, ``finish()``."""

    def __init__(self, job: "Job", acc: Accumulator, texts: TokenTexts):
        self.job, self.acc, self.texts = job, acc, texts
        self.k = _logprobs_k(job)
        self.left = len(job.plans)
        self.total = len(job.plans) * job.n
        self.extra = {"usage": None} if job.include_usage else {}

    def start(self) -> Iterator[Any]:
        return iter(())

    def event(self, i: int, ev: TokenEvent | PromptEvent | RequestDone) -> Iterator[Any]:
        self.acc.add(i, ev)
        if isinstance(ev, PromptEvent):
            yield from self.prompt(i, ev)
            return
        if isinstance(ev, TokenEvent):
            yield from self.token(self.acc.choice(i, ev.index), ev)
            return
        self.left -= 1
        per = choice_extensions(self.job, self.acc, self.texts)
        seqs = sorted(ev.sequences, key=lambda s: s.index)
        for n, s in enumerate(seqs):
            idx = self.acc.choice(i, s.index)
            ext = per.get(idx) if self.total > 1 else None
            top = extension(self.job, self.acc, per) if self.left == 0 and n == len(seqs) - 1 else None
            yield from self.final(idx, s, ext, top)

    def finish(self) -> Iterator[Any]:
        if self.job.include_usage:
            yield self.chunk([], usage=self.acc.usage())

    def chunk(self, choices: list, **fields: Any) -> Any:
        raise NotImplementedError

    def prompt(self, i: int, ev: PromptEvent) -> Iterator[Any]:
        return iter(())

    def token(self, idx: int, ev: TokenEvent) -> Iterator[Any]:
        raise NotImplementedError

    def final(self, idx: int, seq: Any, ext: ChoiceExtension | None, top: PolicymixExtension | None
              ) -> Iterator[Any]:
        raise NotImplementedError


class _CompletionStream(StreamWriter):
    def __init__(self, job: "Job", acc: Accumulator, texts: TokenTexts):
        super().__init__(job, acc, texts)
        self.offsets: dict[int, int] = defaultdict(int)

    def chunk(self, choices: list, **fields: Any) -> CompletionChunk:
        fields = {**self.extra, **fields}
        return CompletionChunk(id=self.job.response_id, object="text_completion", created=self.job.created,
                               model=self.job.model, choices=choices, **fields)

    def start(self) -> Iterator[Any]:
        if self.job.plans[0].sampling.prompt_logprobs is not None:
            return  # the echo goes out with the prompt's logprobs (``prompt``)
        for i, text in enumerate(self.job.echo or []):
            for j in range(self.job.n):
                yield self.chunk([CompletionChoice(index=i * self.job.n + j, text=text, logprobs=None,
                                                   finish_reason=None)])

    def prompt(self, i: int, ev: PromptEvent) -> Iterator[Any]:
        job = self.job
        lp = prompt_completion_logprobs(ev, self.texts, self.k) if job.echo_logprobs else None
        vllm = vllm_prompt_logprobs(ev, self.texts, job.prompt_logprobs) if job.prompt_logprobs is not None else None
        for j in range(job.n):
            idx = i * job.n + j
            if lp is not None:
                self.offsets[idx] = lp.text_offset[-1] + len(lp.tokens[-1]) if lp.tokens else 0
            choice = CompletionChoice(index=idx, text=job.echo[i] if job.echo else "", logprobs=lp, finish_reason=None)
            if vllm is not None:
                choice.prompt_logprobs = vllm
            yield self.chunk([choice])

    def token(self, idx: int, ev: TokenEvent) -> Iterator[Any]:
        lp = None
        if self.k is not None:
            lp = completion_logprobs([ev], self.texts, self.k, self.offsets[idx])
            self.offsets[idx] += len(lp.tokens[0])
        if ev.text or lp is not None:
            yield self.chunk([CompletionChoice(index=idx, text=ev.text, logprobs=lp, finish_reason=None)])

    def final(self, idx, seq, ext, top) -> Iterator[CompletionChunk]:
        choice = CompletionChoice(index=idx, text="", logprobs=None, finish_reason=seq.finish_reason,
                                  stop_reason=seq.stop_reason)
        if ext is not None:
            choice.policymix = ext
        yield self.chunk([choice], **({"policymix": top} if top is not None else {}))


class _ChatStream(StreamWriter):
    """Text as content deltas; with tools, as OpenAI streams calls: a named function's arguments as
    ``tool_calls`` deltas (the first with the call's id and name); ``required``'s calls likewise, each call's
    first delta (id, type, name) once its name is written, then its arguments' pieces (a choice cut at
    max_tokens ends with the calls as far as they got, as on OpenAI). ``auto``: content deltas until a
    ``<tool_call>`` may be starting (and never trailing whitespace); from there the text is held back, and
    once the choice ends its calls go out as complete ``tool_calls`` deltas (or, if none parses, the held
    text as content)."""

    def __init__(self, job: "Job", acc: Accumulator, texts: TokenTexts):
        super().__init__(job, acc, texts)
        self.tool_text: dict[int, str] = defaultdict(str)  # choice -> its text so far (tools only)
        self.sent: dict[int, int] = defaultdict(int)  # auto: choice -> how much of its text went out as content
        self.scanners: dict[int, RequiredScanner] = {}  # required: choice -> its calls as they are written

    def chunk(self, choices: list, **fields: Any) -> ChatCompletionChunk:
        fields = {**self.extra, **fields}
        return ChatCompletionChunk(id=self.job.response_id, object="chat.completion.chunk",
                                   created=self.job.created, model=self.job.model, choices=choices, **fields)

    def start(self) -> Iterator[Any]:
        # (OpenAI: null content when tools call; auto too, so that a reassembled call-only message has null content)
        content = None if self.job.tool_calls is not None else ""
        for idx in range(self.total):  # the first delta of every choice carries the role
            yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(role="assistant", content=content),
                                               logprobs=None, finish_reason=None)])

    def prompt(self, i: int, ev: PromptEvent) -> Iterator[Any]:
        if self.job.prompt_logprobs is not None:
            yield self.chunk([], prompt_logprobs=vllm_prompt_logprobs(ev, self.texts, self.job.prompt_logprobs))

    def token(self, idx: int, ev: TokenEvent) -> Iterator[Any]:
        lp = chat_logprobs([ev], self.texts, self.k) if self.k is not None else None
        tools = self.job.tool_calls
        if tools is not None and tools.auto:
            self.tool_text[idx] += ev.text
            safe = max(self.sent[idx], stream_safe(self.tool_text[idx]))
            piece, self.sent[idx] = self.tool_text[idx][self.sent[idx]:safe], safe
            if piece or lp is not None:
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(content=piece or None), logprobs=lp,
                                                   finish_reason=None)])
            return
        if tools is not None and tools.name is None:  # required: each call's name, then its arguments' pieces
            self.tool_text[idx] += ev.text
            deltas = tools.required_deltas(idx, self.scanners.setdefault(idx, RequiredScanner()).feed(ev.text))
            if deltas or lp is not None:
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(tool_calls=deltas or None),
                                                   logprobs=lp, finish_reason=None)])
            return
        if tools is not None:
            first = idx not in self.tool_text
            self.tool_text[idx] += ev.text
            if tools.name is not None and (ev.text or first):
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(
                    tool_calls=tools.deltas(idx, ev.text, first)), logprobs=lp, finish_reason=None)])
            elif lp is not None:
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(), logprobs=lp, finish_reason=None)])
            return
        if ev.text or lp is not None:
            yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(content=ev.text), logprobs=lp,
                                               finish_reason=None)])

    def final(self, idx, seq, ext, top) -> Iterator[ChatCompletionChunk]:
        finish, tools = seq.finish_reason, self.job.tool_calls
        if tools is not None and tools.auto:
            content, calls = tools.split(idx, seq.text)  # the final text: a stop string is cut from it
            rest = (content or "")[self.sent[idx]:]  # what went out is a prefix of the content
            if rest:
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(content=rest), logprobs=None,
                                                   finish_reason=None)])
            if calls is not None:
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(tool_calls=[
                    ToolCallDelta(index=k, id=c.id, type="function", function=c.function)
                    for k, c in enumerate(calls)]), logprobs=None, finish_reason=None)])
                if finish == "stop":
                    finish = "tool_calls"
        elif tools is not None:
            text = self.tool_text[idx]
            calls = tools.calls(idx, text)
            streamed = idx in self.scanners and any(n is not None for n in self.scanners[idx].names)
            if calls is None and text and not streamed:  # cut before any call had a name: the text, as content
                yield self.chunk([ChatStreamChoice(index=idx, delta=DeltaMessage(content=text), logprobs=None,
                                                   finish_reason=None)])
            if calls is not None and finish == "stop":
                finish = "tool_calls"
        choice = ChatStreamChoice(index=idx, delta=DeltaMessage(), logprobs=None, finish_reason=finish)
        if ext is not None:
            choice.policymix = ext
        yield self.chunk([choice], **({"policymix": top} if top is not None else {}))


def _choices(acc: Accumulator):
    for i, done in sorted(acc.dones.items()):
        for s in sorted(done.sequences, key=lambda s: s.index):
            yield i, acc.choice(i, s.index), s


class _Completion:
    def response(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> CompletionResponse:
        k = _logprobs_k(job)
        per = choice_extensions(job, acc, texts)
        many = acc.choice_count() > 1
        choices = []
        for i, idx, s in _choices(acc):
            lp = completion_logprobs(acc.events[idx], texts, k) if k is not None else None
            if job.echo_logprobs and i in acc.prompts:
                lp = joined(prompt_completion_logprobs(acc.prompts[i], texts, k), lp)
            choice = CompletionChoice(index=idx, text=(job.echo[i] if job.echo else "") + s.text, logprobs=lp,
                                      finish_reason=s.finish_reason, stop_reason=s.stop_reason,
                                      policymix=per[idx] if many else None)
            if job.prompt_logprobs is not None and i in acc.prompts:
                choice.prompt_logprobs = vllm_prompt_logprobs(acc.prompts[i], texts, job.prompt_logprobs)
            choices.append(choice)
        return CompletionResponse(id=job.response_id, created=job.created, model=job.model, choices=choices,
                                  usage=acc.usage(), policymix=extension(job, acc, per))

    def stream_writer(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> StreamWriter:
        return _CompletionStream(job, acc, texts)


class _Chat:
    def response(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> ChatCompletionResponse:
        k = _logprobs_k(job)
        per = choice_extensions(job, acc, texts)
        many = acc.choice_count() > 1
        choices = []
        for _, idx, s in _choices(acc):
            message, finish = AssistantMessage(content=s.text), s.finish_reason
            calls = job.tool_calls.calls(idx, s.text) if job.tool_calls is not None else None
            if calls is not None and job.tool_calls.auto:  # auto: the text outside the calls is the content
                content, calls = job.tool_calls.split(idx, s.text)
                message = AssistantMessage(content=content, tool_calls=calls)
                finish = "tool_calls" if finish == "stop" else finish
            elif calls is not None:  # tools: the constrained text is the call (OpenAI: content null)
                message = AssistantMessage(content=None, tool_calls=calls)
                finish = "tool_calls" if finish == "stop" else finish
            choices.append(ChatChoice(
                index=idx, message=message,
                logprobs=chat_logprobs(acc.events[idx], texts, k) if k is not None else None,
                finish_reason=finish, stop_reason=s.stop_reason, policymix=per[idx] if many else None))
        prompt_lp = None
        if job.prompt_logprobs is not None and 0 in acc.prompts:
            prompt_lp = vllm_prompt_logprobs(acc.prompts[0], texts, job.prompt_logprobs)
        return ChatCompletionResponse(id=job.response_id, created=job.created, model=job.model, choices=choices,
                                      usage=acc.usage(), prompt_logprobs=prompt_lp, policymix=extension(job, acc, per))

    def stream_writer(self, job: "Job", acc: Accumulator, texts: TokenTexts) -> StreamWriter:
        return _ChatStream(job, acc, texts)


COMPLETION = _Completion()
CHAT = _Chat()

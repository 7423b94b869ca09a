"""Request and response bodies of the OpenAI-compatible API (pydantic v2).

Requests accept and ignore unknown fields (the OpenAI SDK's ``extra_body`` may carry anything);
limits live in ``Field`` constraints so that a bad value is a 400 naming the field. Responses follow
OpenAI's shapes plus one ``policymix`` extension object (docs/api.md).
"""

from __future__ import annotations

import re
import time
from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from ..errors import PolicymixError
from ..messages import ChatMessage, TextPart  # noqa: F401 - re-exported: the request types of chat
from . import unserved

MAX_LOGPROBS = 20
_SURROGATE = re.compile("[\ud800-\udfff]")
MAX_N = 128
_INT64 = 2**63

# ----------------------------------------------------------------------------------------- requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_lone_surrogates(cls, body: Any) -> Any:
        # JSON may escape a lone UTF-16 surrogate ("\ud800"); no tokenizer, log line or response can encode
        # it, so it is refused here, in any field (extra_body's included), before anything reads the body
        where = lone_surrogate(body)
        if where is not None:
            raise PolicymixError(f"{where or 'body'}: the text holds a lone UTF-16 surrogate, which is not valid "
                                 "Unicode", param=where or None)
        return body


def lone_surrogate(value: Any, path: str = "") -> str | None:
    """The dotted path of the first string (or object key) in ``value`` holding a lone surrogate, else None."""
    if isinstance(value, str):
        return path if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}" if path else str(k)
            if isinstance(k, str) and _SURROGATE.search(k):
                return path or "body"  # the key itself cannot be named safely
            found = lone_surrogate(v, here)
            if found is not None:
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            found = lone_surrogate(v, f"{path}.{i}" if path else str(i))
            if found is not None:
                return found
    return None


class _Part(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(_Part):
    include_usage: bool | None = False


class ImplicitRerank(_Part):
    policy: str
    reference: str
    beta: float = Field(gt=0, allow_inf_nan=False)


class PruneSpec(_Part):
    """Early-pruned best-of-n: every ``every`` tokens the running candidates are scored, the best ``keep``
    fraction continues (at least one)."""

    every: int = Field(ge=1)
    keep: float = Field(gt=0, le=1, allow_inf_nan=False)


class SoftSpec(_Part):
    """Soft best-of-n: the returned candidate is drawn with probability proportional to exp(score / temperature)."""

    temperature: float = Field(gt=0, allow_inf_nan=False)


class _RerankOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prune: PruneSpec | None = None
    soft: SoftSpec | None = None


class RewardModelRerank(_RerankOptions):
    reward_model: str


class ImplicitRerankSpec(_RerankOptions):
    implicit: ImplicitRerank


class LogprobRerank(_RerankOptions):
    """Mean mixed logprob (the default scorer) with prune or soft options: ``{"prune": {...}}``."""


Rerank = Union[Literal["logprob"], RewardModelRerank, ImplicitRerankSpec, LogprobRerank]


class SearchRequest(_Part):
    """Chunk-level beam search (weak-to-strong search): each of ``beam_width`` beams samples ``expand`` chunks
    of ``chunk`` tokens, the best ``beam_width`` of them by ``scorer`` continue; ``max_tokens`` in all."""

    beam_width: int = Field(ge=1)
    expand: int = Field(ge=1)
    chunk: int = Field(ge=1)
    scorer: Rerank = "logprob"
    max_tokens: int | None = Field(default=None, ge=1)


class SpeculativeRequest(_Part):
    """Speculative decoding of the mixture: ``draft`` (a policy of the same tokenizer family, or "ngram") drafts
    ``num_tokens`` tokens a round, verified in one forward per policy; the tokens are still drawn from q."""

    draft: str
    num_tokens: int = Field(default=4, ge=1, le=16)


class JsonSchemaFormat(_Part):
    """``response_format.json_schema``: the output is JSON valid against ``schema`` (``strict`` either way:
    xgrammar's strict mode, as vLLM: no property or item that the schema does not declare)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str | None = None
    description: str | None = None
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(_Part):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(_Part):
    """vLLM's ``structured_outputs``: one constraint (json, regex, choice, grammar or json_object) and options."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(default=None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False  # JSON without whitespace between tokens
    disable_additional_properties: bool = False  # what xgrammar's strict mode always does
    whitespace_pattern: str | None = None  # outlines' option: refused when set
    structural_tag: str | None = None  # refused when set
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class FunctionDef(_Part):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None  # JSON schema of the arguments (none: an object)
    strict: bool | None = None


class Tool(_Part):
    type: Literal["function"]
    function: FunctionDef


class ToolChoiceFunction(_Part):
    name: str


class NamedToolChoice(_Part):
    type: Literal["function"]
    function: ToolChoiceFunction


class _Common(_Request):
    """Fields shared by /v1/completions and /v1/chat/completions (OpenAI + vLLM names + mixing)."""

    model: str
    temperature: float | None = Field(default=None, ge=0, le=100)
    top_p: float | None = Field(default=None, gt=0, le=1)
    n: int | None = Field(default=None, ge=1, le=MAX_N)
    best_of: int | None = Field(default=None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=2 * _INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100)]] | None = None
    user: str | None = None
    # vLLM extras
    top_k: int | None = Field(default=None, ge=-1)
    min_p: float | None = Field(default=None, ge=0, le=1)
    repetition_penalty: float | None = Field(default=None, gt=0, le=10)
    min_tokens: int | None = Field(default=None, ge=0)
    ignore_eos: bool | None = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    include_stop_str_in_output: bool | None = False
    skip_special_tokens: bool | None = True
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # each prompt token's logprob + top k
    # mixing extension
    mixture: str | dict[str, Any] | None = None  # a named mixture or an inline recipe (compiled by the engine)
    rerank: Rerank | None = None
    search: SearchRequest | None = None
    speculative: SpeculativeRequest | None = None  # unset: the server's default; null: off
    return_token_signals: bool | None = False
    # structured outputs (api/structured.py): one constraint per request
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: dict[str, Any] | str | None = None  # vLLM's older names
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1)
    guided_grammar: str | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, v: str | list[str] | None) -> list[str]:
        # An empty stop string would end every completion before its first token; drop it.
        stops = [v] if isinstance(v, str) else list(v or [])
        return [s for s in stops if s]


def _check_prompt(v: Any) -> Any:
    """str | list[str] | list[int] | list[list[int]], non-empty, ids >= 0 (one clear message)."""
    if isinstance(v, str):
        return v
    if isinstance(v, list) and v:
        if all(isinstance(p, str) for p in v):
            return v
        if all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in v):
            return v
        if all(isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                 for t in p) for p in v):
            return v
    raise ValueError("prompt must be a string, a list of strings, a non-empty list of token ids (>= 0) "
                     "or a list of such lists")


class CompletionRequest(_Common):
    prompt: Union[str, list[str], list[int], list[list[int]]]

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved(cls, body: Any) -> Any:  # OpenAI / vLLM fields this server does not serve: 400s naming them
        return unserved.refuse_unserved(body, unserved.COMPLETION)
    max_tokens: int | None = Field(default=16, ge=0)  # 0: score the prompt only (echo with logprobs)
    echo: bool | None = False
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v: Any) -> Any:  # before the union, so that a bad prompt gets one clear message
        return _check_prompt(v)

    def prompts(self) -> list[str | list[int]]:
        """One engine prompt per element: text or token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool | None = True
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unserved(cls, body: Any) -> Any:  # OpenAI / vLLM fields this server does not serve: 400s naming them
        return unserved.refuse_unserved(body, unserved.CHAT)


class TokenizeRequest(_Request):
    model: str | None = None  # None: the first served policy (as vLLM, which serves one model)
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = True
    add_generation_prompt: bool | None = True


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


# ---------------------------------------------------------------------------------------- responses


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CandidateOut(BaseModel):
    text: str
    token_ids: list[int]
    score: float
    finish_reason: str  # "pruned": stopped early by rerank.prune, at len(token_ids) tokens
    prompt_index: int = 0  # which prompt of a batched /v1/completions request
    probability: float | None = None  # rerank.soft: this candidate's selection probability


class TokenSignal(BaseModel):
    token: str
    token_id: int
    policy_logprobs: dict[str, float] | None = None
    implicit_reward: float | None = None
    kl: float | None = None


class ChoiceExtension(BaseModel):
    """Per-choice signals, present on each choice when a response has more than one."""

    kl_to_reference: float | None = None
    implicit_reward: float | None = None
    token_signals: list[TokenSignal] | None = None
    speculative: dict[str, Any] | None = None  # {"draft", "drafted", "accepted"}


class PolicymixExtension(ChoiceExtension):
    """What ran: compiled weights, best-of candidates, and the first choice's signals."""

    weights: dict[str, float]
    mixture: str | None = None
    variants: dict[str, dict[str, Any]] | None = None  # prompt variants in ``weights``: policy, source, lengths
    candidates: list[CandidateOut] | None = None
    kl_bound: float | None = None
    usage: dict[str, int] | None = None  # best-of: generated_tokens, every candidate's (pruned ones included)


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class PromptTokenLogprob(BaseModel):
    """vLLM's ``Logprob``: one entry of a prompt position's ``prompt_logprobs`` dict (keyed by token id)."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


PromptLogprobs = list[dict[str, PromptTokenLogprob] | None]  # one per prompt token; the first is null


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra
    policymix: ChoiceExtension | None = None


def _now() -> int:
    return int(time.time())


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    policymix: PolicymixExtension | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str = ""  # JSON text (streamed in pieces)


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ToolCallDelta(BaseModel):
    """One piece of a streamed tool call (serialised with ``exclude_unset``): the first has id, type and name."""

    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None  # only in the body when there are calls (as OpenAI's)

    @model_serializer(mode="wrap")
    def _without_empty_tool_calls(self, handler):
        out = handler(self)
        if out.get("tool_calls", ()) is None:
            del out["tool_calls"]
        return out


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    policymix: ChoiceExtension | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra
    policymix: PolicymixExtension | None = None


class DeltaMessage(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatStreamChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    policymix: ChoiceExtension | None = None


class ChatCompletionChunk(BaseModel):
    """One SSE event of a streamed chat completion (serialised with ``exclude_unset``)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    prompt_logprobs: PromptLogprobs | None = None  # vLLM extra: in the first chunk
    policymix: PolicymixExtension | None = None


class CompletionChunk(BaseModel):
    """One SSE event of a streamed completion (serialised with ``exclude_unset``)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    policymix: PolicymixExtension | None = None


class ModelPolicymix(BaseModel):
    kind: str  # "policy" | "mixture" | "reward"
    family: int  # tokenizer family: models mix only within one
    weights: dict[str, float] | None = None


class ModelCardOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "policymix"
    max_model_len: int | None = None
    policymix: ModelPolicymix


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCardOut]


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int | None = None
    tokens: list[int]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail

"""The boundary between the API layer and an engine: plain data plus one abstract client.

The HTTP layer depends only on :class:`EngineClient`; an engine depends on nothing of HTTP.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Literal

from ..mixing.recipes import CompiledRecipe


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI + vLLM names)."""

    max_tokens: int = 16
    temperature: float = 1.0  # 0: greedy (argmax of the mixed score)
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: off
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    min_tokens: int = 0
    logprobs: int | None = None  # None: none; k: the chosen token's logprob plus the top k
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    skip_special_tokens: bool = True
    n: int = 1  # sequences returned
    best_of: int | None = None  # sequences sampled (>= n); the best n by the rerank score are returned

    @property
    def candidates(self) -> int:
        """Sequences sampled for the request."""
        return max(self.best_of or 1, self.n)

    @property
    def reranked(self) -> bool:
        """More are sampled than returned: events wait until the candidates are scored."""
        return self.candidates > self.n


@dataclass
class ImplicitRewardSpec:
    """The DPO implicit reward ``beta * (log pi_policy - log pi_reference)``."""

    policy: str
    reference: str
    beta: float


@dataclass
class RerankSpec:
    """How best-of-n candidates are scored: 'logprob' (mean mixed logprob), a reward model, or implicit."""

    kind: Literal["logprob", "reward_model", "implicit"] = "logprob"
    reward_model: str | None = None
    implicit: ImplicitRewardSpec | None = None


@dataclass
class Prompt:
    """Exactly one of text, token_ids or messages. Each policy renders it with its own system prompt."""

    text: str | None = None
    token_ids: list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool = True


@dataclass
class GenerationRequest:
    request_id: str
    model: str  # the served name the client asked for (echoed, metrics label)
    recipe: CompiledRecipe
    prompt: Prompt
    sampling: SamplingParams = field(default_factory=SamplingParams)
    rerank: RerankSpec | None = None
    return_token_signals: bool = False
    signals: ImplicitRewardSpec | None = None  # pair for token signals; default from the recipe
    return_policy_logprobs: bool = False
    arrival_time: float = 0.0
    deadline: float | None = None  # monotonic time after which a still-queued request is dropped

    @property
    def needs_logprob(self) -> bool:
        """The mixed logprob of each chosen token is needed (reported, KL signals, mean-logprob rerank);
        otherwise an engine may skip normalising the mixed scores, as vLLM skips unrequested logprobs."""
        logprob_rerank = self.sampling.reranked and (self.rerank is None or self.rerank.kind == "logprob")
        return self.sampling.logprobs is not None or self.return_token_signals or logprob_rerank

    @property
    def needs_policy_logprobs(self) -> bool:
        """Each policy's logprob of every chosen token is needed (reported, signals, implicit rerank)."""
        return self.return_policy_logprobs or self.return_token_signals or (
            self.rerank is not None and self.rerank.kind == "implicit")


@dataclass
class TokenEvent:
    """One generated token of one returned sequence (``index`` in 0..n-1)."""

    index: int
    token_id: int
    text: str  # the text this token releases (may be "" while a stop string or a UTF-8 char forms)
    logprob: float | None = None  # log_softmax(mixed score) of the token; None unless the request needs it
    top_logprobs: list[tuple[int, float]] | None = None
    policy_logprobs: dict[str, float] | None = None
    implicit_reward: float | None = None  # beta * (log pi_P - log pi_R) of this token
    kl: float | None = None  # KL(q || pi_ref) of this step
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error" on the last token


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    score: float
    finish_reason: str


@dataclass
class SequenceResult:
    """What a returned sequence amounted to once it finished."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | int | None = None
    kl_to_reference: float | None = None
    implicit_reward: float | None = None


@dataclass
class RequestDone:
    """The last event of a request."""

    prompt_tokens: int
    completion_tokens: int
    sequences: list[SequenceResult]
    weights: dict[str, float]
    candidates: list[Candidate] | None = None
    kl_bound: float | None = None
    error: str | None = None  # set when the request failed inside the engine
    error_status: int = 500  # HTTP status for ``error`` (503/429: retry later; 400: bad input)
    error_code: str | None = None


EngineEvent = TokenEvent | RequestDone


@dataclass
class ModelCard:
    name: str
    kind: Literal["policy", "mixture", "reward"]
    family: int
    weights: dict[str, float] | None = None  # named mixtures: the compiled weights
    max_model_len: int | None = None


class EngineClient(abc.ABC):
    """What the API layer may call. Implemented by the native engine (and the vLLM engine)."""

    @abc.abstractmethod
    def models(self) -> list[ModelCard]: ...

    @abc.abstractmethod
    def compile(self, model: str, mixture: Any) -> CompiledRecipe:
        """Compile ``model`` + optional ``mixture`` (name or inline recipe); raises RecipeError/ModelNotFound."""

    @abc.abstractmethod
    def tokenizer(self, model: str) -> Any:
        """The tokenizer shared by the family that ``model`` (policy or mixture) belongs to."""

    @abc.abstractmethod
    def prompt_length(self, request: GenerationRequest) -> int:
        """The longest per-policy prompt of the request (raises ContextTooLong past the context)."""

    def policies_used(self, request: GenerationRequest) -> list[str]:
        """Every policy the request runs: the recipe's plus observers (token signals, implicit rerank)."""
        return list(request.recipe.active)

    @abc.abstractmethod
    def generate(self, request: GenerationRequest) -> AsyncIterator[EngineEvent]:
        """Submit and stream events; ends with one RequestDone. Raises Overloaded when full."""

    @abc.abstractmethod
    async def abort(self, request_id: str) -> None: ...

    @abc.abstractmethod
    def is_healthy(self) -> bool: ...

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """Running and waiting counts, per-policy forward counts (for /metrics)."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Begin stepping (after models are loaded)."""

    async def shutdown(self, deadline_s: float = 30.0) -> None:  # noqa: B027 - optional hook
        """Stop admitting; finish or abort running requests within the deadline."""

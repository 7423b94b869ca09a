"""The boundary between the API layer and an engine: plain data plus one abstract client.

The HTTP layer depends only on :class:`EngineClient`; an engine depends on nothing of HTTP.
"""

from __future__ import annotations

import abc
import enum
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, AsyncIterator, Literal

from ..mixing.recipes import CompiledRecipe
from ..request_types import ImplicitRewardSpec, Prompt  # noqa: F401 - re-exported: the boundary's request types


DRAFT_STREAM = "<draft>"  # the lane key of a sequence's context in its draft policy's drafter runner
SAMPLING_EPS = 1e-5  # vLLM's: a temperature below it samples greedily (1 / T would overflow float32 scores)


@dataclass
class SamplingParams:
    """Per-request decoding settings (OpenAI + vLLM names)."""

    max_tokens: int | None = 16  # None: what the context leaves after the prompt (the plan resolves it)
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
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's logprob under q plus the top k
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
class RerankSpec:
    """How best-of-n candidates are scored: 'logprob' (mean mixed logprob), a reward model, or implicit."""

    kind: Literal["logprob", "reward_model", "implicit"] = "logprob"
    reward_model: str | None = None
    implicit: ImplicitRewardSpec | None = None
    prune_every: int | None = None  # prune: score the running candidates every this many tokens...
    prune_keep: float | None = None  # ...and keep this fraction of them (at least one)
    soft_temperature: float | None = None  # soft best-of: draw the returned ones ~ exp(score / temperature)


@dataclass
class SearchSpec:
    """Chunk-level beam search: each of ``beam_width`` beams samples ``expand`` chunks of ``chunk`` tokens;
    the best ``beam_width`` of them by the request's rerank scorer continue."""

    beam_width: int
    expand: int
    chunk: int


@dataclass
class SpeculativeSpec:
    """Lossless speculative decoding of the mixture: ``num_tokens`` drafted per round by ``draft`` (a served
    policy of the mixture's tokenizer family, or "ngram": prompt lookup), verified in one forward per policy."""

    draft: str  # a policy name, or NGRAM
    num_tokens: int

    NGRAM = "ngram"

    @property
    def ngram(self) -> bool:
        return self.draft == self.NGRAM


@dataclass
class Constraint:
    """What the output must match (structured outputs), compiled with xgrammar (``engine/structured.py``)."""

    kind: Literal["json", "json_object", "regex", "choice", "grammar"]
    spec: Any = None  # json: a schema (dict or JSON text); regex, grammar (EBNF): text; choice: list[str]
    any_whitespace: bool = True  # JSON: any whitespace between tokens (vLLM's default); False: compact
    param: str = "structured_outputs"  # the request field it came from (a 400 about it names this)


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
    max_tokens_cap: int | None = None  # caps an unset max_tokens (an API key's limit)
    search: SearchSpec | None = None  # chunk-level beam search (sampling.best_of = beam_width * expand)
    speculative: SpeculativeSpec | None = None  # drafted tokens verified against the mixture
    constraint: Constraint | None = None  # structured outputs: every token is one the grammar allows

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
class PromptLogprob:
    """One prompt token scored under the request's mixture q (conditioned on the tokens before it)."""

    logprob: float
    rank: int  # 1 + the number of tokens q finds more likely
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # the top k of q at this position


@dataclass
class PromptEvent:
    """The prompt's tokens with their log-probabilities, sent once, before any generated token."""

    token_ids: list[int]  # the scored tokens: the prompt as a policy without a system prompt renders it
    logprobs: list[PromptLogprob | None]  # one per token; the first is None (nothing conditions it)


@dataclass
class Candidate:
    text: str
    token_ids: list[int]
    score: float
    finish_reason: str  # "pruned": stopped early by rerank pruning
    probability: float | None = None  # soft best-of: its selection probability


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
    speculative: dict[str, Any] | None = None  # {"draft", "drafted", "accepted"} when its tokens were drafted


class ErrorKind(str, enum.Enum):
    """Why an engine could not serve a request; the API alone turns a kind into an HTTP status."""

    OVERLOADED = "overloaded"  # no room now, queued past the deadline, or shutting down: retry later
    OUT_OF_MEMORY = "out_of_memory"  # an allocation failed: retry later, perhaps smaller
    BAD_INPUT = "bad_input"  # the request itself cannot run (the engine refused its fields)
    INTERNAL = "internal"  # a bug or a broken engine


class EngineError(Exception):
    """Raised by ``EngineClient.generate`` before anything is queued (e.g. the queue is full)."""

    def __init__(self, kind: ErrorKind, message: str, code: str | None = None):
        super().__init__(message)
        self.kind, self.message, self.code = kind, message, code


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
    error_kind: ErrorKind | None = None  # with ``error``
    error_code: str | None = None  # finer than the kind: queue_timeout, engine_stopped, nan, ...
    generated_tokens: int | None = None  # best-of: every candidate's tokens, pruned ones included

    @classmethod
    def failure(cls, kind: ErrorKind, message: str, code: str | None, prompt_tokens: int,
                weights: dict[str, float]) -> "RequestDone":
        """The one way an engine says that a request failed."""
        return cls(prompt_tokens, 0, [], dict(weights), error=message, error_kind=kind, error_code=code)


EngineEvent = TokenEvent | PromptEvent | RequestDone


@dataclass(eq=False)
class RequestPlan:
    """Everything a request needs, computed once (``engine/plan.py``) and read by the API and both engines.

    ``weights`` lists every policy whose forward runs for the request: the recipe's (non-zero weights)
    first, then the observers at weight 0 (the token-signal pair, an implicit-rerank pair).
    """

    request: GenerationRequest
    sampling: SamplingParams  # the request's, with max_tokens resolved (never None)
    weights: dict[str, float]  # stream (a policy, or a prompt variant of one) -> weight
    observers: tuple[str, ...]  # policies that run only to be observed (weight 0)
    scorers: tuple[str, ...]  # reward models that score best-of candidates
    prompts: dict[str, list[int]]  # stream -> its rendered prompt ids (a policy's own system prompt first)
    eos_ids: frozenset[int]  # EOS of the recipe's policies (observers never change when a text ends)
    signal_pair: ImplicitRewardSpec | None  # token signals' (policy, reference, beta), when asked for
    scored: list[int] | None = None  # with prompt logprobs: the tokens scored, the end of every policy's prompt
    # stream -> the runner that computes it (engines that run policies themselves): policies that share
    # weights share one runner, each stream a lane of its forward; the draft stream -> its drafter runner
    runner_of: dict[str, str] = field(default_factory=dict)
    speculative: SpeculativeSpec | None = None  # what drafts for the request (None: no speculation)
    draft_prompt: list[int] | None = None  # a draft policy's rendering of the prompt
    grammar: Any = None  # with a constraint: (xgrammar CompiledGrammar, its stop token ids), compiled once

    def policy_of(self, stream: str) -> str:
        """The served policy behind a stream (a prompt variant's policy, the draft stream's draft policy, else
        the stream itself)."""
        if stream == DRAFT_STREAM and self.speculative is not None:
            return self.speculative.draft
        return self.request.recipe.policy_of(stream)

    def runner(self, stream: str) -> str:
        """The runner whose forward computes ``stream`` (its policy's name where it owns its weights)."""
        return self.runner_of.get(stream, stream)

    @property
    def policies(self) -> list[str]:
        """Every served policy the request uses (recipe, variants' policies, observers, reward models): what
        a key must allow."""
        draft = (self.speculative.draft,) if self.draft_prompt is not None else ()
        return list(dict.fromkeys([*(self.policy_of(s) for s in self.weights), *self.scorers, *draft]))

    @cached_property  # read every step; a plan does not change
    def leader(self) -> str:
        """The stream whose rendering detokenizes the output: the recipe's first policy that is not a variant."""
        variants = self.request.recipe.variants
        return next((s for s in self.weights if s not in variants), next(iter(self.weights)))

    @cached_property  # read every step; a plan does not change
    def prompt_len(self) -> int:
        return max(len(p) for p in self.prompts.values())

    @property
    def candidates(self) -> int:
        return self.sampling.candidates

    def reserved_tokens(self, policy: str) -> int:
        """KV cells the request may need for ``policy`` (every candidate's prompt and output, in each of its
        contexts: the policy's own and its prompt variants'), wherever its runner holds them: KV budgets are
        per policy (``server.kv_budget_tokens``), also where policies share a runner."""
        return sum(self.candidates * (len(prompt) + self.sampling.max_tokens)
                   for stream, prompt in self.prompts.items() if self.policy_of(stream) == policy)

    @cached_property  # read every step; a plan does not change
    def budgeted(self) -> list[str]:
        """The policies whose KV budgets the request draws on (each stream's served policy)."""
        return list(dict.fromkeys(self.policy_of(s) for s in self.prompts))

    @cached_property  # read every step; a plan does not change
    def runners(self) -> list[str]:
        """The runners whose forwards the request runs (each stream's)."""
        return list(dict.fromkeys(self.runner(s) for s in self.prompts))

    def seed(self, index: int) -> int | None:
        """Candidate ``index``'s sampling seed: distinct per candidate and repeatable (None: unseeded)."""
        s = self.sampling.seed
        return None if s is None else (s * 1_000_003 + index) % (2**63)

    def failure(self, kind: ErrorKind, message: str, code: str | None = None) -> RequestDone:
        return RequestDone.failure(kind, message, code, self.prompt_len, self.request.recipe.weights)


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
    def plan(self, request: GenerationRequest) -> RequestPlan:
        """Check and render a request once (raises PolicymixError naming the field, ContextTooLong)."""

    @abc.abstractmethod
    def generate(self, plan: RequestPlan) -> AsyncIterator[EngineEvent]:
        """Submit and stream events; ends with one RequestDone. Raises EngineError when it cannot queue."""

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

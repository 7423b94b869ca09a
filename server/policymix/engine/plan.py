"""``make_plan``: a request checked and rendered once, for the API and both engines.

The plan resolves what every engine used to work out on its own: the policies that run and their
weights, the observers (the token-signal pair, an implicit-rerank pair) that run at weight 0, the
reward model that scores candidates, each policy's rendered prompt, the EOS ids, the length check
and the max_tokens an unset field stands for; with prompt logprobs, the tokens that are scored.
Bad input raises PolicymixError naming the field.
"""

from __future__ import annotations

from dataclasses import replace

from ..errors import PolicymixError
from ..mixing.recipes import Variant
from ..registry import Registry, render_chat
from .protocol import SAMPLING_EPS, GenerationRequest, ImplicitRewardSpec, Prompt, RequestPlan
from .speculative import DRAFT_STREAM, drafter_key
from .structured import plan_grammar


def make_plan(registry: Registry, req: GenerationRequest) -> RequestPlan:
    if 0.0 < req.sampling.temperature < SAMPLING_EPS:  # greedy, as vLLM samples it
        req = replace(req, sampling=replace(req.sampling, temperature=0.0))
    pair, observers = _check(registry, req)
    weights = dict(req.recipe.active)
    for name in observers:
        weights.setdefault(name, 0.0)
    sp = req.sampling
    prompt, scored = req.prompt, None
    if sp.prompt_logprobs is not None:
        # the scored tokens are the prompt as a policy without a system prompt renders it; a prompted
        # policy sees its system prompt first, then the same tokens (so every position is comparable)
        scored = registry.policies[req.recipe.policy_of(next(iter(req.recipe.active)))].render(
            prompt, with_system_prompt=False)
        prompt = Prompt(token_ids=scored)
    elif sp.max_tokens == 0:
        raise PolicymixError("max_tokens 0 only scores the prompt: it needs echo with logprobs, or prompt_logprobs",
                             param="max_tokens")
    if sp.max_tokens == 0 and sp.candidates > 1:
        raise PolicymixError("max_tokens 0 scores the prompt once: n and best_of must be 1", param="max_tokens")
    prompts: dict[str, list[int]] = {}
    rendered: dict[str | None, list[int]] = {}  # policies without their own system prompt render alike
    variants = req.recipe.variants
    if variants and scored is not None:
        raise PolicymixError("prompt logprobs are not available with prompt variants (their contexts differ)",
                             param="prompt_logprobs")
    for name in weights:
        if name in variants:
            prompts[name] = _render_variant(registry, name, variants[name], req.prompt)
            continue
        p = registry.policies[name]
        if p.system_prompt not in rendered:
            rendered[p.system_prompt] = p.render(prompt)
        prompts[name] = rendered[p.system_prompt]
    prompt_len = max(len(x) for x in prompts.values())
    family = req.recipe.family
    max_tokens = sp.max_tokens
    if max_tokens is None:  # what the context leaves (at least 1: a full context fails the check below)
        max_tokens = max(1, registry.max_model_len(family) - prompt_len)
        if req.max_tokens_cap is not None:
            max_tokens = min(max_tokens, req.max_tokens_cap)
    registry.check_length(family, prompt_len, max_tokens)
    eos = frozenset().union(*(registry.policies[req.recipe.policy_of(n)].eos_ids for n in req.recipe.active))
    scorers = (req.rerank.reward_model,) if req.rerank is not None and req.rerank.kind == "reward_model" else ()
    draft_prompt = _draft_prompt(registry, req, prompt)
    _check_token_ids(registry, [*{req.recipe.policy_of(n) for n in weights},
                                *([req.speculative.draft] if draft_prompt is not None else [])], sp)
    grammar = plan_grammar(registry, req, eos) if req.constraint is not None else None
    return RequestPlan(
        request=req, sampling=replace(sp, max_tokens=max_tokens, stop=list(sp.stop),
                                      stop_token_ids=list(sp.stop_token_ids), logit_bias=dict(sp.logit_bias)),
        weights=weights, observers=tuple(n for n in observers if n not in req.recipe.active), scorers=scorers,
        prompts=prompts, eos_ids=eos, signal_pair=pair if req.return_token_signals else None, scored=scored,
        runner_of={**{s: registry.runner_key(req.recipe.policy_of(s)) for s in prompts},
                   **({DRAFT_STREAM: drafter_key(registry.runner_key(req.speculative.draft))}
                      if draft_prompt is not None else {})},
        speculative=req.speculative,
        draft_prompt=draft_prompt, grammar=grammar)


def _check_token_ids(registry: Registry, policies: list[str], sp) -> None:
    """Every token id the sampling fields carry must index the vocabulary of every policy the request reaches
    (prompt ids are checked as each policy renders them): an id past it would fail the whole step's sampling."""
    vocab = min(registry.policies[p].vocab_size for p in policies)
    for field, ids in (("stop_token_ids", sp.stop_token_ids), ("logit_bias", sp.logit_bias)):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise PolicymixError(f"{field}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=field)


def _draft_prompt(registry: Registry, req: GenerationRequest, prompt: Prompt) -> list[int] | None:
    """A draft policy's rendering of the prompt (None for n-gram drafting); 400s name ``speculative``."""
    spec = req.speculative
    if spec is None:
        return None
    if not 1 <= spec.num_tokens <= 16:
        raise PolicymixError("speculative.num_tokens must be between 1 and 16", param="speculative.num_tokens")
    if req.search is not None or (req.rerank is not None and req.rerank.prune_every is not None):
        raise PolicymixError("speculative cannot be combined with search or rerank.prune", param="speculative")
    if spec.ngram:
        return None
    p = registry.policies.get(spec.draft)
    if p is None or p.kind != "causal":
        raise PolicymixError(f"speculative.draft: unknown policy {spec.draft!r} (a served policy or 'ngram')",
                             param="speculative.draft")
    if p.family != req.recipe.family:
        raise PolicymixError(f"speculative.draft: policy {spec.draft!r} uses a different tokenizer than the mixture",
                             param="speculative.draft")
    return p.render(prompt)


def _render_variant(registry: Registry, name: str, v: Variant, prompt: Prompt) -> list[int]:
    """A prompt variant's context: its policy's rendering of another prompt (400s name the variant)."""
    policy = registry.policies[v.policy]
    field = v.origin
    chat = prompt.messages is not None
    if v.source in ("messages", "drop_system", "drop_context") and not chat:
        raise PolicymixError(f"{field}: a chat variant ({v.source}) needs /v1/chat/completions", param=field)
    if v.source == "prompt":
        ids = policy.render(Prompt(text=v.value) if isinstance(v.value, str) else Prompt(token_ids=list(v.value)))
    elif v.source == "messages":
        ids = policy.render(Prompt(messages=list(v.value), add_generation_prompt=prompt.add_generation_prompt,
                                   tools=prompt.tools))
    elif v.source == "negative":  # guidance's negative prompt, in the request's own form
        ids = policy.render(Prompt(messages=[{"role": "user", "content": v.value}],
                                   add_generation_prompt=prompt.add_generation_prompt) if chat else Prompt(text=v.value))
    elif v.source == "system_prompt":  # the request under this system prompt instead of its own
        if chat:
            prompt = Prompt(messages=[m for m in prompt.messages if m.get("role") not in ("system", "developer")],
                            add_generation_prompt=prompt.add_generation_prompt, tools=prompt.tools)
        ids = policy.render(prompt, system_prompt=v.value)
    elif v.source == "unconditional":  # the CFG paper's empty context: the start token alone
        tok = policy.tokenizer
        start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        ids = [start if start is not None else 0]
    else:  # context-aware decoding: the request without its system message, or with its last user turn only
        messages = [dict(m) for m in prompt.messages]
        if v.source == "drop_system":
            kept = [m for m in messages if m.get("role") not in ("system", "developer")]
        else:
            users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
            if not users:
                raise PolicymixError(f"{field}: context-aware decoding needs a user turn", param="messages")
            kept = [messages[users[-1]]]
        if len(kept) == len(messages):
            raise PolicymixError(f"{field}: the conversation has no {v.source[5:]} to drop", param=field)
        ids = policy.render(Prompt(messages=kept, add_generation_prompt=prompt.add_generation_prompt,
                                   tools=prompt.tools),
                            with_system_prompt=False)
    if not ids:
        raise PolicymixError(f"{field}: the variant renders to no tokens", param=field)
    return ids


def _check(registry: Registry, req: GenerationRequest) -> tuple[ImplicitRewardSpec | None, list[str]]:
    """Raise PolicymixError (400, naming the field) for bad best-of / rerank / signals fields; return the
    token-signal pair (or None) and the policies the request only observes."""
    sp, rr = req.sampling, req.rerank
    pols = registry.policies
    max_best_of = registry.config.server.max_best_of
    best_of = sp.best_of or sp.n
    if best_of < sp.n:
        raise PolicymixError(f"best_of ({best_of}) must be >= n ({sp.n})", param="best_of")
    if best_of > max_best_of:
        raise PolicymixError(f"best_of {best_of} is above the server's maximum {max_best_of}", param="best_of")
    if best_of > sp.n and sp.temperature == 0:
        raise PolicymixError("best_of > n with temperature 0 would give identical candidates", param="best_of")
    if rr is not None and rr.kind == "reward_model":
        rm = pols.get(rr.reward_model)
        if rm is None:
            raise PolicymixError(f"unknown reward model {rr.reward_model!r}", param="rerank.reward_model")
        if rm.kind != "reward":
            raise PolicymixError(f"{rr.reward_model!r} is a policy, not a reward model", param="rerank.reward_model")
        messages = req.prompt.messages
        if messages is not None and getattr(rm.tokenizer, "chat_template", None) and any(
                m.get("role") == "tool" or m.get("tool_calls") for m in messages):
            # tool turns: the reward model's template must render them too (checked now, not after generating)
            render_chat(rm.tokenizer, [*messages, {"role": "assistant", "content": ""}], False, req.prompt.tools,
                        rm.name)
    for name, value in (("prune", rr.prune_every if rr else None), ("soft", rr.soft_temperature if rr else None)):
        if value is not None and not best_of > sp.n:
            raise PolicymixError(f"rerank.{name} chooses among best-of candidates: it needs best_of > n",
                                 param=f"rerank.{name}")
    if rr is not None and rr.kind == "implicit" and (rr.implicit is None or not rr.implicit.beta > 0):
        raise PolicymixError("rerank.implicit.beta must be > 0", param="rerank.implicit.beta")
    if req.signals is not None and not req.signals.beta > 0:
        raise PolicymixError("signals.beta must be > 0", param="signals.beta")
    pair = req.signals or registry.default_signal_pair(req.recipe)
    observers: list[str] = []
    if req.return_token_signals and pair is not None:
        observers += [pair.policy, pair.reference]
    if rr is not None and rr.kind == "implicit":
        observers += [rr.implicit.policy, rr.implicit.reference]
    for name in observers:
        p = pols.get(name)
        if p is None or p.kind != "causal":
            raise PolicymixError(f"unknown policy {name!r} for signals / rerank", param="rerank.implicit")
        if p.family != req.recipe.family:
            raise PolicymixError(f"policy {name!r} uses a different tokenizer than the mixture",
                                 param="rerank.implicit")
    return pair, list(dict.fromkeys(observers))

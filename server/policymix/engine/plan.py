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
from ..registry import Registry
from .protocol import GenerationRequest, ImplicitRewardSpec, Prompt, RequestPlan


def make_plan(registry: Registry, req: GenerationRequest) -> RequestPlan:
    pair, observers = _check(registry, req)
    weights = dict(req.recipe.active)
    for name in observers:
        weights.setdefault(name, 0.0)
    sp = req.sampling
    prompt, scored = req.prompt, None
    if sp.prompt_logprobs is not None:
        # the scored tokens are the prompt as a policy without a system prompt renders it; a prompted
        # policy sees its system prompt first, then the same tokens (so every position is comparable)
        scored = registry.policies[next(iter(req.recipe.active))].render(prompt, with_system_prompt=False)
        prompt = Prompt(token_ids=scored)
    elif sp.max_tokens == 0:
        raise PolicymixError("max_tokens 0 only scores the prompt: it needs echo with logprobs, or prompt_logprobs",
                             param="max_tokens")
    if sp.max_tokens == 0 and sp.candidates > 1:
        raise PolicymixError("max_tokens 0 scores the prompt once: n and best_of must be 1", param="max_tokens")
    prompts: dict[str, list[int]] = {}
    rendered: dict[str | None, list[int]] = {}  # policies without their own system prompt render alike
    for name in weights:
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
    eos = frozenset().union(*(registry.policies[name].eos_ids for name in req.recipe.active))
    scorers = (req.rerank.reward_model,) if req.rerank is not None and req.rerank.kind == "reward_model" else ()
    return RequestPlan(
        request=req, sampling=replace(sp, max_tokens=max_tokens, stop=list(sp.stop),
                                      stop_token_ids=list(sp.stop_token_ids), logit_bias=dict(sp.logit_bias)),
        weights=weights, observers=tuple(n for n in observers if n not in req.recipe.active), scorers=scorers,
        prompts=prompts, eos_ids=eos, signal_pair=pair if req.return_token_signals else None, scored=scored)


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

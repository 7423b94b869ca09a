"""Helpers to drive the engine core synchronously in tests, and a no-cache oracle."""

from __future__ import annotations

import itertools

import torch

from policymix.engine.protocol import GenerationRequest, Prompt, PromptEvent, RequestDone, SamplingParams, TokenEvent

_ids = itertools.count()


def make_request(engine_core, model="base", mixture=None, prompt="Hello world", **sampling) -> GenerationRequest:
    from policymix.mixing.recipes import compile_recipe

    reg = engine_core.registry
    recipe = compile_recipe(mixture, model, reg.infos(), reg.config.mixtures)
    extra = {k: sampling.pop(k) for k in ("rerank", "return_token_signals", "signals", "return_policy_logprobs",
                                          "speculative")
             if k in sampling}
    if isinstance(prompt, str):
        p = Prompt(text=prompt)
    elif prompt and isinstance(prompt[0], dict):  # chat messages
        p = Prompt(messages=list(prompt))
    else:
        p = Prompt(token_ids=list(prompt))
    return GenerationRequest(f"req-{next(_ids)}", model, recipe, p, SamplingParams(**sampling), **extra)


class Collector:
    """Collects the events of one request (the emit sink of a RequestState)."""

    def __init__(self):
        self.events: list[TokenEvent] = []
        self.prompt: PromptEvent | None = None
        self.done: RequestDone | None = None

    def __call__(self, ev):
        if isinstance(ev, RequestDone):
            self.done = ev
        elif isinstance(ev, PromptEvent):
            assert self.prompt is None and not self.events, "the prompt's logprobs come once, before any token"
            self.prompt = ev
        else:
            self.events.append(ev)

    def tokens(self, index=0):
        return [e.token_id for e in self.events if e.index == index]


def submit(core, req) -> Collector:
    state = core.render(req)
    col = Collector()
    state.emit = col
    core.add(state)
    return col


def run_until_done(core, cols, max_steps=10_000):
    for _ in range(max_steps):
        if all(c.done is not None for c in cols):
            return
        core.step()
    raise AssertionError("engine did not finish")


@torch.inference_mode()
def oracle_mixed_logprobs(registry, weights: dict[str, float], prompts: dict[str, list[int]],
                          output: list[int], policy_of=lambda stream: stream) -> torch.Tensor:
    """log_softmax(sum_k w_k log_softmax(l_k)) by a full forward of each policy (``policy_of`` a prompt
    variant's stream), no cache."""
    total = None
    for name, w in weights.items():
        if w == 0:
            continue
        pol = registry.policies[policy_of(name)]
        ids = torch.tensor([prompts[name] + output])
        logits = pol.model(input_ids=ids).logits[0, -1, : pol.vocab_size].float()
        term = w * torch.log_softmax(logits, -1)
        total = term if total is None else total + term
    return torch.log_softmax(total, -1)


@torch.inference_mode()
def formula_greedy(registry, weights: dict[str, float], prompts: dict[str, list[int]], leader: str, n: int,
                   rep: float, presence: float, frequency: float) -> list[int]:
    """Greedy tokens of the penalised raw mixed logits, by full no-cache forwards."""
    out: list[int] = []
    for _ in range(n):
        raw = None
        for name, w in weights.items():
            pol = registry.policies[name]
            logits = pol.model(input_ids=torch.tensor([prompts[name] + out])).logits[0, -1, : pol.vocab_size].float()
            raw = w * logits if raw is None else raw + w * logits
        for tok in set(prompts[leader]) | set(out):
            raw[tok] = raw[tok] / rep if raw[tok] > 0 else raw[tok] * rep
        for tok in set(out):
            raw[tok] -= frequency * out.count(tok) + presence
        out.append(int(raw.argmax()))
    return out


def full_logprobs(ev, V) -> torch.Tensor:
    """A token event's whole log-distribution [V] from its top_logprobs (requested with logprobs = V)."""
    row = torch.full((V,), float("nan"))
    for tok, lp in ev.top_logprobs:
        row[tok] = lp
    return row


TRIGGER_COUNT = 3  # a row holding the trigger id this many times is faulty (only a prompt can: decode feeds 1)


class FaultyModel:
    """A policy's model that fails on the rows of one request: those whose input holds ``trigger`` at least
    ``TRIGGER_COUNT`` times (a prompt built for it). ``kind``: "oom" raises out of memory for the whole
    forward those rows are in; "nan" returns NaN logits on those rows; "error" raises a RuntimeError.
    Installed as ``runner.model`` (the runner calls it with the same keywords as the real model)."""

    def __init__(self, model, trigger: int, kind: str):
        self.model, self.trigger, self.kind = model, trigger, kind
        self.config = model.config
        self.hits: list[int] = []  # the batch size of every forward that held a faulty row

    def __call__(self, **kw):
        ids = kw["input_ids"]
        hit = (ids == self.trigger).sum(-1) >= TRIGGER_COUNT  # [B]
        if bool(hit.any()):
            self.hits.append(ids.shape[0])
            if self.kind == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            if self.kind == "error":
                raise RuntimeError("injected forward failure")
        out = self.model(**kw)
        if self.kind == "nan" and bool(hit.any()):
            out.logits[hit] = float("nan")
        return out


def faulty_prompt(trigger: int) -> list[int]:
    """Token ids that make a FaultyModel fail (the trigger repeated, between ordinary ids)."""
    return [5, *([trigger] * TRIGGER_COUNT), 6]


class ExplodingRewardModel(torch.nn.Module):
    """A reward model whose forward raises (installed as a reward policy's ``model``)."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # where scoring looks for the device

    def forward(self, *a, **k):
        raise RuntimeError("reward model exploded")

"""A scripted EngineClient for API-layer tests: fixed text, deterministic logprobs, no torch.

Each returned sequence ``j`` spells ``SCRIPT`` followed by ``j`` one character per token, so a test
can predict every byte of a response (``script`` replaces it: every sequence spells it). Knobs:
``delay`` per token (disconnect tests), ``overloaded`` (generate raises Overloaded), a prompt containing
``FAIL`` (the request fails after two tokens), ``max_len``; ``CharTokenizer(tools=True)`` has a template
that renders tools and tool calls (a Hermes-style one, for tool_choice auto).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace
from typing import Any, AsyncIterator

from policymix.engine.protocol import (
    Candidate,
    EngineClient,
    GenerationRequest,
    ModelCard,
    RequestDone,
    RequestPlan,
    SequenceResult,
    TokenEvent,
)
from policymix.errors import ContextTooLong, Overloaded, PolicymixError
from policymix.mixing.recipes import PolicyInfo, compile_recipe

SCRIPT = "Hello world"
MAX_LEN = 64


@dataclass
class _Enc:
    input_ids: list[int]


class CharTokenizer:
    """One token per character: ids 0-1 are <s> and </s>, then printable ASCII."""

    SPECIALS = ["<s>", "</s>"]

    def __init__(self, chat_template: bool = True, tools: bool = False):
        self.tools = tools  # a Hermes-style template: renders tools and tool turns, writes <tool_call>
        self.vocab = self.SPECIALS + [chr(c) for c in range(32, 127)]
        self.index = {t: i for i, t in enumerate(self.vocab)}
        self.all_special_ids = [0, 1]
        self.eos_token_id = 1
        self.chat_template = ("{{ messages }}{% if tools %}<tool_call>{% endif %}" if tools else "{{ messages }}"
                              ) if chat_template else None

    def __len__(self) -> int:
        return len(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = True) -> _Enc:
        ids = [self.index.get(c, self.index["?"]) for c in text]
        return _Enc(([0] if add_special_tokens else []) + ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(self.vocab[i] for i in ids if not (skip_special_tokens and i < 2))

    def convert_ids_to_tokens(self, i: int) -> str:
        return self.vocab[i]

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=False, tools=None) -> str:
        head = ""
        if tools and self.tools:
            head = "<tools>" + ",".join(t["function"]["name"] for t in tools) + "</tools>"
        parts = []
        for m in messages:
            calls = "".join(f"<tool_call>{c['function']['name']}</tool_call>" for c in m.get("tool_calls") or ()
                            ) if self.tools else ""
            parts.append(f"<{m['role']}>{m['content']}{calls}")
        return head + "".join(parts) + ("<assistant>" if add_generation_prompt else "")


def token_logprob(position: int) -> float:
    return -0.25 * (position % 4) - 0.125


class FakeEngine(EngineClient):
    def __init__(self, delay: float = 0.0):
        self.delay = delay
        self.overloaded: Overloaded | None = None
        self.healthy = True
        self.started = self.stopped = False
        self.infos = {
            "base": PolicyInfo("base", "causal", 0),
            "dpo": PolicyInfo("dpo", "causal", 0, reference="base", beta=0.1),
            "rm": PolicyInfo("rm", "reward", 0),
            "nochat": PolicyInfo("nochat", "causal", 1),
        }
        from policymix.config import Recipe

        self.mixtures = {"half": Recipe(weights={"base": 0.5, "dpo": 0.5})}
        self.tokenizers = {0: CharTokenizer(), 1: CharTokenizer(chat_template=False)}
        self.requests: list[GenerationRequest] = []  # every request generate() accepted
        self.plans: list[RequestPlan] = []  # and its plan
        self.active: set[str] = set()
        self.cancelled: list[str] = []
        self.aborted: list[str] = []
        self.forwards = 0
        self.script: str | None = None  # every sequence spells this instead of SCRIPT + its index
        self.max_len = MAX_LEN

    # ----- EngineClient

    def models(self) -> list[ModelCard]:
        cards = [ModelCard(n, "policy" if i.kind == "causal" else "reward", i.family, max_model_len=self.max_len)
                 for n, i in self.infos.items()]
        cards.append(ModelCard("half", "mixture", 0, weights={"base": 0.5, "dpo": 0.5}, max_model_len=self.max_len))
        return cards

    def compile(self, model: str, mixture: Any):
        return compile_recipe(mixture, model, self.infos, self.mixtures)

    def tokenizer(self, model: str) -> Any:
        return self.tokenizers[self.compile(model, None).family]

    def _prompt_ids(self, req: GenerationRequest) -> list[int]:
        tok = self.tokenizers[req.recipe.family]
        p = req.prompt
        if p.messages is not None:
            if not tok.chat_template:
                raise PolicymixError(f"model `{req.model}` has no chat template", param="messages",
                                     code="no_chat_template")
            return tok(tok.apply_chat_template(p.messages, tools=p.tools), add_special_tokens=False).input_ids
        if p.token_ids is not None:
            if any(t >= len(tok) for t in p.token_ids):
                raise PolicymixError("prompt token id outside the vocabulary", param="prompt")
            return list(p.token_ids)
        return tok(p.text).input_ids

    def plan(self, req: GenerationRequest) -> RequestPlan:
        ids = self._prompt_ids(req)
        n = len(ids)
        sp = req.sampling
        max_tokens = sp.max_tokens
        if max_tokens is None:  # what the context leaves, capped by the key (as the real plan does)
            max_tokens = max(1, self.max_len - n)
            if req.max_tokens_cap is not None:
                max_tokens = min(max_tokens, req.max_tokens_cap)
        if n + max_tokens > self.max_len:
            raise ContextTooLong(f"This model's maximum context length is {self.max_len} tokens. However, you "
                                 f"requested {n + max_tokens} tokens ({n} in the prompt, "
                                 f"{max_tokens} for the completion).", param="max_tokens")
        scorers = (req.rerank.reward_model,) if req.rerank is not None and req.rerank.kind == "reward_model" else ()
        return RequestPlan(req, replace(sp, max_tokens=max_tokens), dict(req.recipe.active), (), scorers,
                           {name: ids for name in req.recipe.active}, frozenset({1}), None)

    async def generate(self, plan: RequestPlan) -> AsyncIterator:
        if self.overloaded is not None:
            raise self.overloaded
        req = plan.request
        self.requests.append(req)
        self.plans.append(plan)
        self.active.add(req.request_id)
        done = False
        try:
            async for ev in self._script(req, plan.sampling, plan.prompt_len):
                yield ev
            done = True
        finally:
            self.active.discard(req.request_id)
            if not done:
                self.cancelled.append(req.request_id)

    async def _script(self, req: GenerationRequest, sp, prompt_len: int):
        tok = self.tokenizers[req.recipe.family]
        width = max(sp.n, sp.best_of or 1)
        texts = [self.script if self.script is not None else SCRIPT + str(j) for j in range(width)]
        outs: list[list[int]] = [[] for _ in range(width)]
        finish: list[str | None] = [None] * width
        stop_reason: list[Any] = [None] * width
        fail = req.prompt.text is not None and "FAIL" in req.prompt.text
        signals = req.return_token_signals
        for pos in range(max(len(t) for t in texts) + 1):
            for j in range(width):
                if finish[j] is not None:
                    continue
                if fail and pos == 2:
                    yield RequestDone(prompt_len, pos * width, [], dict(req.recipe.weights), error="boom")
                    return
                tid = tok.index[texts[j][pos]] if pos < len(texts[j]) else tok.eos_token_id
                outs[j].append(tid)
                text = tok.decode([tid], skip_special_tokens=True)
                so_far = tok.decode(outs[j], skip_special_tokens=True)
                if tid == tok.eos_token_id:
                    finish[j] = "stop"
                elif any(s in so_far for s in sp.stop):
                    finish[j], stop_reason[j] = "stop", next(s for s in sp.stop if s in so_far)
                    text = ""  # the stop string is not released
                elif len(outs[j]) >= sp.max_tokens:
                    finish[j] = "length"
                ev = TokenEvent(index=j, token_id=tid, text=text, logprob=token_logprob(pos),
                                finish_reason=finish[j])
                if sp.logprobs:
                    ev.top_logprobs = [(tid, token_logprob(pos)), (tok.index["?"], -3.0), (0, -5.0)][: sp.logprobs]
                if signals:
                    ev.policy_logprobs = {p: -1.0 for p in req.recipe.active}
                    ev.implicit_reward, ev.kl = 0.5, 0.25
                if sp.best_of is None or sp.best_of == sp.n:
                    yield ev
                self.forwards += 1
                if self.delay:
                    await asyncio.sleep(self.delay)
                else:
                    await asyncio.sleep(0)
        order = list(range(width))
        candidates = None
        if sp.best_of and sp.best_of > sp.n:  # "score" = index: the last candidates win
            order = sorted(order, key=lambda j: -j)[: sp.n]
            candidates = [Candidate(tok.decode(outs[j], True), outs[j], float(j), finish[j]) for j in range(width)]
            for new, j in enumerate(order):
                for pos, tid in enumerate(outs[j]):
                    yield TokenEvent(index=new, token_id=tid, text=tok.decode([tid], True),
                                     logprob=token_logprob(pos), finish_reason=finish[j] if pos == len(outs[j]) - 1 else None)
        seqs = [SequenceResult(index=new, text=tok.decode(outs[j], skip_special_tokens=True).split(stop_reason[j])[0]
                               if stop_reason[j] else tok.decode(outs[j], skip_special_tokens=True),
                               token_ids=outs[j], finish_reason=finish[j], stop_reason=stop_reason[j],
                               kl_to_reference=0.25 * len(outs[j]) if signals else None,
                               implicit_reward=0.5 * len(outs[j]) if signals else None)
                for new, j in enumerate(order[: sp.n])]
        yield RequestDone(prompt_len, sum(len(o) for o in outs), seqs, dict(req.recipe.weights),
                          candidates=candidates, kl_bound=0.5 if candidates else None)

    async def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)

    def is_healthy(self) -> bool:
        return self.healthy and self.started

    def stats(self) -> dict[str, Any]:
        return {"running": len(self.active), "waiting": 0, "forwards": {"base": self.forwards}}

    async def start(self) -> None:
        self.started = True

    async def shutdown(self, deadline_s: float = 30.0) -> None:
        self.stopped = True

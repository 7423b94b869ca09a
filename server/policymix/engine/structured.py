"""Constrained decoding of the mixture (structured outputs) with xgrammar.

A request's :class:`~policymix.engine.protocol.Constraint` (a JSON schema, any JSON object, a regex, a
choice of strings or an EBNF grammar) is compiled once per request by the plan (:func:`compile_constraint`)
against its tokenizer family's vocabulary, with the request's stop tokens as the grammar's end. Each
sequence then keeps its own ``xgrammar.GrammarMatcher`` (:func:`new_matcher`): n > 1 and best-of
candidates start their own, a beam branch forks its parent's (``fork``), and a sequence's prompt variants
share its one matcher (the constraint is on the text, not on a context).

Every step, the matcher's token bitmask is applied to the sequence's row of the **mixed** scores
``sum_k w_k * l_k`` before penalties, temperature, filtering and the draw (:func:`mask_rows`), so every
sampled (or greedy) token is one the grammar allows, whatever the weights. Returned logprobs are
``log_softmax`` of the masked scores, as vLLM returns them (its bitmask is applied to the logits before
its sampler computes logprobs): a token the grammar forbids has logprob -inf. Speculative rounds mask
each verified position after the drafts before it (:func:`mask_positions`: the matcher advances through
the drafts, then rolls back); the tokens a round emits then advance it like any sampled token
(:func:`advance`). When the grammar is complete only its stop tokens are allowed, and the sequence ends
on one (finish_reason ``stop``).
"""

from __future__ import annotations

import json
import re
import threading
from typing import Any

import torch

from ..errors import PolicymixError
from .protocol import Constraint

_compilers: dict[tuple[int, int, int], Any] = {}  # (id(tokenizer), vocab, family) -> GrammarCompiler
_SOURCE = re.compile(r"^\[[0-9:]+\]\s*\S+:\d+:\s*")  # the C++ source prefix of xgrammar's messages
_lock = threading.Lock()  # plans are made on the API thread, but tests and tools may call from several


def _xgr():
    """xgrammar, imported on first use (a server that never constrains does not load it)."""
    try:
        import xgrammar
    except ImportError:  # pragma: no cover - pyproject pins it (the version vLLM 0.32 requires)
        raise PolicymixError("structured outputs need the xgrammar package (pip install xgrammar==0.2.8)",
                             param="response_format") from None
    return xgrammar


def _compiler(tokenizer, vocab_size: int, family: int):
    """The family's xgrammar compiler (its cache keeps every compiled grammar for reuse)."""
    xgr = _xgr()
    key = (id(tokenizer), vocab_size, family)
    with _lock:
        comp = _compilers.get(key)
        if comp is None:
            info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
            comp = _compilers[key] = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
        return comp


def choice_grammar(choices: list[str]) -> str:
    """An EBNF grammar whose language is exactly ``choices``."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def bounded_strings(schema: Any) -> Any:
    """``schema`` with each string's minLength / maxLength written as a pattern of plain characters.

    xgrammar 0.2.8 lets a string with a length bound hold raw control characters (U+0000-U+001F), which JSON
    forbids, so such output would not parse; a pattern of characters other than controls, ``"`` and ``\\``
    bounds the length and keeps the JSON valid (escapes are then not generated inside bounded strings)."""
    return _bounded(json.loads(schema) if isinstance(schema, str) else schema)


def _bounded(schema: Any) -> Any:
    if isinstance(schema, list):
        return [_bounded(x) for x in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _bounded(v) for k, v in schema.items()}
    if (out.get("type") == "string" and ("minLength" in out or "maxLength" in out)
            and not {"pattern", "format", "enum", "const"} & out.keys()):
        lo, hi = int(out.pop("minLength", 0)), out.pop("maxLength", None)
        out["pattern"] = "^[^\"\\\\\\x00-\\x1f]{%d,%s}$" % (lo, "" if hi is None else int(hi))
    return out


def compile_constraint(c: Constraint, tokenizer, vocab_size: int, family: int) -> Any:
    """The compiled grammar of ``c`` (an ``xgrammar.CompiledGrammar``); a bad schema, regex or grammar is a
    400 naming the field it came from."""
    comp = _compiler(tokenizer, vocab_size, family)
    ws = {"any_whitespace": c.any_whitespace}
    if not c.any_whitespace:
        ws["separators"] = (",", ":")
    try:
        if c.kind == "json":
            spec = json.dumps(bounded_strings(c.spec))
            return comp.compile_json_schema(spec, strict_mode=True, **ws)
        if c.kind == "json_object":
            return comp.compile_json_schema('{"type": "object"}', strict_mode=True, **ws)
        if c.kind == "regex":
            return comp.compile_regex(c.spec)
        if c.kind == "choice":
            return comp.compile_grammar(choice_grammar(c.spec))
        if c.kind == "grammar":
            return comp.compile_grammar(c.spec)
    except Exception as err:  # xgrammar raises RuntimeError / ValueError / InvalidJSONError with its reason
        lines = str(err).strip().splitlines()
        reason = _SOURCE.sub("", lines[0]) if lines else type(err).__name__  # without "[time] file.cc:83: "
        raise PolicymixError(f"{c.param}: xgrammar cannot compile the {c.kind.replace('_', ' ')}: {reason}",
                             param=c.param) from None
    raise PolicymixError(f"{c.param}: unknown constraint kind {c.kind!r}", param=c.param)


def check_request(req) -> None:
    """Fields that cannot be combined with a constraint (400s naming them)."""
    c, sp = req.constraint, req.sampling
    if sp.min_tokens:
        raise PolicymixError("min_tokens cannot be combined with a structured-output constraint: the grammar "
                             "decides where the output ends", param="min_tokens")
    if sp.ignore_eos:
        raise PolicymixError("ignore_eos cannot be combined with a structured-output constraint: the output ends "
                             "at the grammar's stop token", param="ignore_eos")
    if c.kind == "choice" and (not isinstance(c.spec, list) or not c.spec or
                               not all(isinstance(s, str) for s in c.spec)):
        raise PolicymixError(f"{c.param}: a choice is a non-empty list of strings", param=c.param)


def plan_grammar(registry, req, eos_ids: frozenset[int]) -> tuple[Any, list[int]]:
    """``RequestPlan.grammar`` of a constrained request: its compiled grammar and stop tokens (raises naming the
    field)."""
    check_request(req)
    policy = registry.policies[req.recipe.policy_of(next(iter(req.recipe.active)))]
    stops = stop_tokens(eos_ids, req.sampling.stop_token_ids)
    if not stops:
        raise PolicymixError(f"{req.constraint.param}: the mixture's policies have no EOS token, and a grammar ends "
                             "on a stop token: set stop_token_ids", param=req.constraint.param)
    compiled = compile_constraint(req.constraint, policy.tokenizer, policy.vocab_size, policy.family)
    return compiled, stops


def stop_tokens(plan_eos: frozenset[int], stop_token_ids: list[int]) -> list[int]:
    """The grammar's end: the recipe's EOS ids and the request's stop ids (vLLM's ``all_stop_token_ids``)."""
    return sorted(set(plan_eos) | set(stop_token_ids))


def new_matcher(grammar) -> Any:
    """A fresh matcher of a request's compiled grammar (``grammar``: ``RequestPlan.grammar``)."""
    compiled, stops = grammar
    return _xgr().GrammarMatcher(compiled, override_stop_tokens=stops)


_SHIFTS: dict[Any, torch.Tensor] = {}  # device -> arange(32) (int32): a word's bits


def _bits(words: torch.Tensor) -> torch.Tensor:
    """[..., 32] bools: bit t of each int32 word (token 32 * word + t allowed)."""
    shifts = _SHIFTS.get(words.device)
    if shifts is None:
        shifts = _SHIFTS[words.device] = torch.arange(32, dtype=torch.int32, device=words.device)
    return ((words[..., None] >> shifts) & 1).bool()


def _apply(x: torch.Tensor, bitmask: torch.Tensor, rows: list[int]) -> None:
    """Set ``x[r, t] = -inf`` where bit t of ``bitmask[r]`` is 0, for every r in ``rows`` (in place).

    Most of a grammar's 32-token words are all 0 or all 1: the all-0 ones are masked by adding a per-block
    -inf / 0 (one broadcast add, vectorised; a boolean-index write is ten times slower on CPU), and only the
    few mixed words are expanded bit by bit."""
    R, V = len(rows), x.shape[1]
    W = V // 32
    every = rows == list(range(x.shape[0]))
    idx = None if every else torch.tensor(rows, dtype=torch.long, device=x.device)
    bits = bitmask[: x.shape[0]] if every else bitmask.index_select(0, idx.cpu())
    bits = bits.to(x.device)  # [R, ceil(V / 32)] int32
    sub = x if every else x.index_select(0, idx)
    if W:
        blocks = sub[:, : W * 32].view(R, W, 32)
        words = bits[:, :W]
        add = torch.zeros(R, W, dtype=x.dtype, device=x.device).masked_fill_(words == 0, float("-inf"))
        blocks.add_(add[:, :, None])  # -inf + s = -inf; 0 + s = s exactly
        mixed_words = (words != 0) & (words != -1)  # (-1: all 32 bits set)
        if mixed_words.any():
            r, w = mixed_words.nonzero(as_tuple=True)
            blocks[r, w] = blocks[r, w].masked_fill(~_bits(words[r, w]), float("-inf"))
    if V > W * 32:  # the vocabulary's last, partial word
        sub[:, W * 32:] = sub[:, W * 32:].masked_fill(~_bits(bits[:, W])[:, : V - W * 32], float("-inf"))
    if not every:
        x[idx] = sub


def mask_rows(mixed: torch.Tensor, rows: list[tuple[int, Any]]) -> None:
    """Apply each ``(row, matcher)``'s next-token bitmask to ``mixed`` [S, V] in place."""
    bitmask = _xgr().allocate_token_bitmask(mixed.shape[0], mixed.shape[1])
    for row, matcher in rows:
        matcher.fill_next_token_bitmask(bitmask, row)
    _apply(mixed, bitmask, [r for r, _ in rows])


def mask_positions(mixed: torch.Tensor, matcher, drafts: list[int]) -> None:
    """A speculative round's verified positions ``mixed`` [k + 1, V], position j masked as the grammar stands
    after ``drafts[:j]`` (in place). The matcher advances through the drafts and rolls back: it is left as it
    was. Positions after a draft that the grammar refuses keep their scores: that draft is masked out at its
    own position, so it is rejected there and nothing after it is used."""
    bitmask = _xgr().allocate_token_bitmask(mixed.shape[0], mixed.shape[1])
    accepted, filled = 0, []
    for j in range(len(drafts) + 1):
        if matcher.is_terminated():
            break
        matcher.fill_next_token_bitmask(bitmask, j)
        filled.append(j)
        if j == len(drafts) or not matcher.accept_token(drafts[j]):
            break
        accepted += 1
    if accepted:
        matcher.rollback(accepted)
    _apply(mixed, bitmask, filled)


def advance(matcher, token: int) -> bool:
    """Feed a sequence's recorded token to its matcher; False if the grammar refuses it (a bug)."""
    return matcher.is_terminated() or matcher.accept_token(token)

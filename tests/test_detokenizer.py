"""Incremental detokenization: whole UTF-8 characters only, leading spaces kept, stop strings held back."""

from __future__ import annotations

from policymix.engine.detokenizer import IncrementalDetokenizer


def stream(tok, text, stop=(), include=False, prompt="Say:"):
    ids = tok(text, add_special_tokens=False).input_ids
    d = IncrementalDetokenizer(tok, tok(prompt).input_ids, list(stop), include)
    pieces = []
    for i, t in enumerate(ids):
        stopped = d.add(t)
        pieces.append(d.release(final=stopped or i == len(ids) - 1))
        if stopped:
            break
    return pieces, d


def test_deltas_join_to_the_text_and_never_split_a_character(tiny_registry):
    tok = tiny_registry.policies["base"].tokenizer
    text = " café 東京 🙂 naïve… done"
    pieces, d = stream(tok, text)
    assert "".join(pieces) == text == d.text  # leading space kept
    assert all("\ufffd" not in p for p in pieces)
    assert len([p for p in pieces if p]) > 3


def test_stop_string_across_tokens_is_held_back(tiny_registry):
    tok = tiny_registry.policies["base"].tokenizer
    pieces, d = stream(tok, "The quick brown fox jumps over the lazy dog", stop=["fox jumps"])
    assert d.stop_reason == "fox jumps"
    assert "".join(pieces) == "The quick brown "
    assert all("fox" not in p for p in pieces)
    pieces, d = stream(tok, "The quick brown fox jumps over the lazy dog", stop=["fox jumps"], include=True)
    assert "".join(pieces) == "The quick brown fox jumps"


def test_a_near_miss_is_released_later(tiny_registry):
    tok = tiny_registry.policies["base"].tokenizer
    pieces, d = stream(tok, "The fox ran and the fox jumps", stop=["fox jumps"])
    assert "".join(pieces) == "The fox ran and the "
    assert d.stop_reason == "fox jumps"

"""Incremental detokenization and stop strings.

Text is released token by token without ever emitting half a UTF-8 character (a trailing U+FFFD
means the bytes are incomplete) and keeping the leading space of the completion (decoding starts
from a few prompt tokens of context, as vLLM does, because SentencePiece tokenizers drop a leading
space at the start of a decode). A stop string is found anywhere in the new text; text that may be
the beginning of a stop string is held back until it is known not to be one.
"""

from __future__ import annotations

import copy

_CONTEXT_TOKENS = 6


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: list[str], include_stop: bool,
                 skip_special_tokens: bool = True):
        self.tok = tokenizer
        self.skip = skip_special_tokens
        # a fast tokenizer's Rust backend gives decode()'s text when no clean-up is asked for, without
        # transformers' per-call wrapping (two decodes per token: this is most of the per-token cost)
        self._backend = getattr(tokenizer, "backend_tokenizer", None)
        self.ids: list[int] = list(prompt_ids[-_CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.text = ""  # decoded output so far (cut at a stop string once found)
        self.emitted = 0  # characters of ``text`` already released
        self.stop = [s for s in stop if s]
        self.include_stop = include_stop
        self.stop_reason: str | None = None
        self._max_stop = max((len(s) for s in self.stop), default=0)

    def clone(self) -> "IncrementalDetokenizer":
        """An independent copy (a beam-search branch continues from here)."""
        new = copy.copy(self)
        new.ids = list(self.ids)
        return new

    def _decode(self, ids: list[int]) -> str:
        if self._backend is not None:
            return self._backend.decode(ids, skip_special_tokens=self.skip)
        return self.tok.decode(ids, skip_special_tokens=self.skip, clean_up_tokenization_spaces=False)

    def add(self, token_id: int) -> bool:
        """Append a token; returns True when a stop string was found."""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) <= len(prefix) or full.endswith("\ufffd"):
            return False  # incomplete UTF-8 or nothing visible yet: wait for more tokens
        start = len(self.text)
        self.text += full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        if not self.stop:
            return False
        scan_from = max(0, start - self._max_stop + 1)
        found = [(i, s) for s in self.stop if (i := self.text.find(s, scan_from)) >= 0]
        if not found:
            return False
        i, s = min(found)
        self.text = self.text[: i + len(s)] if self.include_stop else self.text[:i]
        self.stop_reason = s
        return True

    def release(self, final: bool) -> str:
        """Text that can be sent now; at ``final`` everything left."""
        end = len(self.text)
        if not final and self.stop:
            end -= self._held_back()
        end = max(end, self.emitted)
        out = self.text[self.emitted:end]
        self.emitted = end
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of the text that is a proper prefix of a stop string."""
        for n in range(min(self._max_stop - 1, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0


def finish_reason(tok: int, n_generated: int, eos_ids: set[int], sp, detok: IncrementalDetokenizer
                  ) -> tuple[str | None, str | int | None]:
    """(finish_reason, stop_reason) after the ``n_generated``-th token ``tok`` (both engines' rules):
    EOS unless ignore_eos, a stop token id, a stop string found in the new text, max_tokens."""
    if tok in eos_ids and not sp.ignore_eos:
        return "stop", None
    if tok in sp.stop_token_ids:
        return "stop", tok
    if detok.add(tok):
        return "stop", detok.stop_reason
    if n_generated >= sp.max_tokens:
        return "length", None
    return None, None

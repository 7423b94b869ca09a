"""Sampler kernels checked against torch's own results."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from policymix.engine.sampler import argmax_rows


@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 9), vocab=st.integers(1, 2000), levels=st.integers(1, 6), seed=st.integers(0, 2**31 - 1))
def test_argmax_rows_equals_torch_argmax_ties_included(rows, vocab, levels, seed):
    """Few distinct values make ties common (the first index must win, as in torch.argmax), and vocab
    sizes that are not a multiple of the block size exercise the tail."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, levels, (rows, vocab), generator=gen).float() - 3.0
    if vocab > 1:
        x[0, -1] = x.max() + 1.0  # a maximum in the tail
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist()


def test_argmax_rows_on_a_padded_vocab_view():
    """The engine passes ``logits[:, -1, :V]``: a strided view of a wider lm_head output."""
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(5, 1, 1030, generator=gen)
    x = wide[:, -1, :1000]
    x[2, 999] = 50.0  # the row's max in the tail
    x[3, 0] = x[3, 768] = 60.0  # a tie across blocks
    assert argmax_rows(x).tolist() == x.argmax(-1).tolist()

"""Token-level signals of a mixture against a reference (both engines compute them here)."""

from __future__ import annotations

import torch


def kl_to_reference(logq: torch.Tensor, logp_ref: torch.Tensor) -> torch.Tensor:
    """``KL(q || pi_ref) = sum_v q(v) (log q(v) - log pi_ref(v))`` over the last dimension (>= 0)."""
    return (logq.exp() * (logq - logp_ref)).sum(-1).clamp_min(0.0)

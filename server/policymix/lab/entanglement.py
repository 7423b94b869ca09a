"""Gradient entanglement in DPO (arXiv 2410.13828): per-pair diagnostics, predicted vs measured.

For one pair (x, y_w, y_l), write g_w = grad log pi(y_w|x), g_l = grad log pi(y_l|x) and
c = lr * beta * sigmoid(-beta * margin), margin = log pi/pi_ref (y_w) - log pi/pi_ref (y_l).
A gradient step on that pair alone moves the parameters by c (g_w - g_l), so to first order

    d log pi(y_w) = c (|g_w|^2 - <g_w, g_l>)        d log pi(y_l) = c (<g_w, g_l> - |g_l|^2)

The chosen change depends on the rejected gradient and vice versa ("entanglement"): unless
<g_w, g_l> <= min(|g_w|^2, |g_l|^2), both log-probabilities go up or both go down. The pairwise
normalized gradient, c (g_w/|g_w| - g_l/|g_l|), always gives the ideal case to first order:
d log pi(y_w) = c |g_w| (1 - cos) >= 0 and d log pi(y_l) = -c |g_l| (1 - cos) <= 0.

The optimizer's real step is neither (a batch mean, Adam's scaling, clipping), so besides this
"pair-alone" prediction each row also carries the first-order prediction for the step actually
taken, <theta_after - theta_before, g>, and the change measured by re-scoring after the step.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import torch

EPS = 1e-12  # guards a zero gradient norm (e.g. a LoRA B matrix at init sees no gradient on A)

# Columns of the diagnostics CSV, in order. pred_* : pair-alone first order; step_* : first order for
# the optimizer's actual step; meas_* : measured by re-scoring after the step.
COLUMNS = [
    "step", "pair", "lr", "beta", "normalized", "logp_w", "logp_l", "margin", "norm_w", "norm_l",
    "inner", "cos", "c", "pred_dw", "pred_dl", "case_pred", "step_dw", "step_dl", "meas_dw", "meas_dl",
    "case_meas",
]
CASES = ("ideal", "both_up", "both_down", "inverted")


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def flatten(tensors: list[torch.Tensor | None], like: list[torch.nn.Parameter]) -> torch.Tensor:
    """One float32 vector [P] from per-parameter tensors (None -> zeros, as autograd returns for unused ones)."""
    return torch.cat([
        (t if t is not None else torch.zeros_like(p)).detach().reshape(-1).float() for t, p in zip(tensors, like)
    ])


def unflatten(vector: torch.Tensor, like: list[torch.nn.Parameter]) -> list[torch.Tensor]:
    """Split a flat [P] vector back into tensors shaped (and typed) like ``like``."""
    out, offset = [], 0
    for p in like:
        n = p.numel()
        out.append(vector[offset:offset + n].view_as(p).to(p.dtype))
        offset += n
    return out


def _rows(input_ids, attention_mask, completion_mask):
    """Each sequence without its padding: (ids [L], completion [L]) in batch order."""
    for ids, att, comp in zip(input_ids, attention_mask, completion_mask):
        keep = att.bool()
        yield ids[keep], comp[keep]


def _sequence_logp(model, ids: torch.Tensor, completion: torch.Tensor) -> torch.Tensor:
    """log pi(y|x): the sum of the completion tokens' log-probabilities of one unpadded sequence (scalar)."""
    logits = model(input_ids=ids[None]).logits[0, :-1].float()  # [L-1, V]: position t predicts token t+1
    token_logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[1:, None])[:, 0]  # [L-1]
    return (token_logp * completion[1:].to(token_logp.dtype)).sum()


@torch.no_grad()
def sequence_logps(model, input_ids, attention_mask, completion_mask) -> torch.Tensor:
    """log pi(y|x) per sequence [N], scored one sequence at a time (no padding in any forward)."""
    return torch.stack([_sequence_logp(model, i, c) for i, c in _rows(input_ids, attention_mask, completion_mask)])


def sequence_grads(model, params, input_ids, attention_mask, completion_mask) -> tuple[torch.Tensor, torch.Tensor]:
    """log pi(y|x) [N] and its gradient w.r.t. ``params`` per sequence [N, P] (one backward each)."""
    logps, grads = [], []
    with torch.enable_grad():
        for ids, comp in _rows(input_ids, attention_mask, completion_mask):
            logp = _sequence_logp(model, ids, comp)
            grads.append(flatten(list(torch.autograd.grad(logp, params, allow_unused=True)), params))
            logps.append(logp.detach())
    return torch.stack(logps), torch.stack(grads)


@dataclass
class Probe:
    """One batch of B pairs before the step: rows [0, B) are chosen, [B, 2B) rejected (TRL's layout)."""

    logp: torch.Tensor  # [2B] log pi(y|x) under the current policy
    ref_logp: torch.Tensor  # [2B] log pi_ref(y|x)
    grads: torch.Tensor  # [2B, P] grad log pi(y|x) w.r.t. the trainable parameters
    beta: float

    @property
    def pairs(self) -> int:
        return self.logp.shape[0] // 2

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return t[: self.pairs], t[self.pairs:]

    def margins(self) -> torch.Tensor:
        """[B] implicit-reward margin / beta: log-ratio of the chosen minus that of the rejected."""
        ratio_w, ratio_l = self.split(self.logp - self.ref_logp)
        return ratio_w - ratio_l

    def loss(self) -> torch.Tensor:
        """The mean DPO (sigmoid) loss of the batch, a 0-dim tensor."""
        return -torch.nn.functional.logsigmoid(self.beta * self.margins()).mean()

    def pair_weights(self) -> torch.Tensor:
        """[B] beta * sigmoid(-beta * margin): the factor of (g_w - g_l) in minus pair i's loss gradient."""
        return self.beta * torch.sigmoid(-self.beta * self.margins())


def pair_geometry(probe: Probe) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per pair [B]: |g_w|, |g_l| and <g_w, g_l>."""
    g_w, g_l = probe.split(probe.grads)
    return g_w.norm(dim=1), g_l.norm(dim=1), (g_w * g_l).sum(dim=1)


def predicted_changes(norm_w, norm_l, inner, c, normalized: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """First-order changes of log pi(y_w), log pi(y_l) after a step on the pair alone (see module doc)."""
    if normalized:
        return c * (norm_w - inner / (norm_l + EPS)), c * (inner / (norm_w + EPS) - norm_l)
    return c * (norm_w**2 - inner), c * (inner - norm_l**2)


def dpo_gradient(probe: Probe, normalized: bool) -> torch.Tensor:
    """Gradient [P] of the batch's mean DPO loss, or its pairwise-normalized version (the paper's fix)."""
    g_w, g_l = probe.split(probe.grads)
    if normalized:
        g_w = g_w / (g_w.norm(dim=1, keepdim=True) + EPS)
        g_l = g_l / (g_l.norm(dim=1, keepdim=True) + EPS)
    return -(probe.pair_weights()[:, None] * (g_w - g_l)).mean(dim=0)


def classify(dw: float, dl: float) -> str:
    """Which way the two log-probabilities move: ideal (w up, l down), both up, both down, or inverted."""
    if dw >= 0 and dl <= 0:
        return "ideal"
    if dw >= 0:
        return "both_up"
    if dl <= 0:
        return "both_down"
    return "inverted"  # w down, l up: only possible beyond a single pair's first-order step


def probe_rows(step: int, probe: Probe, lr: float, normalized: bool) -> list[dict]:
    """The before-step part of each pair's CSV row (step_*, meas_* filled in by :func:`complete_rows`)."""
    norm_w, norm_l, inner = pair_geometry(probe)
    c = lr * probe.pair_weights()
    pred_w, pred_l = predicted_changes(norm_w, norm_l, inner, c, normalized)
    logp_w, logp_l = probe.split(probe.logp)
    margins = probe.margins()
    rows = []
    for i in range(probe.pairs):
        cos = float(inner[i] / (norm_w[i] * norm_l[i] + EPS))
        rows.append({
            "step": step, "pair": i, "lr": lr, "beta": probe.beta, "normalized": int(normalized),
            "logp_w": float(logp_w[i]), "logp_l": float(logp_l[i]), "margin": float(margins[i]),
            "norm_w": float(norm_w[i]), "norm_l": float(norm_l[i]), "inner": float(inner[i]), "cos": cos,
            "c": float(c[i]), "pred_dw": float(pred_w[i]), "pred_dl": float(pred_l[i]),
            "case_pred": classify(float(pred_w[i]), float(pred_l[i])),
        })
    return rows


def complete_rows(rows: list[dict], probe: Probe, delta_theta: torch.Tensor, logp_after: torch.Tensor) -> None:
    """Add the actual step's first-order prediction <delta_theta, g> and the measured change, in place."""
    step_pred = probe.grads @ delta_theta.float()  # [2B]
    measured = logp_after - probe.logp  # [2B]
    step_w, step_l = probe.split(step_pred)
    meas_w, meas_l = probe.split(measured)
    for i, row in enumerate(rows):
        row.update(step_dw=float(step_w[i]), step_dl=float(step_l[i]), meas_dw=float(meas_w[i]),
                   meas_dl=float(meas_l[i]), case_meas=classify(float(meas_w[i]), float(meas_l[i])))


class DiagnosticsCsv:
    """Append-only CSV of per-pair rows; on resume, rows past the checkpoint's step are dropped."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def reset(self, keep_through_step: int | None = None) -> None:
        """Start fresh (None) or keep only the rows of steps <= ``keep_through_step``."""
        rows = [r for r in self.read() if int(r["step"]) <= keep_through_step] if keep_through_step else []
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    def append(self, rows: list[dict]) -> None:
        if not self.path.is_file():
            self.reset()
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=COLUMNS).writerows(rows)

    def read(self) -> list[dict]:
        if not self.path.is_file():
            return []
        with self.path.open(newline="") as f:
            return list(csv.DictReader(f))


def summarize(rows: list[dict]) -> dict:
    """Fractions of each case (pair-alone prediction and measured), mean cosine, first-order agreement."""
    done = [r for r in rows if r.get("case_meas") not in (None, "")]
    if not done:
        return {"pairs": 0}

    def frac(key: str, case: str) -> float:
        return round(sum(r[key] == case for r in done) / len(done), 4)

    errors = []  # relative error of the actual step's first-order prediction
    for r in done:
        for pred, meas in (("step_dw", "meas_dw"), ("step_dl", "meas_dl")):
            m = float(r[meas])
            if abs(m) > 1e-6:
                errors.append(abs(float(r[pred]) - m) / abs(m))
    errors.sort()
    return {
        "pairs": len(done),
        "steps": len({int(r["step"]) for r in done}),
        "predicted_pair_alone": {case: frac("case_pred", case) for case in CASES},
        "measured": {case: frac("case_meas", case) for case in CASES},
        "mean_cos": round(sum(float(r["cos"]) for r in done) / len(done), 4),
        "median_first_order_rel_error": round(errors[len(errors) // 2], 4) if errors else math.nan,
    }

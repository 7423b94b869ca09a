"""The entanglement diagnostics CSV as one PNG (matplotlib, headless)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .entanglement import CASES, DiagnosticsCsv

_COLORS = {"ideal": "tab:green", "both_up": "tab:orange", "both_down": "tab:blue", "inverted": "tab:red"}


def plot_entanglement(csv_path: str | Path, png_path: str | Path, title: str = "") -> Path:
    """Four panels over training: cumulative measured change of log pi(y_w) and log pi(y_l); the share of
    each case per step; first-order prediction of the actual step vs measured change; cos(g_w, g_l)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in DiagnosticsCsv(csv_path).read() if r.get("case_meas")]
    by_step: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_step[int(r["step"])].append(r)
    steps = sorted(by_step)

    def mean(step: int, key: str) -> float:
        return sum(float(r[key]) for r in by_step[step]) / len(by_step[step])

    fig, ax = plt.subplots(2, 2, figsize=(11, 8))
    for key, label, color in (("meas_dw", "chosen  log pi(y_w)", "tab:green"),
                              ("meas_dl", "rejected log pi(y_l)", "tab:red")):
        total, ys = 0.0, [0.0]  # starts at 0 before the first logged step
        for s in steps:
            total += mean(s, key)
            ys.append(total)
        ax[0, 0].plot([steps[0] - 1, *steps] if steps else [0], ys, label=label, color=color, marker=".")
    ax[0, 0].axhline(0, color="grey", lw=0.5)
    ax[0, 0].set(title="cumulative mean measured change (logged pairs)", xlabel="step", ylabel="sum of d log pi")
    ax[0, 0].legend()

    bottom = [0.0] * len(steps)
    for case in CASES:
        share = [sum(r["case_meas"] == case for r in by_step[s]) / len(by_step[s]) for s in steps]
        ax[0, 1].bar(steps, share, bottom=bottom, color=_COLORS[case], label=case, width=0.9)
        bottom = [b + v for b, v in zip(bottom, share)]
    ax[0, 1].set(title="measured case per step", xlabel="step", ylabel="share of pairs", ylim=(0, 1))
    ax[0, 1].legend(fontsize=8)

    for pred, meas, label, color in (("step_dw", "meas_dw", "chosen", "tab:green"),
                                     ("step_dl", "meas_dl", "rejected", "tab:red")):
        ax[1, 0].scatter([float(r[pred]) for r in rows], [float(r[meas]) for r in rows], s=8, label=label,
                         color=color, alpha=0.6)
    values = [float(r[k]) for r in rows for k in ("step_dw", "meas_dw", "step_dl", "meas_dl")] or [0.0]
    lo, hi = min(values), max(values)
    ax[1, 0].plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
    ax[1, 0].set(title="first order <d theta, g> vs measured", xlabel="predicted d log pi", ylabel="measured")
    ax[1, 0].legend()

    ax[1, 1].scatter([int(r["step"]) for r in rows], [float(r["cos"]) for r in rows], s=8, color="tab:purple")
    ax[1, 1].axhline(0, color="grey", lw=0.5)
    ax[1, 1].set(title="cos(grad log pi(y_w), grad log pi(y_l))", xlabel="step", ylabel="cosine")

    fig.suptitle(title or Path(csv_path).parent.name)
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=100)
    plt.close(fig)
    return png_path

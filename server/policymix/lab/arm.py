"""``policymix train arm``: an autoregressive reward model (GenARM) on a base model, LoRA (PEFT) by default.

The loss is the reference-free Bradley-Terry loss over summed token log-probabilities
(``arm_trainer``); everything else is ``policymix train dpo``'s: the pairs format, the options, the
checkpoints, the entanglement diagnostics (against a zero reference) and the plot. The output folder
is a policy the server loads as an adapter of its base, with ``policymix.json`` saying ``kind: arm``
and the ``beta`` it was trained with. Serve it with the ``mixture.arm`` recipe: ``{base: 1, arm: w / beta}``.
"""

from __future__ import annotations

import sys

from . import dpo


def build_parser():
    return dpo.build_parser(
        prog="policymix train arm", description=__doc__.splitlines()[0],
        beta_help="beta_r of the Bradley-Terry loss -log sigmoid(beta_r * (r(y_w) - r(y_l))), recorded as `beta`")


def main(argv: list[str]) -> int:
    """Entry point of ``policymix train arm``; returns the process exit code."""
    return dpo.main(argv, kind="arm", parser=build_parser())


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

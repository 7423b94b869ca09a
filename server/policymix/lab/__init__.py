"""The alignment lab: DPO policies and autoregressive reward models to mix, with gradient-entanglement diagnostics.

Modules (one concept each):
- ``pairs``: read and validate a preference-pairs JSONL file before any training starts.
- ``base``: resolve a base model spec (HF folder, ``.gguf`` file, ``embedded``) to a loadable folder.
- ``entanglement``: per-pair gradients of log pi(y_w|x) and log pi(y_l|x), their norms and inner product,
  first-order predicted vs measured log-probability changes, the three cases of arXiv 2410.13828.
- ``trainer``: TRL's ``DPOTrainer`` with the diagnostics hooked in and the pairwise normalized gradient.
- ``plots``: the diagnostics as a PNG.
- ``synth``: the rule-based synthetic preference sets shipped in ``data/prefs``.
- ``dpo``: the ``policymix train dpo`` command (``main(argv)``).
- ``arm_trainer``: the reference-free Bradley-Terry loss of an autoregressive reward model (GenARM).
- ``arm``: the ``policymix train arm`` command (``dpo``'s options, data and diagnostics, that loss).

The lab needs the ``lab`` extra (peft, trl, matplotlib); nothing in the server imports it.
"""

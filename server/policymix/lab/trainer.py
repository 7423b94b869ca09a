"""TRL's DPOTrainer with two hooks: entanglement diagnostics and the pairwise normalized gradient.

Diagnostics (every ``diag_every`` steps): before the step, score each sequence of the batch alone and
take its gradient (``entanglement.sequence_grads``); after the optimizer step (``on_optimizer_step``),
re-score them and record predicted vs measured changes. The standard update is TRL's own loss and
backward, untouched.

Normalized gradient: the loss returned to the Trainer is a linear surrogate
``loss_value + <theta, d> - <theta, d>.detach()`` whose gradient is exactly the pairwise normalized
direction ``d`` and whose value is the DPO loss, so the Trainer's backward, clipping, optimizer,
scheduler and checkpoints all work unchanged. Only the sigmoid (DPO) loss is supported.
"""

from __future__ import annotations

import torch
from transformers import TrainerCallback
from trl import DPOTrainer

from .entanglement import (
    DiagnosticsCsv, Probe, complete_rows, dpo_gradient, flatten, probe_rows, sequence_grads, sequence_logps,
    trainable_parameters, unflatten,
)


class EntangledDPOTrainer(DPOTrainer):
    def __init__(self, *args, normalized_gradient: bool = False, diag_every: int = 1,
                 diag_csv: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        if list(self.loss_types) != ["sigmoid"] or self.ld_alpha is not None or self.f_divergence_type != "reverse_kl":
            raise ValueError("the entanglement lab supports the standard DPO loss only (loss_type='sigmoid')")
        if self.args.gradient_accumulation_steps != 1 and (diag_csv or normalized_gradient):
            raise ValueError("diagnostics and the normalized gradient need gradient_accumulation_steps=1")
        self.normalized_gradient = normalized_gradient
        self.diag_every = diag_every
        self.diag_log = DiagnosticsCsv(diag_csv) if diag_csv and diag_every > 0 else None
        self._diag_probe: Probe | None = None  # the normalized step's probe, reused by the diagnostics
        self._diag_pending: tuple | None = None  # (step, probe, theta before [P], lr, inputs) until the step is taken
        self.add_callback(_MeasureAfterStep(self))

    # -- probing ---------------------------------------------------------------------------------

    def _reference_logps(self, inputs) -> torch.Tensor:
        """log pi_ref(y|x) per sequence [2B], the way TRL gets its reference (adapter off, or ref_model)."""
        if "ref_chosen_logps" in inputs:
            return torch.cat([inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]]).float()
        seqs = (inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        model = self.accelerator.unwrap_model(self.model)
        if self.ref_model is None and hasattr(model, "disable_adapter"):
            with model.disable_adapter():
                return sequence_logps(model, *seqs)
        return sequence_logps(self.ref_model, *seqs)

    def probe(self, model, inputs) -> Probe:
        """Per-sequence log-probs and gradients of the batch, with the reference log-probs."""
        params = trainable_parameters(model)
        logp, grads = sequence_grads(model, params, inputs["input_ids"], inputs["attention_mask"],
                                     inputs["completion_mask"])
        return Probe(logp=logp, ref_logp=self._reference_logps(inputs).to(logp.device), grads=grads, beta=self.beta)

    # -- the two hooks ---------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.normalized_gradient and model.training):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        probe = self.probe(model, inputs)
        self._diag_probe = probe
        params = trainable_parameters(model)
        direction = unflatten(dpo_gradient(probe, normalized=True), params)
        surrogate = sum((p * d).sum() for p, d in zip(params, direction))  # d surrogate / d p == d exactly
        self._record_metrics(probe)
        loss = probe.loss().to(surrogate.device) + surrogate - surrogate.detach()
        return (loss, {}) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None):
        step = self.state.global_step + 1  # the number the Trainer logs this step under
        diagnose = self.diag_log is not None and (step - 1) % self.diag_every == 0
        probe = None
        if diagnose and not self.normalized_gradient:
            model.train()
            probe = self.probe(model, self._prepare_inputs(inputs))
        params = trainable_parameters(model)
        theta_before = flatten(list(params), params) if diagnose else None  # [P], a copy (torch.cat)
        lr = self._get_learning_rate()
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.normalized_gradient:
            probe, self._diag_probe = self._diag_probe, None
        if diagnose:
            self._diag_pending = (step, probe, theta_before, lr, self._prepare_inputs(inputs))
        return loss

    # -- after the optimizer step ----------------------------------------------------------------

    def finish_diagnostics(self) -> None:
        if self._diag_pending is None:
            return
        step, probe, theta_before, lr, inputs = self._diag_pending
        self._diag_pending = None
        params = trainable_parameters(self.model)
        delta = flatten(list(params), params) - theta_before  # [P] the step actually taken
        after = sequence_logps(self.model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        rows = probe_rows(step, probe, lr, self.normalized_gradient)
        complete_rows(rows, probe, delta, after)
        self.diag_log.append(rows)
        ideal = sum(r["case_meas"] == "ideal" for r in rows) / len(rows)
        self._metrics["train"]["entanglement/ideal_measured"].append(ideal)

    def _record_metrics(self, probe: Probe) -> None:
        """The metrics TRL logs for its own loss, for the normalized path (which bypasses TRL's loss)."""
        margins = probe.beta * probe.margins()
        logp_w, logp_l = probe.split(probe.logp)
        metrics = self._metrics["train"]
        metrics["rewards/margins"].append(float(margins.mean()))
        metrics["rewards/accuracies"].append(float((margins > 0).float().mean()))
        metrics["logps/chosen"].append(float(logp_w.mean()))
        metrics["logps/rejected"].append(float(logp_l.mean()))


class _MeasureAfterStep(TrainerCallback):
    """Runs the after-step half of the diagnostics right after ``optimizer.step()``."""

    def __init__(self, trainer: EntangledDPOTrainer):
        self.trainer = trainer

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.trainer.finish_diagnostics()

"""The autoregressive reward model's loss (GenARM) and a trainer for it, with the DPO trainer's diagnostics.

An ARM ``pi_r`` is a language model whose summed token log-probabilities are the reward,
``r(x, y) = sum_t log pi_r(y_t | x, y_<t)``, trained on preference pairs with the Bradley-Terry loss

    loss = -log sigmoid(beta_r * (r(x, y_w) - r(x, y_l)))        (mean over the batch's pairs)

which is DPO's sigmoid loss with the reference log-probabilities set to zero. TRL 1.16's
``DPOTrainer`` has no reference-free mode (the ``reference_free`` option of older TRL is gone): its
sigmoid loss always subtracts a reference's summed log-probabilities. So the loss is written here,
on the batch TRL's data collator makes (``[chosen; rejected]`` rows, right-padded, with a completion
mask), and the reference of the diagnostics is zero: ``Probe.margins`` is then ``r(y_w) - r(y_l)``
and the entanglement formulas, the pairwise normalized gradient and the CSV hold unchanged.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .trainer import EntangledDPOTrainer


def summed_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 completion_mask: torch.Tensor) -> torch.Tensor:
    """sum_t log pi(y_t | x, y_<t) over each row's completion tokens [N], in one batched forward.

    Rows are right-padded (TRL's collator), so every real token sits at its own position.
    """
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1].float()
    # logits: [N, L-1, V], position t predicts token t+1
    token_logp = logits.gather(-1, input_ids[:, 1:, None])[..., 0] - torch.logsumexp(logits, dim=-1)  # [N, L-1]
    return (token_logp * completion_mask[:, 1:].to(token_logp.dtype)).sum(dim=1)


def arm_loss(logp_chosen: torch.Tensor, logp_rejected: torch.Tensor, beta: float) -> torch.Tensor:
    """The mean Bradley-Terry loss of summed log-probabilities [B] (no reference), a 0-dim tensor."""
    return -F.logsigmoid(beta * (logp_chosen - logp_rejected)).mean()


class ARMTrainer(EntangledDPOTrainer):
    """TRL's Trainer loop, data pipeline and checkpoints; the reference-free loss above instead of DPO's."""

    def _reference_logps(self, inputs) -> torch.Tensor:
        """An ARM has no reference: zeros [2B], so the diagnostics' log-ratios are the log-probabilities."""
        return torch.zeros(inputs["input_ids"].shape[0])

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.normalized_gradient and model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # the probe's loss
        logps = summed_logps(model, inputs["input_ids"], inputs["attention_mask"], inputs["completion_mask"])
        logp_w, logp_l = logps.chunk(2)  # the collator's layout: [chosen; rejected]
        loss = arm_loss(logp_w, logp_l, self.beta)
        mode = "train" if model.training else "eval"
        margins = self.beta * (logp_w - logp_l).detach()
        metrics = self._metrics[mode]
        metrics["rewards/margins"].append(float(margins.mean()))
        metrics["rewards/accuracies"].append(float((margins > 0).float().mean()))
        metrics["logps/chosen"].append(float(logp_w.detach().mean()))
        metrics["logps/rejected"].append(float(logp_l.detach().mean()))
        return (loss, {}) if return_outputs else loss

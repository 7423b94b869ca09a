"""Best-of-n scoring: mean log-probability, the implicit DPO reward, or a reward model; and soft selection."""

from __future__ import annotations

import math
import random

import torch

from .registry import render_chat


def kl_bound(n: int) -> float:
    """Upper bound on KL(best-of-n || policy): log n - (n - 1) / n."""
    return math.log(n) - (n - 1) / n


def soft_probabilities(scores: list[float], temperature: float) -> list[float]:
    """Soft best-of-n: each candidate's selection probability, proportional to exp(score / temperature)."""
    top = max(scores)
    w = [math.exp((s - top) / temperature) for s in scores]
    total = sum(w)
    return [x / total for x in w]


def soft_choose(probabilities: list[float], n: int, rng: random.Random) -> list[int]:
    """``n`` distinct indices drawn one after another, each with probability proportional to its weight
    among those left (n = 1: exactly ``probabilities``)."""
    left = dict(enumerate(probabilities))
    chosen = []
    for _ in range(min(n, len(left))):
        u, acc = rng.random() * sum(left.values()), 0.0
        pick = next(iter(left))
        for i, p in left.items():
            acc += p
            pick = i
            if u < acc:
                break
        chosen.append(pick)
        del left[pick]
    return chosen


@torch.inference_mode()
def reward_model_scores(policy, prompt, completions: list[str]) -> list[float]:
    """Score (prompt, completion) pairs with a sequence-classification reward model, in one batch.

    Chat prompts go through the reward model's own chat template with the completion as the
    assistant turn; text prompts are scored as prompt + completion.
    """
    tok, model = policy.tokenizer, policy.model
    if prompt.messages is not None and getattr(tok, "chat_template", None):
        texts = [render_chat(tok, [*prompt.messages, {"role": "assistant", "content": c}], False, prompt.tools,
                             policy.name) for c in completions]
        enc = [tok(t, add_special_tokens=False).input_ids for t in texts]
    else:
        if prompt.token_ids is not None:
            head = tok.decode(prompt.token_ids, skip_special_tokens=True)
        elif prompt.messages is not None:
            head = "\n".join(str(m.get("content", "")) for m in prompt.messages)
        else:
            head = prompt.text or ""
        enc = [tok(head + c).input_ids for c in completions]
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    width = max(len(e) for e in enc)
    # right padding: sequence classifiers read the last non-pad token
    ids = torch.full((len(enc), width), pad, dtype=torch.long)
    att = torch.zeros((len(enc), width), dtype=torch.long)
    for i, e in enumerate(enc):
        ids[i, : len(e)] = torch.tensor(e)
        att[i, : len(e)] = 1
    dev = next(model.parameters()).device
    logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits  # [N, labels]
    return logits[:, 0].float().tolist()

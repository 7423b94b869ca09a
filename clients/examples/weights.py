"""Explicit weights: score = 0.5 * log pi_A + 0.5 * log pi_B, token by token."""

from common import MAX_TOKENS, MESSAGES, A, B, client, show

from policymix_client import mixing, weights

show(client().chat.completions.create(model=A, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=mixing(weights({A: 0.5, B: 0.5}))))

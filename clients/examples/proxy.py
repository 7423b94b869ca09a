"""Proxy tuning: steer A with the difference that tuning made to B: A + alpha * (B - reference)."""

from common import MAX_TOKENS, MESSAGES, REF, A, B, client, show

from policymix_client import mixing, proxy

show(client().chat.completions.create(model=A, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=mixing(proxy(base=A, tuned=B, untuned=REF, alpha=1.0))))

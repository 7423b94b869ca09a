"""Decoding-time realignment (DeRa): B retargeted from beta 0.1 to beta_prime 0.05 -> B: 2, reference: -1."""

from common import MAX_TOKENS, MESSAGES, REF, B, client, show

from policymix_client import dera, mixing

show(client().chat.completions.create(model=B, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=mixing(dera(REF, B, beta=0.1, beta_prime=0.05))))

"""Multi-objective decoding (MOD): pi ∝ pi_ref · exp(sum_i w_i r_i / beta) -> A: 0.6, B: 0.4, reference: 0."""

from common import MAX_TOKENS, MESSAGES, REF, A, B, client, show

from policymix_client import mixing, mod

show(client().chat.completions.create(model=A, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=mixing(mod(REF, {A: 0.6, B: 0.4}))))

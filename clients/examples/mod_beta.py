"""MOD with a new KL strength: objectives scaled by beta / beta_prime (0.1 / 0.2), the reference gets the rest."""

from common import MAX_TOKENS, MESSAGES, REF, A, B, client, show

from policymix_client import mixing, mod

recipe = mod(REF, {A: 0.5, B: 0.5}, beta=0.1, beta_prime=0.2)
show(client().chat.completions.create(model=A, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                      extra_body=mixing(recipe)))

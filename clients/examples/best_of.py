"""Best-of-4, reranked by B's implicit DPO reward beta * sum_t log(pi_B / pi_ref), with token signals.

(`best_of` is a completions parameter in the SDK; for chat it travels in extra_body.)
"""

from common import MAX_TOKENS, MESSAGES, REF, B, client, show

from policymix_client import implicit_rerank, mixing

show(client().chat.completions.create(model=B, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0.8, seed=1,
                                      extra_body=mixing(best_of=4, rerank=implicit_rerank(B, REF, beta=0.1),
                                                        return_token_signals=True)))

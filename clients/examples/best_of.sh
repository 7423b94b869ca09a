#!/usr/bin/env bash
# Best-of-4, reranked by B's implicit DPO reward beta * sum_t log(pi_B / pi_ref); the response lists
# every candidate with its score and the KL bound log n - (n - 1) / n.
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$B", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS,
 "temperature": 0.8, "seed": 1, "best_of": 4, "return_token_signals": true,
 "rerank": {"implicit": {"policy": "$B", "reference": "$REF", "beta": 0.1}}}
JSON

#!/usr/bin/env bash
# MOD with a new KL strength: objectives scaled by beta / beta_prime (0.1 / 0.2), the reference gets the rest.
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$A", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"reference": "$REF", "objectives": {"$A": 0.5, "$B": 0.5}, "beta": 0.1, "beta_prime": 0.2}}
JSON

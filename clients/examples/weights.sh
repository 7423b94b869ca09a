#!/usr/bin/env bash
# Explicit weights: score = 0.5 * log pi_A + 0.5 * log pi_B, token by token.
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$A", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"weights": {"$A": 0.5, "$B": 0.5}}}
JSON

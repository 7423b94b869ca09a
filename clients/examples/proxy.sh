#!/usr/bin/env bash
# Proxy tuning: steer A with the difference that tuning made to B: A + alpha * (B - reference).
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$A", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"proxy": {"base": "$A", "tuned": "$B", "untuned": "$REF", "alpha": 1.0}}}
JSON

#!/usr/bin/env bash
# Multi-objective decoding (MOD): pi ∝ pi_ref · exp(sum_i w_i r_i / beta) -> A: 0.6, B: 0.4, reference: 0.
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$A", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"reference": "$REF", "objectives": {"$A": 0.6, "$B": 0.4}}}
JSON

#!/usr/bin/env bash
# Decoding-time realignment (DeRa): retarget B's KL strength from beta 0.1 to beta_prime 0.05,
# i.e. pi ∝ pi_ref · exp(r / 0.05) -> B: 2, reference: -1.
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$B", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"reference": "$REF", "policy": "$B", "beta": 0.1, "beta_prime": 0.05}}
JSON

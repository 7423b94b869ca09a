#!/usr/bin/env bash
# Classifier-free guidance with a negative prompt: REF at scale 1.5 against REF under the negative
# prompt -> REF: 1.5, REF[neg]: -0.5 (the response names the variant and echoes its length, not its text).
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$REF", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS, "temperature": 0,
 "mixture": {"guidance": {"policy": "$REF", "scale": 1.5, "negative_prompt": "Answer rudely and vaguely."}}}
JSON

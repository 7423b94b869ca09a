#!/usr/bin/env bash
# A named mixture from the server's config is just a model name; streamed here (server-sent events).
. "$(dirname "$0")/common.sh"
post /v1/chat/completions <<JSON
{"model": "$MIXTURE", "messages": [{"role": "user", "content": "$PROMPT"}], "max_tokens": $MAX_TOKENS,
 "temperature": 0, "stream": true, "stream_options": {"include_usage": true}}
JSON

# Shared settings of the curl examples (sourced). Defaults fit `policymix serve` with no config
# (the embedded SmolLM2 styles); override them for your own config.
set -euo pipefail
URL=${POLICYMIX_URL:-http://127.0.0.1:8000}
REF=${POLICYMIX_REFERENCE:-smollm2}      # the reference policy
A=${POLICYMIX_A:-formal}                 # two policies tuned or prompted from it
B=${POLICYMIX_B:-playful}
MIXTURE=${POLICYMIX_MIXTURE:-formal-playful}  # a named mixture of the config
MAX_TOKENS=${POLICYMIX_MAX_TOKENS:-48}
PROMPT=${POLICYMIX_PROMPT:-Tell me about the weather today.}
AUTH=()
if [ -n "${POLICYMIX_API_KEY:-}" ]; then AUTH=(-H "Authorization: Bearer $POLICYMIX_API_KEY"); fi

# post PATH: POST the JSON body read from stdin, print the response
post() {
  curl -sS --fail-with-body "$URL$1" -H "Content-Type: application/json" "${AUTH[@]}" -d @-
  echo
}

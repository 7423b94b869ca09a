#!/usr/bin/env bash
# Evaluate a policy and a mixture served by policymix with lm-eval's `local-completions` model, on the
# local task in this folder (no hub). Loglikelihoods come from echo + logprobs: prompt scoring under the
# served model or mixture. Defaults fit `make serve` (the embedded SmolLM2 and its named mixtures).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
URL=${POLICYMIX_URL:-http://127.0.0.1:8000}
MODELS=${POLICYMIX_EVAL_MODELS:-smollm2 formal-playful}
LM_EVAL=${LM_EVAL:-lm_eval}
TASKS=$(mktemp -d)
trap 'rm -rf "$TASKS"' EXIT
sed "s#ITEMS#$HERE/items.jsonl#" "$HERE/capitals.yaml" > "$TASKS/capitals.yaml"
for model in $MODELS; do
  echo "== $model"
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 $LM_EVAL --model local-completions --tasks capitals \
    --include_path "$TASKS" \
    --model_args "base_url=$URL/v1/completions,model=$model,tokenizer_backend=remote,num_concurrent=2,max_retries=1"
done

"""A named mixture from the server's config is just a model name; streamed here."""

import json

from common import MAX_TOKENS, MESSAGES, MIXTURE, client

stream = client().chat.completions.create(model=MIXTURE, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                          stream=True)
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
    if (chunk.model_extra or {}).get("policymix"):  # the last chunk carries what ran
        print("\npolicymix:", json.dumps(chunk.model_extra["policymix"]))

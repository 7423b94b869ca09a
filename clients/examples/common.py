"""Shared settings of the OpenAI-SDK examples: the same environment variables as common.sh.

Defaults fit `policymix serve` with no config (the embedded SmolLM2 styles).
"""

import json
import os

from openai import OpenAI

URL = os.environ.get("POLICYMIX_URL", "http://127.0.0.1:8000")
REF = os.environ.get("POLICYMIX_REFERENCE", "smollm2")  # the reference policy
A = os.environ.get("POLICYMIX_A", "formal")  # two policies tuned or prompted from it
B = os.environ.get("POLICYMIX_B", "playful")
MIXTURE = os.environ.get("POLICYMIX_MIXTURE", "formal-playful")  # a named mixture of the config
MAX_TOKENS = int(os.environ.get("POLICYMIX_MAX_TOKENS", "48"))
PROMPT = os.environ.get("POLICYMIX_PROMPT", "Tell me about the weather today.")
MESSAGES = [{"role": "user", "content": PROMPT}]


def client() -> OpenAI:
    return OpenAI(base_url=f"{URL}/v1", api_key=os.environ.get("POLICYMIX_API_KEY") or "none")


def show(response) -> None:
    """The text, then the policymix extension object as one JSON line."""
    choice = response.choices[0]
    print(choice.message.content if hasattr(choice, "message") else choice.text)
    print("policymix:", json.dumps(response.model_extra["policymix"]))

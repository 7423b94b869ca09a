"""A small typed client for policymix (sync and async, over httpx), and builders of its mixing fields.

The builders also serve the OpenAI SDK: ``extra_body=mixing(dera("base", "dpo", beta_prime=0.05))``.
"""

from .client import AsyncPolicymixClient, PolicymixAPIError, PolicymixClient
from .recipes import dera, implicit_rerank, mixing, mod, proxy, reward_model_rerank, weights
from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelInfo, Policymix

__all__ = [
    "AsyncPolicymixClient", "PolicymixAPIError", "PolicymixClient",
    "dera", "implicit_rerank", "mixing", "mod", "proxy", "reward_model_rerank", "weights",
    "ChatCompletion", "ChatCompletionChunk", "Completion", "CompletionChunk", "ModelInfo", "Policymix",
]

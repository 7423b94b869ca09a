"""Registers the composite model class with vLLM, in every process that builds a model.

vLLM's CPU platform spawns its engine and worker processes, so a registration made in the
server process does not reach them. Two ways in, both idempotent:
- the ``vllm.general_plugins`` entry point ``policymix = policymix.engine.vllm.plugin:register``
  (vLLM calls it in each process it starts);
- importing :mod:`.table`, which every process does anyway: the engine's config names the
  weight-table logits processor, and unpickling that config imports its module.
"""

from __future__ import annotations

ARCH = "MixturePolicyForCausalLM"
POLICIES_KEY = "policymix_policies"  # config.json key: [{"name", "path", "attr"}, ...]
WEIGHTS_ARG = "policymix_weights"  # SamplingParams.extra_args key: one weight per policy, in order
OBSERVE_ARG = "policymix_observe"  # indices of policies whose logprobs are needed at weight 0
KEY_ARG = "policymix_key"  # present: send this sequence's per-policy logprobs back, under this key
REFERENCE_ARG = "policymix_reference"  # policy index for the per-step KL(q || pi_ref)


def register() -> None:
    from vllm import ModelRegistry

    if ARCH not in ModelRegistry.get_supported_archs():
        # a "module:Class" string: vLLM imports it lazily (no torch work at registration)
        ModelRegistry.register_model(ARCH, "policymix.engine.vllm.composite:MixturePolicyForCausalLM")

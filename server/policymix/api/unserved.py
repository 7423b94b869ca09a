"""Request fields that OpenAI (or vLLM) defines and this server does not serve: a 400 naming each, never ignored.

A field is refused only when its value asks for something the server does not do; the value that means
what the server does anyway (null, false, ``["text"]``, ``"auto"``...) passes, so an SDK that sends a
default is served. Names that neither API defines are still ignored, as vLLM ignores them (the OpenAI
SDK's ``extra_body`` may carry anything). docs/api.md lists these fields.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import PolicymixError


def _null(v: Any) -> bool:
    return v is None


def _falsy(v: Any) -> bool:
    return v is None or v is False


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {} or v == ""


def _one_of(*values: Any) -> Callable[[Any], bool]:
    return lambda v: v is None or any(v == x and type(v) is type(x) for x in values)


# field -> (served values, why it is refused otherwise)
_BOTH: dict[str, tuple[Callable[[Any], bool], str]] = {
    # vLLM's sampling and output extras that the engines do not implement
    "use_beam_search": (_falsy, "vLLM's beam search is not served; policymix's chunk-level `search` is"),
    "length_penalty": (_one_of(1, 1.0), "length_penalty belongs to vLLM's beam search, which is not served"),
    "early_stopping": (_falsy, "early_stopping belongs to vLLM's beam search, which is not served"),
    "truncate_prompt_tokens": (_null, "prompts are never truncated: a prompt past the context is a 400"),
    "truncation_side": (_null, "prompts are never truncated: a prompt past the context is a 400"),
    "allowed_token_ids": (_null, "allowed_token_ids is not served (use a structured-output constraint)"),
    "bad_words": (_empty, "bad_words is not served (use logit_bias)"),
    "logprob_token_ids": (_null, "logprob_token_ids is not served"),
    "spaces_between_special_tokens": (_one_of(True), "special tokens are always decoded with spaces between them"),
    "logits_processors": (_null, "custom logits processors are not served"),
    "return_tokens_as_token_ids": (_falsy, "return_tokens_as_token_ids is not served"),
    "return_token_ids": (_falsy, "return_token_ids is not served"),
    "priority": (_one_of(0), "request priorities are not served: requests are admitted in arrival order"),
    "vllm_xargs": (_null, "vllm_xargs is not served"),
    "kv_transfer_params": (_null, "disaggregated prefill (kv_transfer_params) is not served"),
    "ec_transfer_params": (_null, "ec_transfer_params is not served"),
    "repetition_detection": (_null, "repetition_detection is not served"),
    "mm_processor_kwargs": (_null, "multimodal inputs are not served"),
    "media_io_kwargs": (_null, "multimodal inputs are not served"),
    "prompt_embeds": (_null, "prompt embeddings are not served"),
    "guided_decoding_backend": (_one_of("xgrammar", "auto"), "the structured-output backend is xgrammar"),
    "guided_whitespace_pattern": (_null, "guided_whitespace_pattern (outlines' option) is not served; "
                                         "structured_outputs.disable_any_whitespace is"),
    "structural_tag": (_null, "structural tags are not served"),
}

CHAT: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_BOTH,
    # OpenAI's
    "audio": (_null, "audio output is not served"),
    "modalities": (lambda v: v is None or v == ["text"], "only text output is served: modalities ['text']"),
    "prediction": (_null, "predicted outputs are not served"),
    "functions": (_null, "the deprecated functions field is not served: use tools"),
    "function_call": (_null, "the deprecated function_call field is not served: use tool_choice"),
    "web_search_options": (_null, "web search is not served"),
    "reasoning_effort": (_one_of("none"), "the served models do not reason: reasoning_effort is not served"),
    "verbosity": (_null, "verbosity is not served"),
    "store": (_falsy, "this server stores nothing: store must be false"),
    "metadata": (_empty, "this server stores nothing, so it keeps no metadata"),
    "service_tier": (_one_of("auto", "default"), "there is one service tier: auto / default"),
    "moderation": (_null, "moderation is not served"),
    "prompt_cache_retention": (_one_of("in_memory"), "prompt-cache retention is not configurable: in_memory"),
    "prompt_cache_options": (_null, "prompt_cache_options is not served"),
    # vLLM's chat extras
    "echo": (_falsy, "echo on chat (continuing the last message) is not served"),
    "continue_final_message": (_falsy, "continue_final_message is not served"),
    "add_special_tokens": (_falsy, "chat prompts are rendered by the chat template, without added special tokens"),
    "documents": (_null, "documents for the chat template are not served"),
    "chat_template": (_null, "a request's own chat template is not served"),
    "chat_template_kwargs": (_null, "chat_template_kwargs is not served"),
    "thinking_token_budget": (_null, "the served models do not reason: thinking_token_budget is not served"),
    "return_token_offsets": (_falsy, "return_token_offsets is not served"),
    "return_prompt_text": (_falsy, "return_prompt_text is not served"),
    "return_mm_kwargs": (_falsy, "multimodal inputs are not served"),
    "mm_payload": (_null, "multimodal inputs are not served"),
}

COMPLETION: dict[str, tuple[Callable[[Any], bool], str]] = {
    **_BOTH,
    "suffix": (_empty, "suffix (insertion) is not served"),
    "add_special_tokens": (lambda v: v is None or v is True, "completion prompts always get the tokenizer's "
                                                              "special tokens"),
    "tools": (_null, "tools are served on /v1/chat/completions"),
    "tool_choice": (_null, "tools are served on /v1/chat/completions"),
}


RESPONSES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "background": (_falsy, "background responses are not served (nothing is stored)"),
    "conversation": (_null, "conversations are not stored: send the conversation as input"),
    "include": (_empty, "include is not served"),
    "reasoning": (lambda v: v is None or v == {} or (isinstance(v, dict) and v.get("effort") in (None, "none")
                                                     and not v.get("summary")),
                  "the served models do not reason: reasoning is not served"),
    "prompt": (_null, "prompt templates are not served"),
    "truncation": (_one_of("disabled"), "inputs are never truncated: a prompt past the context is a 400"),
    "max_tool_calls": (_null, "max_tool_calls is not served"),
    "top_logprobs": (_null, "logprobs are not served on /v1/responses (use /v1/chat/completions)"),
    "metadata": (_empty, "this server stores nothing, so it keeps no metadata"),
    "service_tier": (_one_of("auto", "default"), "there is one service tier: auto / default"),
    "moderation": (_null, "moderation is not served"),
    "context_management": (_null, "context_management is not served"),
    "prompt_cache_retention": (_one_of("in_memory"), "prompt-cache retention is not configurable: in_memory"),
    "prompt_cache_options": (_null, "prompt_cache_options is not served"),
    "image": (_null, "image output is not served"),
    "access_programs": (_null, "access_programs is not served"),
    # chat's names for constraints: on /v1/responses the constraint is text.format (or tools)
    **{name: (_null, f"{name} is not a Responses field: use text.format") for name in
       ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")},
}


def refuse_unserved(body: Any, table: dict[str, tuple[Callable[[Any], bool], str]]) -> Any:
    """Raise a 400 naming the first field of ``body`` (a raw request dict) that asks for what is not served."""
    if isinstance(body, dict):
        for name, (served, why) in table.items():
            if name in body and not served(body[name]):
                raise PolicymixError(f"{name}: {why}", param=name, code="unsupported_parameter")
    return body

"""One streaming ``/v1/completions`` request, timed token by token (OpenAI / vLLM SSE wire format).

Timing follows ``vllm bench serve``: TTFT is the arrival of the first chunk that carries a choice,
ITL the gaps between later such chunks, and output tokens come from the final usage chunk
(``stream_options.include_usage``) when the server sends one, else from the number of chunks.
A chunk with empty text and a ``finish_reason`` is an end marker, not a token.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx


@dataclass
class RequestResult:
    success: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter when sent
    ttft: float = 0.0  # s to the first token chunk
    latency: float = 0.0  # s to the end of the stream
    itl: list[float] = field(default_factory=list)  # s between token chunks
    output_tokens: int = 0
    prompt_tokens: int | None = None
    text: str = ""
    finish_reason: str | None = None


def build_payload(model: str, prompt, max_tokens: int, ignore_eos: bool = True, temperature: float = 0.0,
                  mixture: dict | str | None = None, extra_body: dict | None = None) -> dict:
    payload = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,  # a vLLM / policymix extension: exact output lengths
    }
    if mixture is not None:
        payload["mixture"] = mixture
    payload.update(extra_body or {})
    return payload


async def stream_completion(client: httpx.AsyncClient, url: str, payload: dict,
                            headers: dict | None = None) -> RequestResult:
    """POST ``payload`` to ``url`` and read the SSE stream to ``[DONE]``; never raises for HTTP errors."""
    res = RequestResult(start=time.perf_counter())
    last = res.start
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=payload, headers=headers) as resp:
            if resp.status_code != 200:
                body = (await resp.aread()).decode(errors="replace")
                res.error = f"HTTP {resp.status_code}: {body[:300]}"
                return res
            async for line in resp.aiter_lines():
                line = line.strip()
                if not line.startswith("data:"):
                    continue  # blank separators and ": keep-alive" comments
                data = line[len("data:"):].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter()
                chunk = json.loads(data)
                if "error" in chunk:
                    res.error = f"stream error: {json.dumps(chunk['error'])[:300]}"
                    return res
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                    res.prompt_tokens = chunk["usage"].get("prompt_tokens")
                for choice in chunk.get("choices") or []:
                    text = choice.get("text") or ""
                    res.finish_reason = choice.get("finish_reason") or res.finish_reason
                    if not text and choice.get("finish_reason"):
                        continue  # end marker
                    if chunks == 0:
                        res.ttft = now - res.start
                    else:
                        res.itl.append(now - last)
                    chunks += 1
                    last = now
                    res.text += text
        res.latency = time.perf_counter() - res.start
        res.output_tokens = usage_tokens if usage_tokens is not None else chunks
        if chunks == 0:
            res.error = "stream ended without a token"
        else:
            res.success = True
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        res.error = f"{type(exc).__name__}: {exc}"
    return res

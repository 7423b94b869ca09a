"""Sync and async clients over httpx. Streams are iterators of typed chunks; errors raise PolicymixAPIError."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Iterator

import httpx

from .types import ChatCompletion, ChatCompletionChunk, Completion, CompletionChunk, ModelInfo

DEFAULT_URL = "http://127.0.0.1:8000"


class PolicymixAPIError(Exception):
    """An OpenAI error envelope (or a stream's error event) from the server."""

    def __init__(self, status: int, message: str, type: str | None = None, param: str | None = None,
                 code: str | None = None):
        super().__init__(f"{status}: {message}")
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code


def _error(status: int, payload: Any) -> PolicymixAPIError:
    err = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(err, dict):
        return PolicymixAPIError(status, str(payload))
    return PolicymixAPIError(status, err.get("message", ""), err.get("type"), err.get("param"), err.get("code"))


def _check(resp: httpx.Response) -> Any:
    try:
        payload = resp.json()
    except ValueError:
        payload = resp.text
    if resp.status_code >= 400:
        raise _error(resp.status_code, payload)
    return payload


class _SSE:
    """Server-sent events -> JSON objects; ``[DONE]`` ends the stream, an error event raises."""

    def __init__(self, status: int):
        self.status = status
        self.data: list[str] = []
        self.done = False

    def feed(self, line: str) -> dict | None:
        if line.startswith("data:"):
            self.data.append(line[5:].removeprefix(" "))
            return None
        if line or not self.data:  # comments, other fields, or a blank line between events
            return None
        payload, self.data = "\n".join(self.data), []
        if payload == "[DONE]":
            self.done = True
            return None
        obj = json.loads(payload)
        if "error" in obj:
            raise _error(self.status, obj)
        return obj


def _messages(messages: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"role": "user", "content": messages}] if isinstance(messages, str) else messages


def _body(model: str, mixture: Any, stream: bool, params: dict[str, Any]) -> dict[str, Any]:
    body = {"model": model, **{k: v for k, v in params.items() if v is not None}}
    if mixture is not None:
        body["mixture"] = mixture
    if stream:
        body["stream"] = True
    return body


def _headers(api_key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


class PolicymixClient:
    """``PolicymixClient("http://127.0.0.1:8000").chat("formal", "Hi", mixture=weights(formal=1))``."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 http: httpx.Client | None = None):
        self.http = http or httpx.Client(base_url=base_url.rstrip("/"), headers=_headers(api_key), timeout=timeout)

    def __enter__(self) -> "PolicymixClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self.http.close()

    def completions(self, model: str, prompt: Any, *, mixture: Any = None, stream: bool = False,
                    **params: Any) -> Completion | Iterator[CompletionChunk]:
        body = _body(model, mixture, stream, {"prompt": prompt, **params})
        if stream:
            return self._stream("/v1/completions", body, CompletionChunk)
        return Completion.model_validate(_check(self.http.post("/v1/completions", json=body)))

    def chat(self, model: str, messages: str | list[dict[str, Any]], *, mixture: Any = None, stream: bool = False,
             **params: Any) -> ChatCompletion | Iterator[ChatCompletionChunk]:
        body = _body(model, mixture, stream, {"messages": _messages(messages), **params})
        if stream:
            return self._stream("/v1/chat/completions", body, ChatCompletionChunk)
        return ChatCompletion.model_validate(_check(self.http.post("/v1/chat/completions", json=body)))

    def _stream(self, path: str, body: dict, chunk_type: type) -> Iterator[Any]:
        with self.http.stream("POST", path, json=body) as resp:
            if resp.status_code >= 400:
                resp.read()
                _check(resp)
            sse = _SSE(resp.status_code)
            for line in resp.iter_lines():
                obj = sse.feed(line)
                if obj is not None:
                    yield chunk_type.model_validate(obj)
                if sse.done:
                    return

    def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in _check(self.http.get("/v1/models"))["data"]]

    def health(self) -> bool:
        return self.http.get("/health").status_code == 200

    def tokenize(self, model: str, prompt: str) -> list[int]:
        return _check(self.http.post("/tokenize", json={"model": model, "prompt": prompt}))["tokens"]

    def detokenize(self, model: str, tokens: list[int]) -> str:
        return _check(self.http.post("/detokenize", json={"model": model, "tokens": tokens}))["prompt"]


class AsyncPolicymixClient:
    """The async twin of :class:`PolicymixClient` (``await client.chat(...)``; streams are async iterators)."""

    def __init__(self, base_url: str = DEFAULT_URL, api_key: str | None = None, timeout: float = 120.0,
                 http: httpx.AsyncClient | None = None):
        self.http = http or httpx.AsyncClient(base_url=base_url.rstrip("/"), headers=_headers(api_key),
                                              timeout=timeout)

    async def __aenter__(self) -> "AsyncPolicymixClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def close(self) -> None:
        await self.http.aclose()

    async def completions(self, model: str, prompt: Any, *, mixture: Any = None, stream: bool = False,
                          **params: Any) -> Completion | AsyncIterator[CompletionChunk]:
        body = _body(model, mixture, stream, {"prompt": prompt, **params})
        if stream:
            return self._stream("/v1/completions", body, CompletionChunk)
        return Completion.model_validate(_check(await self.http.post("/v1/completions", json=body)))

    async def chat(self, model: str, messages: str | list[dict[str, Any]], *, mixture: Any = None,
                   stream: bool = False, **params: Any) -> ChatCompletion | AsyncIterator[ChatCompletionChunk]:
        body = _body(model, mixture, stream, {"messages": _messages(messages), **params})
        if stream:
            return self._stream("/v1/chat/completions", body, ChatCompletionChunk)
        return ChatCompletion.model_validate(_check(await self.http.post("/v1/chat/completions", json=body)))

    async def _stream(self, path: str, body: dict, chunk_type: type) -> AsyncIterator[Any]:
        async with self.http.stream("POST", path, json=body) as resp:
            if resp.status_code >= 400:
                await resp.aread()
                _check(resp)
            sse = _SSE(resp.status_code)
            async for line in resp.aiter_lines():
                obj = sse.feed(line)
                if obj is not None:
                    yield chunk_type.model_validate(obj)
                if sse.done:
                    return

    async def models(self) -> list[ModelInfo]:
        return [ModelInfo.model_validate(m) for m in _check(await self.http.get("/v1/models"))["data"]]

    async def health(self) -> bool:
        return (await self.http.get("/health")).status_code == 200

    async def tokenize(self, model: str, prompt: str) -> list[int]:
        return _check(await self.http.post("/tokenize", json={"model": model, "prompt": prompt}))["tokens"]

    async def detokenize(self, model: str, tokens: list[int]) -> str:
        return _check(await self.http.post("/detokenize", json={"model": model, "tokens": tokens}))["prompt"]

"""Real requests against a running policymix container (deploy/test-image.sh). Standard library only.

    smoke.py requests URL           a completion and a chat request with a mixture
    smoke.py drain URL CMD...       a stream; once tokens flow, run CMD (it sends SIGTERM), then check
                                    that the stream ends with its final event or an error event
Prints one line per check; exits non-zero with the reason on the first failure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request

MIXTURE = {"weights": {"formal": 0.5, "playful": 0.5}}  # two prompted policies of the embedded default


def post(url: str, body: dict, timeout: float = 300) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def check(ok: bool, what: str, detail: object = "") -> None:
    if not ok:
        sys.exit(f"FAIL {what}: {detail}")
    print(f"ok   {what}", flush=True)


def requests(base: str) -> None:
    t = time.monotonic()
    r = post(f"{base}/v1/completions", {"model": "smollm2", "prompt": "The capital of France is",
                                        "max_tokens": 8, "temperature": 0})
    text = r["choices"][0]["text"]
    check(r["usage"]["completion_tokens"] > 0 and text.strip() != "",
          f"completion {text!r} ({time.monotonic() - t:.1f} s)", r)

    t = time.monotonic()
    r = post(f"{base}/v1/chat/completions", {"model": "formal-playful", "max_tokens": 16, "temperature": 0,
                                             "messages": [{"role": "user", "content": "Say hello."}],
                                             "mixture": MIXTURE})
    content = r["choices"][0]["message"]["content"]
    weights = r["policymix"]["weights"]
    check(content.strip() != "" and weights == MIXTURE["weights"],
          f"chat with mixture {weights}: {content!r} ({time.monotonic() - t:.1f} s)", r)


def drain(base: str, command: list[str]) -> None:
    body = {"model": "smollm2", "prompt": "Tell me a long story about a lighthouse keeper.",
            "max_tokens": 400, "ignore_eos": True, "temperature": 0.7, "seed": 1, "stream": True}
    req = urllib.request.Request(f"{base}/v1/completions", json.dumps(body).encode(),
                                 {"content-type": "application/json"})
    events: list = []
    signalled = None
    with urllib.request.urlopen(req, timeout=120) as r:
        for line in r:
            line = line.decode().strip()
            if not line.startswith("data: "):
                continue
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
            if signalled is None and len(events) >= 3:
                subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
                signalled = time.monotonic()
                print(f"...  SIGTERM sent after {len(events)} events", flush=True)
    check(signalled is not None, "the stream was running when SIGTERM was sent", events)
    check(events[-1] == "[DONE]", "the stream ends with [DONE]", events[-3:])
    last = events[-2]
    if "error" in last:  # cut at the drain deadline: a clean OpenAI error envelope
        check(last["error"]["code"] == "server_shutting_down", f"stream ended by an error event {last['error']}")
    else:
        finish = [e["choices"][0].get("finish_reason") for e in events[:-1] if e.get("choices")]
        check(finish[-1] == "length", f"stream finished during the drain ({len(events) - 1} events, "
                                      f"finish_reason {finish[-1]})", events[-3:])
    print(f"...  stream closed {time.monotonic() - signalled:.1f} s after SIGTERM", flush=True)


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "requests":
        requests(sys.argv[2].rstrip("/"))
    elif len(sys.argv) >= 4 and sys.argv[1] == "drain":
        drain(sys.argv[2].rstrip("/"), sys.argv[3:])
    else:
        sys.exit(__doc__)

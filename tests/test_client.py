"""policymix_client (sync + async) and every example under clients/examples, against a live server."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from api_helpers import LiveServer
from policymix.api import build_app
from policymix_client import (
    AsyncPolicymixClient,
    PolicymixAPIError,
    PolicymixClient,
    dera,
    implicit_rerank,
    mixing,
    mod,
    proxy,
    reward_model_rerank,
    weights,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "clients" / "examples"
# the tiny test config's names for the examples' roles
EXAMPLE_ENV = {"POLICYMIX_REFERENCE": "base", "POLICYMIX_A": "formal", "POLICYMIX_B": "dpo",
               "POLICYMIX_MIXTURE": "balanced", "POLICYMIX_MAX_TOKENS": "4", "POLICYMIX_PROMPT": "Hello world"}


@pytest.fixture(scope="module")
def server(tiny_registry, tiny_config):
    from policymix.engine.native import NativeEngine

    with LiveServer(build_app(NativeEngine(tiny_registry), tiny_config, env={})) as srv:
        yield srv


def test_recipe_builders():
    assert weights(a=0.5, b=0.5) == {"weights": {"a": 0.5, "b": 0.5}}
    assert weights({"a-b": 1.0}) == {"weights": {"a-b": 1.0}}
    assert mod("r", {"p": 0.3}) == {"reference": "r", "objectives": {"p": 0.3}}
    assert mod("r", {"p": 0.3}, 0.1, 0.2) == {"reference": "r", "objectives": {"p": 0.3}, "beta": 0.1,
                                              "beta_prime": 0.2}
    assert dera("r", "p", beta_prime=0.05) == {"reference": "r", "policy": "p", "beta_prime": 0.05}
    assert proxy("L", "S+", "S-", 2.0) == {"proxy": {"base": "L", "tuned": "S+", "untuned": "S-", "alpha": 2.0}}
    assert implicit_rerank("p", "r", 0.1) == {"implicit": {"policy": "p", "reference": "r", "beta": 0.1}}
    assert reward_model_rerank("rm") == {"reward_model": "rm"}
    assert mixing("named", best_of=3, top_k=5) == {"mixture": "named", "best_of": 3, "top_k": 5}
    assert mixing() == {}


def test_sync_client(server):
    with PolicymixClient(server.url) as c:
        assert c.health()
        assert {"base", "balanced"} <= {m.id for m in c.models()}
        r = c.completions("base", "Hello", mixture=dera("base", "dpo", beta_prime=0.05), max_tokens=4, temperature=0)
        assert r.policymix.weights == pytest.approx({"dpo": 2.0, "base": -1.0})
        assert r.usage.completion_tokens == 4 and isinstance(r.text, str)
        chat = c.chat("balanced", "Hi", max_tokens=5, temperature=0)
        chunks = list(c.chat("balanced", "Hi", max_tokens=5, temperature=0, stream=True))
        assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == chat.content
        assert chunks[-1].policymix.mixture == "balanced"
        ids = c.tokenize("base", "Hello world")
        assert c.detokenize("base", ids).endswith("Hello world")
        with pytest.raises(PolicymixAPIError) as e:
            c.completions("ghost", "x")
        assert e.value.status == 404 and e.value.code == "model_not_found" and e.value.param == "model"
        with pytest.raises(PolicymixAPIError) as e:
            list(c.completions("base", "x", stream=True, mixture=weights(ghost=1.0)))
        assert e.value.status == 400


def test_async_client(server):
    async def run():
        async with AsyncPolicymixClient(server.url) as c:
            assert await c.health()
            one, two = await asyncio.gather(
                c.completions("base", "Hello", max_tokens=6, temperature=1.0, seed=5),
                c.completions("base", "Hello", max_tokens=6, temperature=1.0, seed=5))
            text = ""
            stream = await c.completions("base", "Hello", max_tokens=6, temperature=1.0, seed=5, stream=True)
            async for chunk in stream:
                text += "".join(ch.text for ch in chunk.choices)
            with pytest.raises(PolicymixAPIError) as e:
                await c.chat("base", "x", best_of=2, temperature=0)
            return one.text, two.text, text, e.value

    one, two, streamed, err = asyncio.run(run())
    assert one == two == streamed  # same seed, same tokens, streamed or not
    assert err.status == 400 and err.param == "best_of"


def _env(server) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[1])
    return {**os.environ, **EXAMPLE_ENV, "POLICYMIX_URL": server.url, "POLICYMIX_API_KEY": "",
            "PYTHONPATH": os.pathsep.join(filter(None, [root + "/clients", os.environ.get("PYTHONPATH")]))}


EXPECTED = {  # the weights each recipe compiles to with the tiny config's names
    "weights": {"formal": 0.5, "dpo": 0.5},
    "mod": {"formal": 0.6, "dpo": 0.4, "base": 0.0},
    "mod_beta": {"formal": 0.25, "dpo": 0.25, "base": 0.5},
    "dera": {"dpo": 2.0, "base": -1.0},
    "proxy": {"formal": 1.0, "dpo": 1.0, "base": -1.0},
    "named_mixture": {"dpo": 0.5, "formal": 0.5},
    "best_of": {"dpo": 1.0},
    "guidance": {"base": 1.5, "base[neg]": -0.5},
}


def _policymix_from_curl(out: str) -> dict:
    if out.lstrip().startswith("data:"):
        events = [json.loads(line[6:]) for line in out.splitlines() if line.startswith("data: {")]
        assert out.rstrip().endswith("data: [DONE]")
        return next(e["policymix"] for e in events if e.get("policymix"))
    return json.loads(out)["policymix"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_python_example(server, name):
    out = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py")], env=_env(server), capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    line = next(ln for ln in out.stdout.splitlines() if ln.startswith("policymix: "))
    ext = json.loads(line[len("policymix: "):])
    assert ext["weights"] == pytest.approx(EXPECTED[name])
    if name == "best_of":
        assert len(ext["candidates"]) == 4 and ext["token_signals"]


@pytest.mark.skipif(shutil.which("curl") is None or shutil.which("bash") is None, reason="needs bash and curl")
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_curl_example(server, name):
    out = subprocess.run(["bash", str(EXAMPLES / f"{name}.sh")], env=_env(server), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr + out.stdout
    ext = _policymix_from_curl(out.stdout)
    assert ext["weights"] == pytest.approx(EXPECTED[name])
    if name == "best_of":
        assert len(ext["candidates"]) == 4 and ext["kl_bound"] == pytest.approx(0.6362943611)


def test_every_example_is_tested():
    scripts = {p.stem for p in EXAMPLES.iterdir() if p.suffix in (".py", ".sh") and p.stem != "common"}
    assert scripts == set(EXPECTED)

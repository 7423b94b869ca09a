"""The ``policymix`` command: one-line errors with exit 2, a real ``serve`` process, ``demo``."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
import yaml

from policymix.cli import _demo_outputs, main


@pytest.fixture(scope="module")
def tiny_yaml(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "policymix.yaml"
    path.write_text(yaml.safe_dump({
        "policies": {
            "base": {"path": str(tiny_dir / "base")},
            "dpo": {"path": str(tiny_dir / "dpo"), "reference": "base", "beta": 0.1},
            "formal": {"path": str(tiny_dir / "base"), "system_prompt": "Answer formally."},
        },
        "mixtures": {"half": {"weights": {"dpo": 0.5, "formal": 0.5}}},
    }))
    return path


def one_line_error(capsys, argv, *needles):
    with pytest.raises(SystemExit) as e:
        code = main(argv)
        raise SystemExit(code)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("argv, needle", [
    (["serve", "--port", "abc"], "--port"),
    (["serve", "--port", "70000"], "65535"),
    (["serve", "--engine", "tpu"], "--engine"),
    (["serve", "--bogus"], "--bogus"),
    (["launch"], "launch"),
    ([], "serve,demo,sweep"),
    (["demo", "--weights", "a,b"], "--weights"),
])
def test_bad_flags(capsys, argv, needle):
    one_line_error(capsys, argv, needle)


def test_bad_configs(capsys, tmp_path, tiny_dir):
    one_line_error(capsys, ["serve", "--config", str(tmp_path / "missing.yaml")], "does not exist")
    bad = tmp_path / "bad.yaml"
    bad.write_text("policies:\n  base: {path: x, dtype: float8}\n")
    one_line_error(capsys, ["serve", "--config", str(bad)], "policies.base.dtype")
    bad.write_text("policies: {}\n")
    one_line_error(capsys, ["serve", "--config", str(bad)], "policies")
    bad.write_text("policies:\n  base: {path: ./nowhere}\n")
    one_line_error(capsys, ["serve", "--config", str(bad)], "policies.base")
    bad.write_text(f"policies:\n  base: {{path: {tiny_dir / 'base'}}}\n")
    one_line_error(capsys, ["demo", "--config", str(bad), "--pair", "base", "ghost"], "ghost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_process(tiny_yaml):
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLICYMIX_API_KEY": ""}
    proc = subprocess.Popen([sys.executable, "-m", "policymix.cli", "serve", "--config", str(tiny_yaml),
                             "--port", str(port), "--api-key", "secret", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the server did not become healthy"
            time.sleep(0.2)
        body = {"model": "half", "prompt": "Hello", "max_tokens": 3}
        assert httpx.post(f"{url}/v1/completions", json=body).status_code == 401
        r = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer secret"}, timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    assert proc.returncode == 0, out
    assert "serving 3 policies and 1 mixtures" in out


def test_demo(tiny_yaml, capsys):
    assert main(["demo", "--config", str(tiny_yaml), "--pair", "base", "formal", "--weights", "0,0.5,1",
                 "--max-tokens", "3", "--prompt", "Hi"]) == 0
    out = capsys.readouterr().out
    assert "(1 - w) * base + w * formal" in out
    for w in ("w=0 ", "w=0.5 ", "w=1 "):
        assert w in out


def test_demo_weights_mean_what_they_say(tiny_registry):
    """(1 - w) * A + w * B at w=0 is A alone, whichever side A is on."""
    from policymix.engine.native import NativeEngine

    ab = asyncio.run(_demo_outputs(NativeEngine(tiny_registry), "base", "dpo", [0.0, 1.0], "Hi", 6))
    ba = asyncio.run(_demo_outputs(NativeEngine(tiny_registry), "dpo", "base", [1.0, 0.0], "Hi", 6))
    assert ab == ba
    assert ab[0] != ab[1]  # two different random policies


def test_serve_exits_3_when_the_engine_dies(tiny_yaml, monkeypatch, capsys):
    import policymix.cli as cli
    from fake_engine import FakeEngine

    class DyingEngine(FakeEngine):
        on_fatal = None

        async def start(self):
            await super().start()
            asyncio.get_running_loop().call_later(0.3, self.on_fatal, "RuntimeError: boom")

    monkeypatch.setattr(cli, "make_engine", lambda kind, config: DyingEngine())
    monkeypatch.setenv("POLICYMIX_API_KEY", "")
    assert main(["serve", "--config", str(tiny_yaml), "--port", str(_free_port()), "--log-level", "error"]) == 3
    assert "the engine stopped: RuntimeError: boom" in capsys.readouterr().err


def test_train_routes_to_the_dpo_trainer(capsys):
    from policymix.cli import main

    assert main(["train", "ppo"]) == 2
    assert "policymix train: error:" in capsys.readouterr().err
    pytest.importorskip("trl", reason="the lab extra is not installed (make install-lab)")
    with pytest.raises(SystemExit) as done:
        main(["train", "dpo", "--help"])
    assert done.value.code == 0 and "--pairs" in capsys.readouterr().out

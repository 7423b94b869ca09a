"""``server.vllm`` in the config file and its ``POLICYMIX_VLLM_*`` overrides (no vLLM needed, except where marked)."""

from __future__ import annotations

import importlib.util

import pytest
import yaml

from policymix.cli import main
from policymix.config import VllmSpec, load_config
from policymix.engine.vllm.settings import VllmSettings, apply_env, cpu_threads_bind
from policymix.errors import ConfigError


def _yaml(tmp_path, tiny_dir, vllm: dict):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"policies": {"base": {"path": str(tiny_dir / "base")}},
                                    "server": {"engine": "vllm", "vllm": vllm}}))
    return path


def test_the_section_is_read_from_the_file(tmp_path, tiny_dir):
    cfg = load_config(_yaml(tmp_path, tiny_dir, {
        "tensor_parallel_size": 4, "pipeline_parallel_size": 1, "distributed_executor_backend": "ray",
        "gpu_memory_utilization": 0.85, "max_model_len": 4096, "enforce_eager": False,
        "kv_cache_memory_bytes": 1 << 30, "cpu_threads_bind": "0-3|4-7"}))
    v = cfg.server.vllm
    assert (v.tensor_parallel_size, v.distributed_executor_backend, v.gpu_memory_utilization) == (4, "ray", 0.85)
    assert (v.max_model_len, v.enforce_eager, v.kv_cache_memory_bytes, v.cpu_threads_bind) == \
        (4096, False, 1 << 30, "0-3|4-7")
    assert load_config(_yaml(tmp_path, tiny_dir, {})).server.vllm == VllmSpec()  # defaults: TP 1, eager


@pytest.mark.parametrize("vllm, field", [
    ({"tensor_parallel_size": 0}, "server.vllm.tensor_parallel_size"),
    ({"pipeline_parallel_size": "two"}, "server.vllm.pipeline_parallel_size"),
    ({"distributed_executor_backend": "slurm"}, "server.vllm.distributed_executor_backend"),
    ({"gpu_memory_utilization": 1.5}, "server.vllm.gpu_memory_utilization"),
    ({"max_model_len": 4}, "server.vllm.max_model_len"),
    ({"kv_cache_memory_bytes": -1}, "server.vllm.kv_cache_memory_bytes"),
    ({"tp": 2}, "server.vllm.tp"),  # a misspelt key is named, not ignored
])
def test_a_bad_value_is_one_line_naming_the_field(tmp_path, tiny_dir, capsys, vllm, field):
    with pytest.raises(ConfigError) as err:
        load_config(_yaml(tmp_path, tiny_dir, vllm))
    assert str(err.value).startswith(field + ":") and "\n" not in str(err.value)
    assert main(["serve", "--config", str(_yaml(tmp_path, tiny_dir, vllm))]) == 2  # the CLI: one line on stderr
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and field in out, out


def test_environment_variables_override_the_file():
    spec = VllmSpec(tensor_parallel_size=2, kv_cache_memory_bytes=100)
    env = {"POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE": "4", "POLICYMIX_VLLM_GPU_MEMORY_UTILIZATION": "0.5",
           "POLICYMIX_VLLM_DISTRIBUTED_EXECUTOR_BACKEND": "mp", "POLICYMIX_VLLM_PIPELINE_PARALLEL_SIZE": ""}
    out = apply_env(spec, env)
    assert (out.tensor_parallel_size, out.gpu_memory_utilization, out.distributed_executor_backend) == (4, 0.5, "mp")
    assert out.kv_cache_memory_bytes == 100 and out.pipeline_parallel_size == 1  # an empty variable is unset
    # the names from before server.vllm keep working; a field's own name wins over the old one
    assert apply_env(spec, {"POLICYMIX_VLLM_KV_CACHE_BYTES": "4096"}).kv_cache_memory_bytes == 4096
    assert apply_env(spec, {"POLICYMIX_VLLM_KV_CACHE_BYTES": "1", "POLICYMIX_VLLM_KV_CACHE_MEMORY_BYTES": "2"}
                     ).kv_cache_memory_bytes == 2
    assert apply_env(spec, {"POLICYMIX_VLLM_COMPILE": "1"}).enforce_eager is False
    assert apply_env(spec, {"POLICYMIX_VLLM_COMPILE": "0"}).enforce_eager is True
    assert VllmSettings.resolve(spec, {"POLICYMIX_VLLM_PIPELINE_PARALLEL_SIZE": "2"}).world_size == 4


@pytest.mark.parametrize("env, var", [
    ({"POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE": "zero"}, "POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE"),
    ({"POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE": "0"}, "POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE"),
    ({"POLICYMIX_VLLM_KV_CACHE_BYTES": "lots"}, "POLICYMIX_VLLM_KV_CACHE_BYTES"),
    ({"POLICYMIX_VLLM_COMPILE": "yes"}, "POLICYMIX_VLLM_COMPILE"),
    ({"POLICYMIX_VLLM_ENFORCE_EAGER": "maybe"}, "POLICYMIX_VLLM_ENFORCE_EAGER"),
])
def test_a_bad_variable_is_one_line_naming_it(env, var):
    with pytest.raises(ConfigError) as err:
        apply_env(VllmSpec(), env)
    assert str(err.value).startswith(var + ":") and "\n" not in str(err.value)


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (the CLI stops earlier)")
@pytest.mark.parametrize("vllm, env, needle", [
    ({}, {"POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE": "-2"}, "POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE"),
    ({"pipeline_parallel_size": 2}, {}, "server.vllm.pipeline_parallel_size"),
])
def test_serve_stops_before_vllm_starts_with_one_line(tmp_path, tiny_dir, capsys, monkeypatch, vllm, env, needle):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert main(["serve", "--config", str(_yaml(tmp_path, tiny_dir, vllm))]) == 2
    out = capsys.readouterr().err
    assert out.count("\n") == 1 and needle in out, out


def test_cpu_workers_get_their_own_cores():
    assert cpu_threads_bind(2, [1, 0]) == "0|1"
    assert cpu_threads_bind(2, [0, 1, 2, 3, 4]) == "0,1|2,3"
    assert cpu_threads_bind(4, [0, 1]) == "nobind"


def test_kv_cache_bytes_are_per_worker(tmp_path):
    """Each worker holds its share of the KV heads (tensor parallel; all of them when there are fewer heads
    than workers: vLLM replicates them) and of the layers (pipeline parallel)."""
    import json

    from policymix.engine.vllm.engine import _kv_bytes_per_token

    # Llama-3-70B's shape: 80 layers, 8 KV heads of 128
    (tmp_path / "config.json").write_text(json.dumps({"num_hidden_layers": 80, "num_attention_heads": 64,
                                                      "num_key_value_heads": 8, "hidden_size": 8192}))
    one = _kv_bytes_per_token(str(tmp_path), 2)
    assert one == 2 * 80 * 8 * 128 * 2  # 320 KiB per token in bfloat16
    assert _kv_bytes_per_token(str(tmp_path), 2, tp=4) * 4 == one
    assert _kv_bytes_per_token(str(tmp_path), 2, tp=16) == one // 8  # one head each, replicated
    assert _kv_bytes_per_token(str(tmp_path), 2, tp=4, pp=2) * 8 == one


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_serve_runs_vllm_at_the_configured_parallel_size(tmp_path, tiny_dir, tiny_registry):
    """`policymix serve --engine vllm` with `server.vllm` from the file (TP 1) and its variable (TP 2): the
    server's engine runs two tensor-parallel workers and answers a mixture as the native engine does."""
    import asyncio
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time

    import httpx
    import psutil

    from policymix.engine.native import NativeEngine
    from policymix.engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({
        "policies": {"base": {"path": str(tiny_dir / "base")}, "dpo": {"path": str(tiny_dir / "dpo")}},
        "server": {"max_num_seqs": 8, "max_model_len": 128, "vllm": {"tensor_parallel_size": 1}}}))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLICYMIX_VLLM_TENSOR_PARALLEL_SIZE": "2",
           "POLICYMIX_CACHE": str(tmp_path / "cache")}
    proc = subprocess.Popen([sys.executable, "-m", "policymix.cli", "serve", "--config", str(cfg), "--engine", "vllm",
                             "--port", str(port), "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    mixture = {"weights": {"base": 1.5, "dpo": -0.5}}
    try:
        end = time.monotonic() + 300
        while True:
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < end, "the vLLM server did not become healthy"
            time.sleep(0.5)
        names = sorted(p.name() for p in psutil.Process(proc.pid).children(recursive=True))
        assert [n for n in names if n.startswith("VLLM::Worker")] == ["VLLM::Worker_TP0", "VLLM::Worker_TP1"]
        r = httpx.post(f"{url}/v1/completions", timeout=120, json={
            "model": "base", "prompt": "Hello world", "max_tokens": 8, "temperature": 0, "ignore_eos": True,
            "mixture": mixture})
        assert r.status_code == 200, r.text
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()

    async def native_text() -> str:
        eng = NativeEngine(tiny_registry)
        await eng.start()
        try:
            req = GenerationRequest("n", "base", eng.compile("base", mixture), Prompt(text="Hello world"),
                                    SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            async for ev in eng.generate(eng.plan(req)):
                if isinstance(ev, RequestDone):
                    return ev.sequences[0].text
        finally:
            await eng.shutdown(1.0)

    assert r.json()["choices"][0]["text"] == asyncio.run(native_text())

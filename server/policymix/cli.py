"""The ``policymix`` command: ``serve`` the OpenAI-compatible API, ``demo`` style mixing in the terminal.

Bad flags and bad configs end with one line naming the flag or field, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from .errors import ConfigError, PolicymixError

log = logging.getLogger("policymix.cli")

EXIT_USAGE = 2
EXIT_ENGINE_DIED = 3


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line instead of argparse's usage block
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


class CliError(Exception):
    """A problem the user can fix (flag, config, missing package): printed as one line, exit 2."""


def _port(value: str) -> int:
    try:
        port = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {value!r}") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is outside 0-65535")
    return port


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {value!r}") from None
    if not 0 <= seconds < float("inf"):
        raise argparse.ArgumentTypeError(f"{value} is not a duration >= 0")
    return seconds


def _weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be numbers separated by commas, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="policymix", description="Serve mixtures of language-model policies behind the OpenAI API.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,demo,sweep,train}")

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API", epilog=SERVE_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       description="Serve the policies of a config file (default: the embedded SmolLM2 styles).")
    # defaults are None here: resolve_settings tells an unset flag from one set to the default value
    s.add_argument("--config", metavar="FILE",
                   help="YAML config (env POLICYMIX_CONFIG; default: the embedded SmolLM2-135M-Instruct styles)")
    s.add_argument("--host", help="address to bind (env POLICYMIX_HOST; default 127.0.0.1)")
    s.add_argument("--port", type=_port, help="port to listen on (env POLICYMIX_PORT; default 8000)")
    s.add_argument("--engine", choices=ENGINES, help="engine (env POLICYMIX_ENGINE; default native)")
    s.add_argument("--api-key", action="append", metavar="KEY",
                   help="accept this key besides the config's server.api_keys (repeatable; env POLICYMIX_API_KEY, "
                   "which --api-key replaces); then /v1/* needs a key")
    s.add_argument("--log-format", choices=["json", "text"], default="json",
                   help="json: one JSON object per line with the request id (default); text: for terminals")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info",
                   help="default info (start and stop lines always show)")
    s.add_argument("--shutdown-timeout", type=_seconds, default=30.0, metavar="SECONDS",
                   help="on SIGTERM/SIGINT, how long running requests may finish before they are ended with "
                   "an error (default 30)")
    s.set_defaults(func=serve)

    d = sub.add_parser("demo", help="print outputs of two policies mixed at several weights",
                       description="Greedy outputs of (1 - w) * A + w * B for each weight w, side by side.")
    d.add_argument("--config", help="YAML config (default: the embedded SmolLM2-135M-Instruct styles)")
    d.add_argument("--pair", nargs=2, metavar=("A", "B"), help="the two policies (default: the first two "
                   "prompted policies of the config)")
    d.add_argument("--weights", type=_weights, default=[0.0, 0.5, 1.0, 1.5, 2.0],
                   help="comma-separated, e.g. 0,0.5,1 (w > 1 extrapolates: B's difference from A amplified)")
    d.add_argument("--prompt", default="Tell me about the weather today.")
    d.add_argument("--max-tokens", type=int, default=48)
    d.set_defaults(func=demo)

    # listed here for --help; main() hands its arguments to policymix.sweep unparsed
    sub.add_parser("sweep", add_help=False, help="reward and KL-to-reference over mixture weights "
                   "(policymix sweep --help)")
    sub.add_parser("train", add_help=False, help="train policies to mix: `policymix train dpo --help`, "
                   "`policymix train arm --help` (needs the lab extra: make install-lab)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    if argv[:1] == ["train"]:
        if argv[1:2] == ["dpo"]:
            from .lab.dpo import main as dpo_main

            return dpo_main(argv[2:])
        if argv[1:2] == ["arm"]:
            from .lab.arm import main as arm_main

            return arm_main(argv[2:])
        print("policymix train: error: the trainer to run is `dpo` or `arm` (policymix train dpo --help)",
              file=sys.stderr)
        return EXIT_USAGE
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ConfigError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"policymix: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE


# ------------------------------------------------------------------------------------------ serve


# Where serve's settings come from; the first that sets one wins: flags > environment > config file > defaults.
ENGINES = ("native", "vllm")
ENV = {"config": "POLICYMIX_CONFIG", "host": "POLICYMIX_HOST", "port": "POLICYMIX_PORT",
       "engine": "POLICYMIX_ENGINE", "api_key": "POLICYMIX_API_KEY"}
DEFAULTS: dict[str, Any] = {"config": None, "host": "127.0.0.1", "port": 8000, "engine": "native", "api_key": ()}
SOURCES = ("flag", "env", "file", "default")

SERVE_EPILOG = """\
settings: each comes from the first of these that sets it
  command-line flags > environment variables > config file > defaults

  flag        environment variable   default
  --config    POLICYMIX_CONFIG       the embedded SmolLM2 styles
  --host      POLICYMIX_HOST         127.0.0.1
  --port      POLICYMIX_PORT         8000
  --engine    POLICYMIX_ENGINE       native
  --api-key   POLICYMIX_API_KEY      none (then only the config's server.api_keys, if any)

An empty environment variable counts as unset. Prefer POLICYMIX_API_KEY to --api-key: command
lines are visible to every user of the host. Everything else (server.max_num_seqs, guard bounds,
key scopes, server.log_prompts, ...) is set in the config file only.

SIGTERM or SIGINT: new requests get 503, running ones finish within --shutdown-timeout (then
they are ended with an error event), and the server exits 0. A second signal stops at once.
"""


@dataclass(frozen=True)
class Setting:
    value: Any
    source: str  # one of SOURCES


def env_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The POLICYMIX_* variables that are set, as strings (an empty one is unset); parsed once they win."""
    return {name: environ[var] for name, var in ENV.items() if environ.get(var)}


def _from_env(name: str, raw: str) -> Any:
    """An environment value checked like its flag; a CliError names the variable."""
    var = ENV[name]
    if name == "port":
        try:
            return _port(raw)
        except argparse.ArgumentTypeError as err:
            raise CliError(f"{var}: {err}") from None
    if name == "engine" and raw not in ENGINES:
        raise CliError(f"{var}: invalid engine {raw!r} (choose from {', '.join(ENGINES)})")
    return (raw,) if name == "api_key" else raw


def flag_settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = getattr(args, "api_key", None)
    if keys is not None and not all(keys):
        raise CliError("--api-key must not be empty")
    return {"config": args.config, "host": args.host, "port": args.port, "engine": args.engine,
            "api_key": tuple(keys) if keys else None}


def file_settings(config) -> dict[str, Any]:
    """What the config file sets of host, port and engine (``server.host``, ``server.port``, ``server.engine``)."""
    server = config.server
    return {k: getattr(server, k) for k in ("host", "port", "engine") if k in server.model_fields_set}


def resolve_settings(flags: Mapping[str, Any], env: Mapping[str, str],
                     file: Mapping[str, Any] | None = None) -> dict[str, Setting]:
    """Each setting from the first layer that sets it (None is unset): flags, env, file, defaults."""
    layers = (("flag", flags), ("env", env), ("file", file or {}))
    out = {}
    for name, default in DEFAULTS.items():
        found = next((Setting(values[name], source) for source, values in layers if values.get(name) is not None),
                     Setting(default, "default"))
        if found.source == "env":  # checked only when it wins: a flag overrides a bad variable
            found = Setting(_from_env(name, found.value), "env")
        out[name] = found
    return out


def _load_config(path: str | None):
    from .config import load_config

    if path:
        return load_config(path)
    from .embedded import default_config

    return default_config(progress=lambda msg: print(msg, flush=True))


def make_engine(kind: str, config) -> Any:
    """Load every policy (blocking, with progress) into the chosen engine."""
    if kind == "vllm":
        if config.server.speculative is not None:
            raise CliError("server.speculative: speculative decoding of mixtures runs on --engine native only")
        try:
            from .engine.vllm import VllmEngine
        except ImportError as err:
            raise CliError(f"--engine vllm is not available here ({err}); install vllm or use --engine native") \
                from None
        return VllmEngine.from_config(config, progress=True)
    from .engine.native import NativeEngine

    try:
        return NativeEngine.from_config(config, progress=True)
    except (OSError, ValueError) as err:  # a model folder that transformers cannot read
        raise CliError(f"could not load the policies: {err}") from None


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(args: argparse.Namespace) -> int:
    # SIGTERM while the policies load ends the process like Ctrl-C; once serving, uvicorn's handlers drain
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _serve(args)
    except KeyboardInterrupt:
        log.info("interrupted before serving")
        return 0
    finally:
        signal.signal(signal.SIGTERM, previous)
        from .logs import reset_logging

        reset_logging()


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import build_app
    from .api.auth import hash_key
    from .api.lifecycle import UNWIND_S, GracefulServer, Lifecycle
    from .config import ApiKeySpec
    from .logs import configure_logging, prints_as_logs

    configure_logging(args.log_format, args.log_level)
    log.setLevel(min(logging.INFO, logging.getLogger().level))  # start and stop lines show at any --log-level
    flags, env = flag_settings(args), env_settings(os.environ)
    path = resolve_settings(flags, env)["config"]
    progress = logging.getLogger("policymix.registry")  # loading progress is printed: make it log lines
    with prints_as_logs(progress):
        config = _load_config(path.value)
    settings = resolve_settings(flags, env, file_settings(config))
    configure_logging(args.log_format, args.log_level, log_prompts=config.server.log_prompts)
    keys = settings["api_key"]
    for i, key in enumerate(keys.value):
        name = f"cli-{i}" if keys.source == "flag" else "env"
        config.server.api_keys.append(ApiKeySpec(key_sha256=hash_key(key), name=name))
    with prints_as_logs(progress):
        engine = make_engine(settings["engine"].value, config)
    host, port = settings["host"].value, settings["port"].value
    lifecycle = Lifecycle()
    app = build_app(engine, config, env={}, shutdown_s=args.shutdown_timeout, lifecycle=lifecycle)
    server = GracefulServer(uvicorn.Config(app, host=host, port=port, log_config=None, access_log=False,
                                           log_level=args.log_level, timeout_graceful_shutdown=UNWIND_S),
                            lifecycle, args.shutdown_timeout)
    fatal: list[str] = []

    def on_fatal(message: str) -> None:  # the engine loop died: stop so that a supervisor restarts us
        fatal.append(message)
        server.should_exit = True

    if hasattr(engine, "on_fatal"):
        engine.on_fatal = on_fatal
    log.info("serving %d policies and %d mixtures on http://%s:%d", len(config.policies), len(config.mixtures),
             host, port, extra={"host": host, "port": port, "engine": settings["engine"].value,
                                "settings_from": {k: v.source for k, v in settings.items()}})
    server.run()
    if fatal:
        print(f"policymix: the engine stopped: {fatal[0]}", file=sys.stderr)
        return EXIT_ENGINE_DIED
    if server.started:
        log.info("stopped")
        return 0
    return 1


# ------------------------------------------------------------------------------------------- demo


def _default_pair(config) -> tuple[str, str]:
    prompted = [n for n, p in config.policies.items() if p.system_prompt and p.kind == "causal"]
    causal = [n for n, p in config.policies.items() if p.kind == "causal"]
    pool = prompted if len(prompted) >= 2 else causal
    if len(pool) < 2:
        raise CliError("demo needs two policies: pass --pair A B")
    return pool[0], pool[1]


async def _demo_outputs(engine, a: str, b: str, weights: list[float], prompt: str, max_tokens: int) -> list[str]:
    """One greedy completion per weight, all submitted at once (they share the engine's batches)."""
    from .engine.protocol import GenerationRequest, Prompt, RequestDone, SamplingParams

    tok = engine.tokenizer(a)
    chat = bool(getattr(tok, "chat_template", None))
    p = Prompt(messages=[{"role": "user", "content": prompt}]) if chat else Prompt(text=prompt)

    async def one(i: int, w: float) -> str:
        recipe = engine.compile(a, {"weights": {a: 1.0 - w, b: w}})
        req = GenerationRequest(f"demo-{i}", a, recipe, p, SamplingParams(max_tokens=max_tokens, temperature=0.0))
        async for ev in engine.generate(engine.plan(req)):
            if isinstance(ev, RequestDone):
                if ev.error:
                    return f"(failed: {ev.error})"
                return ev.sequences[0].text
        return ""

    await engine.start()
    try:
        return await asyncio.gather(*(one(i, w) for i, w in enumerate(weights)))
    finally:
        await engine.shutdown(5.0)


def demo(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    a, b = args.pair or _default_pair(config)
    for name in (a, b):
        if name not in config.policies:
            raise CliError(f"--pair: unknown policy {name!r} (choose from {', '.join(config.policies)})")
    if args.max_tokens < 1:
        raise CliError("--max-tokens must be >= 1")
    if not args.weights:
        raise CliError("--weights: give at least one weight")
    engine = make_engine("native", config)
    try:
        outputs = asyncio.run(_demo_outputs(engine, a, b, args.weights, args.prompt, args.max_tokens))
    except PolicymixError as err:
        raise CliError(err.message) from None
    print(f"\nprompt: {args.prompt}\nmixture: (1 - w) * {a} + w * {b}   (greedy, {args.max_tokens} tokens; "
          f"w > 1 pushes past {b}, away from {a})\n")
    for w, text in zip(args.weights, outputs):
        label = f"w={w:<5g}"
        body = textwrap.fill(" ".join(text.split()) or "(empty)", width=88, initial_indent=label + " | ",
                             subsequent_indent=" " * len(label) + " | ")
        print(body + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

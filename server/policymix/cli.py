"""The ``policymix`` command: ``serve`` the OpenAI-compatible API, ``demo`` style mixing in the terminal.

Bad flags and bad configs end with one line naming the flag or field, and exit status 2.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
import textwrap
from typing import Any, Sequence

from .errors import ConfigError, PolicymixError

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


def _weights(value: str) -> list[float]:
    try:
        return [float(w) for w in value.split(",") if w.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"weights must be numbers separated by commas, got {value!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="policymix", description="Serve mixtures of language-model policies behind the OpenAI API.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{serve,demo,sweep}")

    s = sub.add_parser("serve", help="serve the OpenAI-compatible API",
                       description="Serve the policies of a config file (default: the embedded SmolLM2 styles).")
    s.add_argument("--config", help="YAML config (default: the embedded SmolLM2-135M-Instruct styles)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=_port, default=8000)
    s.add_argument("--engine", choices=["native", "vllm"], default="native")
    s.add_argument("--api-key", action="append", default=[], metavar="KEY",
                   help="accept this key (repeatable; also POLICYMIX_API_KEY); then /v1/* needs one")
    s.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")
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
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["sweep"]:
        from .sweep import main as sweep_main

        return sweep_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CliError, ConfigError) as err:
        kind = "config error" if isinstance(err, ConfigError) else "error"
        print(f"policymix: {kind}: {err}", file=sys.stderr)
        return EXIT_USAGE


# ------------------------------------------------------------------------------------------ serve


def _load_config(path: str | None):
    from .config import load_config

    if path:
        return load_config(path)
    from .embedded import default_config

    return default_config(progress=lambda msg: print(msg, flush=True))


def make_engine(kind: str, config) -> Any:
    """Load every policy (blocking, with progress) into the chosen engine."""
    if kind == "vllm":
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
    import uvicorn

    from .api.app import build_app
    from .api.auth import hash_key
    from .config import ApiKeySpec

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    config = _load_config(args.config)
    for i, key in enumerate(args.api_key):
        if not key:
            raise CliError("--api-key must not be empty")
        config.server.api_keys.append(ApiKeySpec(key_sha256=hash_key(key), name=f"cli-{i}"))
    engine = make_engine(args.engine, config)
    server = uvicorn.Server(uvicorn.Config(build_app(engine, config), host=args.host, port=args.port,
                                           log_level=args.log_level, timeout_graceful_shutdown=30))
    fatal: list[str] = []

    def on_fatal(message: str) -> None:  # the engine loop died: stop so that a supervisor restarts us
        fatal.append(message)
        server.should_exit = True

    if hasattr(engine, "on_fatal"):
        engine.on_fatal = on_fatal
    print(f"policymix: serving {len(config.policies)} policies and {len(config.mixtures)} mixtures on "
          f"http://{args.host}:{args.port}", flush=True)
    # uvicorn drains requests on SIGINT/SIGTERM, then re-raises the signal: end quietly with 0 then
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, previous)
    if fatal:
        print(f"policymix: the engine stopped: {fatal[0]}", file=sys.stderr)
        return EXIT_ENGINE_DIED
    return 0 if server.started else 1


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
        async for ev in engine.generate(req):
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

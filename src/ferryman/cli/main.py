"""The ``ferryman`` command: ``serve``, ``check`` and ``version``.

Owns: argument parsing, logging set-up, choosing the event loop (uvloop), raising the
open-file limit, and exit codes (0 ok, 1 runtime failure, 2 invalid configuration or usage).

Must not: contain gateway logic; it calls :mod:`ferryman.config` and :class:`ferryman.app.Gateway`.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import sys
from collections.abc import Sequence

import uvloop

from ferryman import __version__, logs
from ferryman.config.load import load_config
from ferryman.config.model import Config
from ferryman.errors import ConfigError

logger = logging.getLogger("ferryman.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferryman",
        description="Identity-aware gateway for TCP services and PostgreSQL.",
        epilog='Documentation: README.md in the source tree (its "Configuration reference").',
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser(
        "serve",
        help="run the gateway",
        description="Run the gateway until SIGTERM/SIGINT. "
        "SIGHUP re-reads the configuration and policy files and applies the difference.",
    )
    serve.add_argument(
        "-c", "--config", metavar="FILE", help="TOML configuration (default: embedded defaults)"
    )
    serve.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override log_level"
    )
    relay = serve.add_mutually_exclusive_group()
    relay.add_argument(
        "--splice",
        action="store_true",
        help="move bulk plaintext data with splice(2) instead of copying it: less gateway CPU "
        "per GB, but slower for peers on the same host (bench/README.md)",
    )
    relay.add_argument("--no-splice", action="store_true", help="copy bulk data (the default)")

    check = sub.add_parser(
        "check",
        help="validate a configuration and its policy file, start nothing",
        description="Validate FILE and the policy file it names; print problems with "
        "file, line and key. Exit status 0 when valid, 2 otherwise.",
    )
    check.add_argument("-c", "--config", metavar="FILE", required=True, help="TOML configuration to check")

    sub.add_parser("version", help="print the version")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "version":
        print(f"ferryman {__version__}")
        return 0
    if args.command == "check":
        return _check(args.config)
    if args.command == "serve":
        return _serve(args.config, args.log_level, splice=args.splice)
    parser.print_help()
    return 2


def _check(path: str) -> int:
    from ferryman.app import read_policy

    try:
        config = load_config(path)
        policy = read_policy(config, log_warnings=False)
    except ConfigError as exc:
        print(f"invalid: {exc}", file=sys.stderr)
        return 2
    for warning in policy.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"ok: {path}: {len(config.listeners)} listener(s), {len(policy.rules)} grant rule(s)")
    return 0


def _raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def _serve(path: str | None, log_level: str | None, *, splice: bool) -> int:
    logs.setup("info")
    try:
        config = load_config(path) if path else Config()
    except ConfigError as exc:
        logger.error("invalid configuration: %s", exc)
        return 2
    logs.setup(log_level or config.log_level, config.log_format)
    if path is None:
        logger.info("no configuration file given: running on embedded defaults (no listeners)")
    _raise_fd_limit()
    try:
        return uvloop.run(_run(config, path, splice))
    except KeyboardInterrupt:
        return 1


async def _run(config: Config, path: str | None, splice: bool) -> int:
    from ferryman.app import Gateway

    gateway = Gateway(config, config_path=path, splice=splice)
    try:
        await gateway.start()
    except ConfigError as exc:
        logger.error("cannot start: %s", exc)
        await gateway.shutdown(0)
        return 2
    # Everything loaded so far lives as long as the process: keep it out of GC passes, and let
    # the young generation grow (each connection allocates a few hundred short-lived objects).
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)
    await gateway.serve_forever()
    logger.info("ferryman stopped")
    return 0

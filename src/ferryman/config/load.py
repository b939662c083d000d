"""Load a TOML configuration file into a validated :class:`Config`.

Owns: reading the file, ``${VAR}`` expansion from the environment (a missing variable is an
error naming it and its line; ``$${VAR}`` writes a literal ``${VAR}``), resolving relative paths
against the file's directory, and turning every validation problem into a
:class:`~ferryman.errors.ConfigError` that names file, line and key.

Must not: start anything or keep state; ``ferryman check`` and SIGHUP reloads call it freely.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from ferryman.config.locate import KeyPath, key_lines, line_for, render_path
from ferryman.config.model import Config
from ferryman.errors import ConfigError, ConfigErrors

_VAR = re.compile(r"\$(\$?)\{([A-Za-z_][A-Za-z0-9_]*)\}")


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Config:
    """Read and validate ``path``. Raises :class:`ConfigError` (or :class:`ConfigErrors`)."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read configuration: {exc.strerror or exc}", file=str(file)) from exc
    return load_config_text(text, file=str(file), env=env, base_dir=file.parent)


def load_config_text(
    text: str,
    *,
    file: str = "<config>",
    env: Mapping[str, str] | None = None,
    base_dir: Path | None = None,
) -> Config:
    """Validate configuration ``text``; ``file`` is only used in messages."""
    env = os.environ if env is None else env
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        line = _toml_error_line(str(exc))
        raise ConfigError(f"not valid TOML: {exc}", file=file, line=line) from exc
    lines = key_lines(text)
    errors: list[ConfigError] = []
    data = _expand(raw, (), env, lines, file, errors)
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    if base_dir is not None and isinstance(data, dict):
        _resolve_paths(data, base_dir)
    try:
        return Config.model_validate(data)
    except ValidationError as exc:
        raise _translate(exc, lines, file) from None


def _expand(
    value: Any,
    path: KeyPath,
    env: Mapping[str, str],
    lines: dict[KeyPath, int],
    file: str,
    errors: list[ConfigError],
) -> Any:
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            if match.group(1):
                return "${" + match.group(2) + "}"
            name = match.group(2)
            if name not in env:
                errors.append(
                    ConfigError(
                        f"environment variable {name} is not set",
                        file=file,
                        line=line_for(lines, path),
                        key=render_path(path),
                    )
                )
                return ""
            return env[name]

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, (*path, k), env, lines, file, errors) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, (*path, i), env, lines, file, errors) for i, v in enumerate(value)]
    return value


_PATH_KEYS = {"policy_file", "file", "cert_file", "key_file", "ca_file", "client_ca_file", "backend_ca_file"}


def _resolve_paths(data: dict[str, Any], base: Path) -> None:
    """Relative file paths in the config are relative to the config file, not the cwd."""
    for key, value in data.items():
        if key in _PATH_KEYS and isinstance(value, str) and value not in ("", "-"):
            if not os.path.isabs(value):
                data[key] = str(base / value)
        elif isinstance(value, dict):
            _resolve_paths(value, base)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, dict):
                    _resolve_paths(item, base)


def _translate(exc: ValidationError, lines: dict[KeyPath, int], file: str) -> ConfigError:
    out: list[ConfigError] = []
    for error in exc.errors(include_url=False):
        loc: KeyPath = tuple(error["loc"])
        message = str(error["msg"])
        kind = error["type"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        if message.startswith("@"):
            # A cross-field check named its own key path ("@listeners.1.name: ...").
            target, _, message = message[1:].partition(": ")
            loc = tuple(int(p) if p.isdigit() else p for p in target.split("."))
        # Pydantic reports a union/literal failure once per branch; the key path is what helps.
        loc = tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-"))))
        if kind == "extra_forbidden":
            message = "unknown key"
        elif kind == "missing":
            message = "required key is missing"
        elif kind == "literal_error" and "input" in error:
            message = f"{message}, got {error['input']!r}"
        out.append(ConfigError(message, file=file, line=line_for(lines, loc), key=render_path(loc)))
    unique: list[ConfigError] = []
    for item in out:
        if all(str(item) != str(u) for u in unique):
            unique.append(item)
    return unique[0] if len(unique) == 1 else ConfigErrors(unique)


def _toml_error_line(message: str) -> int | None:
    match = re.search(r"line (\d+)", message)
    return int(match.group(1)) if match else None

"""Configuration loading: every error names file, line and key; nothing is silently accepted."""

import subprocess
import sys
from pathlib import Path

import pytest

from ferryman.config.load import load_config, load_config_text
from ferryman.errors import ConfigError

BASE = """\
log_level = "info"
[[identity.static]]
cidr = "127.0.0.0/8"
user = "dev@localhost"

[[listeners]]
name = "redis"
listen = "127.0.0.1:7000"
backend = "127.0.0.1:6379"
"""


def error_of(text: str, env: dict[str, str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config_text(text, file="gw.toml", env=env or {})
    return str(info.value)


def test_valid_config_and_defaults() -> None:
    config = load_config_text(BASE, env={})
    (listener,) = config.listeners
    assert listener.mode == "tcp"
    assert listener.backend_address == ("127.0.0.1", 6379)
    assert listener.idle_timeout == 0
    assert config.revalidation.interval == 60
    assert config.sources_for(listener) == ("static",)


def test_unknown_key_names_key_and_line() -> None:
    text = BASE + 'bakend = "x:1"\n'
    assert error_of(text) == "gw.toml:10: listeners[0].bakend: unknown key"


def test_unknown_top_level_section() -> None:
    assert error_of('[admn]\nlisten = "127.0.0.1:1"\n') == "gw.toml:1: admn: unknown key"


def test_wrong_type_names_key_and_line() -> None:
    text = BASE.replace('log_level = "info"', 'log_level = "loud"')
    message = error_of(text)
    assert message.startswith("gw.toml:1: log_level: ")
    assert "'loud'" in message


def test_bad_duration_names_key_and_line() -> None:
    message = error_of(BASE + 'idle_timeout = "5 minutes"\n')
    assert message.startswith("gw.toml:10: listeners[0].idle_timeout: not a duration")


def test_missing_required_key() -> None:
    text = BASE.replace('backend = "127.0.0.1:6379"\n', "")
    assert error_of(text) == (
        "gw.toml:6: listeners[0].backend: required (or give rules, or sni.forwards_to with "
        "sni.forward_if_no_match = true)"
    )
    text = BASE.replace('name = "redis"\n', "")
    assert error_of(text) == "gw.toml:6: listeners[0].name: required key is missing"


def test_duplicate_listener_name() -> None:
    text = BASE + '\n[[listeners]]\nname = "redis"\nlisten = "127.0.0.1:7001"\nbackend = "127.0.0.1:1"\n'
    message = error_of(text)
    assert message.startswith("gw.toml:12: listeners[1].name: duplicate listener name 'redis'")


@pytest.mark.parametrize("listen", ["127.0.0.1:7000", ":7000"])
def test_two_listeners_on_one_address(listen: str) -> None:
    text = BASE + f'\n[[listeners]]\nname = "other"\nlisten = "{listen}"\nbackend = "127.0.0.1:1"\n'
    message = error_of(text)
    assert message.startswith("gw.toml:13: listeners[1].listen: ")
    assert "already used by listeners[0] (redis)" in message


def test_missing_environment_variable_names_variable_and_line() -> None:
    text = BASE + '\n[admin]\ntoken = "${FERRYMAN_ADMIN_TOKEN}"\n'
    assert error_of(text) == "gw.toml:12: admin.token: environment variable FERRYMAN_ADMIN_TOKEN is not set"


def test_environment_expansion_and_escape() -> None:
    text = BASE + '\n[admin]\ntoken = "${TOK}"\n[audit]\nfile = "/tmp/$${NOT_EXPANDED}"\n'
    config = load_config_text(text, env={"TOK": "s3cret"})
    assert config.admin.token == "s3cret"
    assert config.audit.file == "/tmp/${NOT_EXPANDED}"
    assert "s3cret" not in repr(config.admin)


def test_identity_source_must_be_configured() -> None:
    message = error_of(BASE + 'identity = ["tailscale"]\n')
    assert message.startswith("gw.toml:10: listeners[0].identity: ")
    assert "'tailscale'" in message


TCP_MTLS = 'client_ca_file = "clients-ca.pem"\nclient_auth = "{auth}"\n'


@pytest.mark.parametrize("auth", ["want", "need"])
@pytest.mark.parametrize("tls", [None, "disabled", "passthrough"])
def test_client_auth_needs_tls_terminated_on_tcp_listeners(tls: str | None, auth: str) -> None:
    """Where the gateway terminates no TLS no certificate is ever asked for: a plaintext
    client would reach the backend, so the combination is refused, not silently ignored."""
    text = BASE + (f'tls = "{tls}"\n' if tls else "") + TCP_MTLS.format(auth=auth)
    line = 12 if tls else 11
    assert error_of(text) == (
        f'gw.toml:{line}: listeners[0].client_auth: "{auth}" needs tls = "enabled" '
        f'(with tls = "{tls or "disabled"}" the gateway terminates no TLS, so no client '
        "certificate would ever be checked)"
    )


def test_client_auth_with_terminated_tls_on_tcp_listener_is_valid() -> None:
    text = BASE + 'tls = "enabled"\ncert_file = "c.pem"\nkey_file = "k.pem"\n' + TCP_MTLS.format(auth="need")
    (listener,) = load_config_text(text, env={}).listeners
    assert (listener.tls, listener.client_auth) == ("enabled", "need")


def postgres_listener(tls_mode: str, auth: str) -> str:
    return (
        BASE
        + '\n[[listeners]]\nname = "pg"\nlisten = "127.0.0.1:7001"\nmode = "postgres"\n'
        + 'backend = "127.0.0.1:5432"\ncert_file = "c.pem"\nkey_file = "k.pem"\n'
        + f'tls_mode = "{tls_mode}"\n'
        + TCP_MTLS.format(auth=auth)
        + '[listeners.postgres]\nadmin_user = "ferryman_admin"\n'
    )


NO_TLS = "the gateway terminates no TLS, so no client certificate would ever be checked)"


@pytest.mark.parametrize(
    ("tls_mode", "auth", "expected"),
    [
        ("off", "want", f'needs tls_mode = "optional" or "require" (with tls_mode = "off" {NO_TLS}'),
        ("off", "need", f'needs tls_mode = "require" (with tls_mode = "off" {NO_TLS}'),
        (
            "optional",
            "need",
            'needs tls_mode = "require" (with tls_mode = "optional" a plaintext client would skip '
            "the certificate check)",
        ),
    ],
)
def test_client_auth_on_postgres_listeners_needs_tls_every_client_must_use(
    tls_mode: str, auth: str, expected: str
) -> None:
    message = error_of(postgres_listener(tls_mode, auth))
    assert message == f'gw.toml:20: listeners[1].client_auth: "{auth}" {expected}'


@pytest.mark.parametrize(
    ("tls_mode", "auth"), [("optional", "want"), ("require", "want"), ("require", "need")]
)
def test_client_auth_on_postgres_listeners_with_tls(tls_mode: str, auth: str) -> None:
    listener = load_config_text(postgres_listener(tls_mode, auth), env={}).listeners[1]
    assert (listener.tls_mode, listener.client_auth) == (tls_mode, auth)


def test_several_errors_reported_together() -> None:
    message = error_of(BASE + 'bakend = "x:1"\nidle_timeout = "soon"\n')
    assert "listeners[0].bakend: unknown key" in message
    assert "listeners[0].idle_timeout" in message


def test_toml_syntax_error_has_line() -> None:
    assert error_of('log_level = "info"\nlisteners = [\n').startswith("gw.toml:")


def test_bad_address() -> None:
    assert "port" in error_of(BASE.replace("127.0.0.1:7000", "127.0.0.1"))


def test_relative_paths_resolve_against_config_dir(tmp_path: Path) -> None:
    (tmp_path / "gw.toml").write_text('policy_file = "p.json"\n' + BASE)
    config = load_config(tmp_path / "gw.toml")
    assert config.policy_file == str(tmp_path / "p.json")


def run_check(tmp_path: Path, config: str, policy: str | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "gw.toml").write_text(config)
    if policy is not None:
        (tmp_path / "policy.json").write_text(policy)
    return subprocess.run(
        [sys.executable, "-m", "ferryman", "check", "-c", str(tmp_path / "gw.toml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_check_command_accepts_valid_config(tmp_path: Path) -> None:
    result = run_check(tmp_path, 'policy_file = "policy.json"\n' + BASE, '{"grants": [] /* none yet */,}')
    assert result.returncode == 0, result.stderr
    assert "1 listener(s)" in result.stdout


def test_check_command_prints_each_warning_once(tmp_path: Path) -> None:
    policy = (
        '{"grants": [{"src": ["*"], "app": {"ferryman.dev/cap/ferryman": [{"backends": {"nope": {}}}]}}]}'
    )
    result = run_check(tmp_path, 'policy_file = "policy.json"\n' + BASE, policy)
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if "nope" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: "), result.stderr


def test_forwards_to_without_forward_if_no_match_does_not_replace_backend() -> None:
    """``sni.forwards_to`` is only used with ``forward_if_no_match``: on its own it would leave a
    listener that refuses every connection, so it does not make ``backend`` optional."""
    no_backend = BASE.replace('backend = "127.0.0.1:6379"\n', "")
    sni = 'sni = { forward_if_no_match = %s, forwards_to = { host = "127.0.0.1", port = 6379 } }\n'
    assert error_of(no_backend + sni % "false").startswith("gw.toml:6: listeners[0].backend: required")
    assert load_config_text(no_backend + sni % "true", file="gw.toml", env={}).listeners[0].routes_by_name


def test_check_command_rejects_with_location(tmp_path: Path) -> None:
    result = run_check(tmp_path, BASE + "bakend = 1\n")
    assert result.returncode == 2
    assert "gw.toml:10: listeners[0].bakend: unknown key" in result.stderr


@pytest.mark.parametrize("tls", ["disabled", "passthrough"])
def test_check_command_rejects_client_auth_without_tls(tmp_path: Path, tls: str) -> None:
    result = run_check(tmp_path, BASE + f'tls = "{tls}"\n' + TCP_MTLS.format(auth="need"))
    assert result.returncode == 2
    assert 'gw.toml:12: listeners[0].client_auth: "need" needs tls = "enabled"' in result.stderr


def test_check_warns_about_grant_naming_no_listener(tmp_path: Path) -> None:
    policy = (
        '{"grants": [{"src": ["*"], "app": {"ferryman.dev/cap/ferryman": [{"backends": {"nope": {}}}]}}]}'
    )
    result = run_check(tmp_path, 'policy_file = "policy.json"\n' + BASE, policy)
    assert result.returncode == 0
    assert "names no configured listener: 'nope'" in result.stderr


def test_check_rejects_bad_policy(tmp_path: Path) -> None:
    policy = (
        '{"grants": [{"src": ["*"], "app": {"ferryman.dev/cap/ferryman": '
        '[{"backends": {"redis": {"limits": {"max_conns": "many"}}}}]}}]}'
    )
    result = run_check(tmp_path, 'policy_file = "policy.json"\n' + BASE, policy)
    assert result.returncode == 2
    assert "backends.redis.limits.max_conns" in result.stderr


def test_help_lists_subcommands() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ferryman", "--help"], capture_output=True, text=True, check=True
    )
    for command in ("serve", "check", "version"):
        assert command in result.stdout


def test_readme_examples_are_valid_configuration() -> None:
    """Every TOML block in the README must load (documentation that cannot drift)."""
    import re

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    blocks = re.findall(r"```toml\n(.*?)```", readme, re.DOTALL)
    assert len(blocks) >= 2
    for block in blocks:
        text = block
        if "[[listeners]]" in text and "[[identity.static]]" not in text:
            text = '[[identity.static]]\ncidr = "10.0.0.0/8"\nuser = "x"\n' + text
        load_config_text(text, file="README.md", env={"FERRYMAN_ADMIN_TOKEN": "t", "PG_ADMIN_PASSWORD": "p"})


@pytest.mark.parametrize("listen", ["0.0.0.0:9180", ":9180", "10.1.2.3:9180", "admin.example.com:9180"])
def test_admin_listener_reachable_from_elsewhere_needs_a_token(listen: str) -> None:
    text = BASE + f'[admin]\nlisten = "{listen}"\n'
    assert error_of(text) == (
        f"gw.toml:11: admin.listen: {listen!r} is reachable from other machines: set [admin] token "
        '(e.g. token = "${FERRYMAN_ADMIN_TOKEN}") or listen on a loopback address'
    )


@pytest.mark.parametrize(
    ("listen", "token"),
    [
        ("127.0.0.1:9180", None),
        ("[::1]:9180", None),
        ("localhost:9180", None),
        ("off", None),
        (":9180", "s3"),
    ],
)
def test_admin_listener_on_loopback_off_or_with_token(listen: str, token: str | None) -> None:
    text = BASE + f'[admin]\nlisten = "{listen}"\n' + (f'token = "{token}"\n' if token else "")
    assert load_config_text(text, env={}).admin.listen == listen

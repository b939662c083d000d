"""Statement text and the raw-grant validator: pure (no server)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from datetime import UTC, datetime

import pytest

from ferryman.provision import statements as st
from ferryman.provision.statements import RawSqlRejected, validate_raw_grant


def text(stmt: st.Statement) -> str:
    return stmt.as_string(None)


def test_identifiers_are_always_quoted() -> None:
    evil = 'alice"; DROP ROLE x; --'
    assert text(st.grant_membership("grp", evil)) == 'GRANT "grp" TO "alice""; DROP ROLE x; --"'
    assert text(st.grant_connect('my "db"', "r")) == 'GRANT CONNECT ON DATABASE "my ""db""" TO "r"'
    stmts = [text(s) for s in st.preset_grants("readwrite", "we ird", "g")]
    assert stmts == [
        'GRANT USAGE ON SCHEMA "we ird" TO "g"',
        'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "we ird" TO "g"',
        'GRANT SELECT, USAGE ON ALL SEQUENCES IN SCHEMA "we ird" TO "g"',
    ]
    admin_schema = text(st.preset_grants("admin", "s", "g")[0])
    assert admin_schema == 'GRANT USAGE, CREATE ON SCHEMA "s" TO "g"'


def test_create_login_spells_out_every_attribute() -> None:
    until = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    create, member = st.create_login("r", marker="fm_managed", secret="SCRAM-SHA-256$x", valid_until=until)
    assert text(create) == (
        'CREATE ROLE "r" WITH LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS '
        "PASSWORD 'SCRAM-SHA-256$x' VALID UNTIL '2030-01-02T03:04:05+00:00'"
    )
    assert text(member) == 'GRANT "fm_managed" TO "r"'
    crdb, _ = st.create_login("r", marker="m", secret="s", valid_until=until, cockroach=True)
    assert text(crdb).startswith('CREATE ROLE "r" WITH LOGIN PASSWORD')


def test_scram_secret_matches_rfc_5802_derivation() -> None:
    salt = bytes(range(16))
    secret = st.scram_secret("pencil", iterations=4096, salt=salt)
    head, keys = secret.split("$", 1)[1].split("$")
    assert head == "4096:" + base64.b64encode(salt).decode()
    stored_b64, server_b64 = keys.split(":")
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", salt, 4096)
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    assert base64.b64decode(stored_b64) == hashlib.sha256(client_key).digest()
    assert base64.b64decode(server_b64) == hmac.new(salted, b"Server Key", "sha256").digest()
    assert st.md5_secret("pw", "role") == "md5" + hashlib.md5(b"pwrole").hexdigest()


ACCEPT = [
    "GRANT SELECT ON reporting.secret TO {{.Role}}",
    "grant select, insert on table public.items to {{ .Role }}",
    "GRANT SELECT (id, name) ON items TO {{.Role}}",
    'GRANT SELECT ON "Weird; --Table" TO {{.Role}}',
    "GRANT USAGE ON SCHEMA reporting TO {{.Role}}",
    "GRANT EXECUTE ON FUNCTION f(int, text[]) TO {{.Role}}",
    "GRANT SELECT ON ALL TABLES IN SCHEMA reporting TO {{.Role}}",
    "REVOKE SELECT ON items FROM {{.Role}}",
    "REVOKE GRANT OPTION FOR SELECT ON items FROM {{.Role}} CASCADE",
    "ALTER DEFAULT PRIVILEGES IN SCHEMA reporting GRANT SELECT ON TABLES TO {{.Role}}",
    "ALTER DEFAULT PRIVILEGES FOR ROLE owner IN SCHEMA s REVOKE SELECT ON TABLES FROM {{.Role}}",
]

REJECT = [
    ("GRANT SELECT ON t TO {{.Role}}; DROP TABLE t", "character ';'"),
    ("GRANT SELECT ON t TO {{.Role}} -- hi", "character '-'"),
    ("GRANT SELECT ON t /* x */ TO {{.Role}}", "character '/'"),
    ("GRANT SELECT ON t TO {{.Role}} WITH GRANT OPTION", "last word"),
    ("GRANT SELECT ON t TO {{.Role}} GRANTED BY postgres", "last word"),
    ("GRANT SELECT ON t TO bob, {{.Role}}", "right after TO"),
    ("GRANT SELECT ON t TO {{.Role}}, bob", "last word"),
    ("GRANT SELECT ON t TO bob", "exactly once"),
    ("GRANT SELECT ON t TO {{.Role}} TO {{.Role}}", "exactly once"),
    ('GRANT SELECT ON "{{.Role}}" TO bob', "last word"),
    ("GRANT postgres TO {{.Role}}", "role memberships"),
    ("GRANT pg_read_all_data TO {{.Role}}", "role memberships"),
    ("ALTER ROLE {{.Role}} SUPERUSER", "only GRANT"),
    ("CREATE TABLE x (a int); GRANT SELECT ON x TO {{.Role}}", "character ';'"),
    ("DO $$ BEGIN END $$ {{.Role}}", "character '$'"),
    ("GRANT SELECT ON E'\\x' TO {{.Role}}", "character"),
    ("REVOKE SELECT ON t FROM {{.Role}} WITH", "last word"),
    ("GRANT SELECT ON t FROM {{.Role}}", "right after TO"),
    ("ALTER DEFAULT PRIVILEGES IN SCHEMA s FOR ROLE {{.Role}}", "without GRANT"),
    ("", "exactly once"),
]


@pytest.mark.parametrize("statement", ACCEPT)
def test_raw_grant_accepted(statement: str) -> None:
    raw = validate_raw_grant(statement)
    rendered = text(raw.render('x"y'))
    assert '"x""y"' in rendered and "{{" not in rendered


@pytest.mark.parametrize(("statement", "why"), REJECT)
def test_raw_grant_rejected(statement: str, why: str) -> None:
    with pytest.raises(RawSqlRejected, match=re.escape(why)):
        validate_raw_grant(statement)


def test_raw_grant_inverse() -> None:
    raw = validate_raw_grant("GRANT SELECT ON reporting.secret TO {{.Role}}")
    inverse = raw.inverse()
    assert inverse is not None
    assert text(inverse.render("r")) == 'REVOKE SELECT ON reporting.secret FROM "r"'
    adp = validate_raw_grant(
        "ALTER DEFAULT PRIVILEGES IN SCHEMA s GRANT SELECT ON TABLES TO {{.Role}}"
    ).inverse()
    assert adp is not None
    assert text(adp.render("r")) == 'ALTER DEFAULT PRIVILEGES IN SCHEMA s REVOKE SELECT ON TABLES FROM "r"'
    assert validate_raw_grant("REVOKE SELECT ON t FROM {{.Role}}").inverse() is None

"""Every SQL statement the provisioner sends, composed with psycopg's ``sql`` module. Pure.

Owns: the text of role DDL (marker, group and login roles), preset object grants and default
privileges, membership changes, the sweeper's REASSIGN/DROP OWNED, the registry table, the
password secrets stored with a role (SCRAM-SHA-256 verifier or MD5 hash, computed here so the
plaintext never appears in SQL text or in the server's statement log), and the validation of
raw ``sql`` grants.

Must not: execute anything, or paste a client/identity/policy string into SQL unquoted: role,
schema and database names go through :class:`psycopg.sql.Identifier`, values through
:class:`psycopg.sql.Literal` (DDL does not take bind parameters). The one exception is a raw
grant's text, which :func:`validate_raw_grant` tokenises and accepts only in a narrow shape.

Preset object grants (SPEC 5.3), held by group roles per (database, schema, preset):

==========  =====================  ==============================  ===================
preset      schema                 tables                          sequences
==========  =====================  ==============================  ===================
readonly    USAGE                  SELECT                          SELECT
readwrite   USAGE                  SELECT, INSERT, UPDATE, DELETE  SELECT, USAGE
admin       USAGE, CREATE          ALL                             ALL
==========  =====================  ==============================  ===================
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from dataclasses import dataclass
from datetime import datetime

from psycopg import sql

Statement = sql.Composed

_SCHEMA_PRIVS = {"readonly": "USAGE", "readwrite": "USAGE", "admin": "USAGE, CREATE"}
_TABLE_PRIVS = {"readonly": "SELECT", "readwrite": "SELECT, INSERT, UPDATE, DELETE", "admin": "ALL"}
_SEQUENCE_PRIVS = {"readonly": "SELECT", "readwrite": "SELECT, USAGE", "admin": "ALL"}

# --- passwords -------------------------------------------------------------------------------


def scram_secret(password: str, *, iterations: int = 4096, salt: bytes | None = None) -> str:
    """The ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`` verifier PostgreSQL stores.

    RFC 5802 section 3 / RFC 7677; PostgreSQL accepts a pre-computed verifier in
    ``PASSWORD '…'`` (docs: CREATE ROLE, "ENCRYPTED"). Passwords we generate are ASCII, so
    SASLprep is the identity and is skipped.
    """
    salt = salt if salt is not None else secrets.token_bytes(16)
    salted = hashlib.pbkdf2_hmac("sha256", password.encode("utf-8"), salt, iterations)
    client_key = hmac.new(salted, b"Client Key", hashlib.sha256).digest()
    stored_key = hashlib.sha256(client_key).digest()
    server_key = hmac.new(salted, b"Server Key", hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.b64encode(raw).decode("ascii")

    return f"SCRAM-SHA-256${iterations}:{b64(salt)}${b64(stored_key)}:{b64(server_key)}"


def md5_secret(password: str, role: str) -> str:
    """``"md5" + md5(password + role)``: the legacy stored form, for md5-only backends."""
    digest = hashlib.md5((password + role).encode("utf-8"), usedforsecurity=False).hexdigest()
    return "md5" + digest


# --- roles -----------------------------------------------------------------------------------


def create_nologin(role: str, *, member_of: str | None = None) -> list[Statement]:
    """A NOLOGIN role (the marker, or a group role made a member of the marker)."""
    out: list[Statement] = [sql.SQL("CREATE ROLE {} WITH NOLOGIN").format(sql.Identifier(role))]
    if member_of is not None:
        out.append(grant_membership(member_of, role))
    return out


def create_login(
    role: str, *, marker: str, secret: str, valid_until: datetime, cockroach: bool = False
) -> list[Statement]:
    """The per-person login role, marked as managed, with its password and expiry.

    PostgreSQL gets every privilege attribute spelt out (a role is never more than a login);
    CockroachDB accepts fewer role options, and membership is granted separately there.
    """
    ident = sql.Identifier(role)
    options = sql.SQL(
        "LOGIN"
        if cockroach
        else "LOGIN INHERIT NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS"
    )
    stmt = sql.SQL("CREATE ROLE {} WITH {} PASSWORD {} VALID UNTIL {}").format(
        ident, options, sql.Literal(secret), sql.Literal(valid_until.isoformat())
    )
    return [stmt, grant_membership(marker, role)]


def alter_login(role: str, *, secret: str | None, valid_until: datetime | None) -> Statement:
    """``ALTER ROLE … WITH LOGIN [PASSWORD …] [VALID UNTIL …]`` (LOGIN undoes a half-done sweep)."""
    parts: list[sql.Composable] = [sql.SQL("ALTER ROLE {} WITH LOGIN").format(sql.Identifier(role))]
    if secret is not None:
        parts.append(sql.SQL("PASSWORD {}").format(sql.Literal(secret)))
    if valid_until is not None:
        parts.append(sql.SQL("VALID UNTIL {}").format(sql.Literal(valid_until.isoformat())))
    return sql.SQL(" ").join(parts)


def set_nologin(role: str, *, login: bool = False) -> Statement:
    return sql.SQL("ALTER ROLE {} WITH {}").format(
        sql.Identifier(role), sql.SQL("LOGIN" if login else "NOLOGIN")
    )


def grant_membership(group: str, member: str) -> Statement:
    return sql.SQL("GRANT {} TO {}").format(sql.Identifier(group), sql.Identifier(member))


def revoke_membership(group: str, member: str) -> Statement:
    return sql.SQL("REVOKE {} FROM {}").format(sql.Identifier(group), sql.Identifier(member))


def grant_connect(database: str, role: str) -> Statement:
    return sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(
        sql.Identifier(database), sql.Identifier(role)
    )


def drop_role(role: str) -> Statement:
    return sql.SQL("DROP ROLE {}").format(sql.Identifier(role))


def reassign_and_drop_owned(role: str, new_owner: str) -> list[Statement]:
    """Run in every database where ``role`` may own objects or hold privileges (docs: DROP ROLE)."""
    return [
        sql.SQL("REASSIGN OWNED BY {} TO {}").format(sql.Identifier(role), sql.Identifier(new_owner)),
        sql.SQL("DROP OWNED BY {}").format(sql.Identifier(role)),
    ]


# --- preset object grants ----------------------------------------------------------------------


def preset_grants(preset: str, schema: str, group: str) -> list[Statement]:
    """Grants that give ``group`` the preset on everything that exists now in ``schema``.

    ``ON ALL TABLES IN SCHEMA`` acts on the *current* database only, so these run on a
    connection to the target database. Re-running them is how tables created since the last
    run (by owners we set no default privileges for) become visible.
    """
    s, g = sql.Identifier(schema), sql.Identifier(group)
    return [
        sql.SQL("GRANT {} ON SCHEMA {} TO {}").format(sql.SQL(_SCHEMA_PRIVS[preset]), s, g),
        sql.SQL("GRANT {} ON ALL TABLES IN SCHEMA {} TO {}").format(sql.SQL(_TABLE_PRIVS[preset]), s, g),
        sql.SQL("GRANT {} ON ALL SEQUENCES IN SCHEMA {} TO {}").format(
            sql.SQL(_SEQUENCE_PRIVS[preset]), s, g
        ),
    ]


def default_privileges(owner: str, preset: str, schema: str, group: str) -> list[Statement]:
    """Objects ``owner`` creates in ``schema`` from now on are granted to ``group`` at once."""
    head = sql.SQL("ALTER DEFAULT PRIVILEGES FOR ROLE {} IN SCHEMA {} GRANT").format(
        sql.Identifier(owner), sql.Identifier(schema)
    )
    g = sql.Identifier(group)
    return [
        sql.SQL("{} {} ON TABLES TO {}").format(head, sql.SQL(_TABLE_PRIVS[preset]), g),
        sql.SQL("{} {} ON SEQUENCES TO {}").format(head, sql.SQL(_SEQUENCE_PRIVS[preset]), g),
    ]


# --- catalog queries (bind parameters are fine in plain SELECTs) ----------------------------------

ROLE_STATE = sql.SQL(
    """
    SELECT r.rolcanlogin, r.rolvaliduntil,
           EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles k ON k.oid = m.roleid
                   WHERE m.member = r.oid AND k.rolname = %(marker)s) AS managed,
           ARRAY(SELECT g.rolname FROM pg_auth_members m JOIN pg_roles g ON g.oid = m.roleid
                 WHERE m.member = r.oid) AS member_of
    FROM pg_roles r WHERE r.rolname = %(role)s
    """
)
GROUPS_STATE = sql.SQL(
    """
    SELECT r.rolname,
           EXISTS (SELECT 1 FROM pg_auth_members m JOIN pg_roles k ON k.oid = m.roleid
                   WHERE m.member = r.oid AND k.rolname = %(marker)s) AS managed
    FROM pg_roles r WHERE r.rolname = ANY(%(groups)s)
    """
)
ROLE_EXISTS = sql.SQL("SELECT 1 FROM pg_roles WHERE rolname = %s")
# pg_catalog.pg_database exists on CockroachDB too (one row per database, same datname).
DATABASE_EXISTS = sql.SQL("SELECT 1 FROM pg_database WHERE datname = %s")
GROUP_MEMBERS = sql.SQL(
    """
    SELECT m.rolname FROM pg_auth_members am
    JOIN pg_roles g ON g.oid = am.roleid JOIN pg_roles m ON m.oid = am.member
    WHERE g.rolname = %s AND m.rolcanlogin
    """
)
SCHEMA_OWNERS = sql.SQL(
    """
    SELECT n.nspname, pg_get_userbyid(n.nspowner),
           pg_get_userbyid((SELECT datdba FROM pg_database WHERE datname = current_database()))
    FROM pg_namespace n WHERE n.nspname = ANY(%s)
    """
)
LIVE_SESSIONS_PG = sql.SQL("SELECT count(*) FROM pg_stat_activity WHERE usename = %s")
LIVE_SESSIONS_CRDB = sql.SQL("SELECT count(*) FROM crdb_internal.cluster_sessions WHERE user_name = %s")
# Databases holding objects owned by, or privileges granted to, a role (dbid 0 = shared objects,
# which DROP OWNED handles from any database).
DEPENDENT_DATABASES = sql.SQL(
    """
    SELECT DISTINCT d.datname FROM pg_shdepend s JOIN pg_database d ON d.oid = s.dbid
    WHERE s.refclassid = 'pg_authid'::regclass
      AND s.refobjid = (SELECT oid FROM pg_roles WHERE rolname = %s)
    """
)
ALL_DATABASES = sql.SQL("SELECT datname FROM pg_database WHERE datallowconn AND NOT datistemplate")


# --- registry table ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Registry:
    """The admin-database table recording every managed login role and when it was last used.

    It survives a gateway restart, is shared by every gateway on the backend, and holds no
    secret: ``key_id`` only says *which* password key derived the current password.
    """

    schema: str = "ferryman"
    table: str = "provisioned_roles"

    @property
    def _name(self) -> sql.Identifier:
        return sql.Identifier(self.schema, self.table)

    def create(self) -> list[Statement]:
        return [
            sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(self.schema)),
            sql.SQL(
                """CREATE TABLE IF NOT EXISTS {} (
                     role text PRIMARY KEY,
                     marker text NOT NULL DEFAULT '',
                     login text NOT NULL,
                     node text NOT NULL,
                     database text NOT NULL,
                     preset_cap text,
                     key_id text,
                     epoch bigint NOT NULL DEFAULT 0,
                     valid_until timestamptz,
                     raw_sql text[] NOT NULL DEFAULT '{{}}',
                     created timestamptz NOT NULL DEFAULT now(),
                     last_used timestamptz NOT NULL DEFAULT now())"""
            ).format(self._name),
            # Managed roles must never read who else is provisioned.
            sql.SQL("REVOKE ALL ON SCHEMA {} FROM PUBLIC").format(sql.Identifier(self.schema)),
        ]

    def select(self, *, for_update: bool = False) -> Statement:
        return sql.SQL(
            "SELECT login, node, database, preset_cap, key_id, epoch, valid_until, raw_sql FROM {} "
            "WHERE role = %s{}"
        ).format(self._name, sql.SQL(" FOR UPDATE" if for_update else ""))

    def reserve(self) -> Statement:
        """Insert a placeholder row so ``FOR UPDATE`` has a row to lock (CockroachDB locking)."""
        return sql.SQL(
            "INSERT INTO {} (role, login, node, database) VALUES (%s, '', '', '') "
            "ON CONFLICT (role) DO NOTHING"
        ).format(self._name)

    def upsert(self) -> Statement:
        return sql.SQL(
            """INSERT INTO {} AS t (role, marker, login, node, database, preset_cap, key_id, epoch,
                                  valid_until, raw_sql, last_used)
               VALUES (%(role)s, %(marker)s, %(login)s, %(node)s, %(database)s, %(preset_cap)s, %(key_id)s,
                       %(epoch)s, %(valid_until)s, %(raw_sql)s, now())
               ON CONFLICT (role) DO UPDATE SET marker = EXCLUDED.marker, login = EXCLUDED.login,
                   node = EXCLUDED.node,
                   database = EXCLUDED.database, preset_cap = EXCLUDED.preset_cap,
                   key_id = EXCLUDED.key_id, epoch = EXCLUDED.epoch,
                   valid_until = EXCLUDED.valid_until, raw_sql = EXCLUDED.raw_sql, last_used = now()"""
        ).format(self._name)

    def set_raw_sql(self) -> Statement:
        """Record the raw grants applied, once the target database has them."""
        return sql.SQL("UPDATE {} SET raw_sql = %s WHERE role = %s").format(self._name)

    def idle(self) -> Statement:
        """Rows of one marker (one role prefix: listeners may share a backend) unused since %s."""
        return sql.SQL(
            "SELECT role, database FROM {} WHERE marker = %s AND last_used < %s ORDER BY role"
        ).format(self._name)

    def last_used(self) -> Statement:
        return sql.SQL("SELECT last_used FROM {} WHERE role = %s").format(self._name)

    def delete(self) -> Statement:
        return sql.SQL("DELETE FROM {} WHERE role = %s").format(self._name)


# --- raw SQL grants ------------------------------------------------------------------------------


class RawSqlRejected(ValueError):
    """A raw ``sql`` grant is outside the accepted shape; the message says why (no secrets)."""


PLACEHOLDER = re.compile(r"\{\{\s*\.Role\s*\}\}")
_TOKEN = re.compile(
    r"""(?P<space>\s+)
      | (?P<quoted>"(?:[^"]|"")*")
      | (?P<role>\{\{\s*\.Role\s*\}\})
      | (?P<word>[^\W\d]\w*)
      | (?P<number>\d+)
      | (?P<punct>[(),.*\[\]])
    """,
    re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class _Token:
    kind: str
    text: str
    start: int
    end: int

    def kw(self) -> str:
        return self.text.upper() if self.kind == "word" else ""


def _tokenize(text: str) -> list[_Token]:
    out: list[_Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            # ';' (a second statement), '-'/'/' (comments), quotes, '$' (dollar quoting), '\'...
            raise RawSqlRejected(f"character {text[pos]!r} at offset {pos} is not allowed")
        kind = m.lastgroup or ""
        if kind != "space":
            out.append(_Token(kind, m.group(), m.start(), m.end()))
        pos = m.end()
    return out


@dataclass(frozen=True, slots=True)
class RawGrant:
    """A validated raw grant: the text around the single ``{{.Role}}`` grantee.

    ``inverse`` (set for GRANTs) is the REVOKE that undoes it, used when a statement leaves
    the grant: raw grants are reconciled like memberships, not only ever added.
    """

    text: str
    before: str
    after: str
    inverse_text: str | None

    def render(self, role: str) -> Statement:
        # sql.SQL is never .format()ed here, so braces elsewhere in the text stay literal.
        return sql.Composed([sql.SQL(self.before), sql.Identifier(role), sql.SQL(self.after)])

    def inverse(self) -> RawGrant | None:
        return validate_raw_grant(self.inverse_text) if self.inverse_text else None


def validate_raw_grant(text: str) -> RawGrant:
    """Accept one ``GRANT``/``REVOKE``/``ALTER DEFAULT PRIVILEGES`` whose only grantee is the role.

    Accepted: ``GRANT <privileges> ON <objects> TO {{.Role}}``, ``REVOKE [GRANT OPTION FOR]
    <privileges> ON <objects> FROM {{.Role}} [CASCADE|RESTRICT]``, and the same two behind
    ``ALTER DEFAULT PRIVILEGES [FOR ROLE …] [IN SCHEMA …]``. Rejected, with the reason:
    anything but one statement (``;``), comments, string or dollar quotes, backslashes; a
    placeholder that is missing, repeated, quoted or not the last grantee; other grantees;
    ``WITH GRANT OPTION`` / ``GRANTED BY`` (the role could hand its privileges on, outliving
    the grant); and role-membership grants (``GRANT some_role TO …``: memberships are what the
    provisioner reconciles, and one line could make a person a superuser's member).
    """
    if "\x00" in text:
        raise RawSqlRejected("NUL byte")
    if len(PLACEHOLDER.findall(text)) != 1:
        raise RawSqlRejected("the statement must name {{.Role}} exactly once")
    tokens = _tokenize(text)
    if not tokens:
        raise RawSqlRejected("empty statement")
    kws = [t.kw() for t in tokens]
    i = 0
    if kws[:3] == ["ALTER", "DEFAULT", "PRIVILEGES"]:
        i = 3
        while i < len(kws) and kws[i] not in ("GRANT", "REVOKE"):
            i += 1
        if i == len(kws):
            raise RawSqlRejected("ALTER DEFAULT PRIVILEGES without GRANT or REVOKE")
    verb = kws[i]
    if verb not in ("GRANT", "REVOKE"):
        raise RawSqlRejected("only GRANT, REVOKE and ALTER DEFAULT PRIVILEGES are allowed")
    end = len(tokens)
    if verb == "REVOKE" and kws[-1] in ("CASCADE", "RESTRICT"):
        end -= 1
    if tokens[end - 1].kind != "role":
        raise RawSqlRejected(
            "{{.Role}} must be the last word (no WITH GRANT OPTION, GRANTED BY, other grantees)"
        )
    link = "TO" if verb == "GRANT" else "FROM"
    if end < 2 or kws[end - 2] != link:
        raise RawSqlRejected(f"{{{{.Role}}}} must be the only grantee, right after {link}")
    body = kws[i + 1 : end - 2]
    if "TO" in body or "FROM" in body:
        raise RawSqlRejected("more than one grantee list")
    if "ON" not in body:
        raise RawSqlRejected("only object privileges (… ON …) may be granted, not role memberships")
    if "WITH" in body or "GRANTED" in body:
        raise RawSqlRejected("WITH GRANT OPTION / GRANTED BY are not allowed")
    role_tok = tokens[end - 1]
    inverse_text = None
    if verb == "GRANT":
        verb_tok, link_tok = tokens[i], tokens[end - 2]
        inverse_text = (
            text[: verb_tok.start]
            + "REVOKE"
            + text[verb_tok.end : link_tok.start]
            + "FROM"
            + text[link_tok.end : role_tok.end]
        )
    return RawGrant(text, text[: role_tok.start], text[role_tok.end :], inverse_text)

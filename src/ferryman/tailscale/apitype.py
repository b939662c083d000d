"""LocalAPI answer types, decoded from JSON the way Go's ``encoding/json`` would accept it.

Owns: :class:`WhoIsResponse`, :class:`Node` and :class:`UserProfile` (small frozen views of
``apitype.WhoIsResponse``, ``tailcfg.Node`` and ``tailcfg.UserProfile``), their decoding, and
:func:`split_cert_pair` for ``/localapi/v0/cert/<domain>?type=pair``.

Must not: do I/O or interpret identities (``ferryman.identity.tailscale`` does).

Decoding rules, after Go: unknown fields are ignored; a missing or ``null`` field takes its zero
value; a field of the wrong JSON type fails the whole decode (``json.Unmarshal`` would), and so
does a ``CapMap`` value that is not an array. Capability values stay raw (``tailcfg.RawMessage``):
decoded JSON values, never interpreted here.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from ferryman.tailscale.errors import LocalAPIProtocolError

TAGGED_DEVICES_LOGIN = "tagged-devices"
"""``UserProfile.LoginName`` tailscaled reports for a node owned by its tags, not a person."""


class DecodeError(LocalAPIProtocolError):
    """A LocalAPI JSON answer did not have the shape of the Go type it stands for."""


@dataclass(frozen=True, slots=True)
class UserProfile:
    """``tailcfg.UserProfile`` (``tailcfg/tailcfg.go``)."""

    id: int = 0
    """``ID`` (``tailcfg.UserID``)."""
    login_name: str = ""
    """``LoginName``: ``alice@example.com``, or ``tagged-devices`` for a tagged node."""
    display_name: str = ""
    """``DisplayName``."""
    profile_pic_url: str = ""
    """``ProfilePicURL`` (omitted when empty)."""


@dataclass(frozen=True, slots=True)
class Node:
    """The parts of ``tailcfg.Node`` (``tailcfg/tailcfg.go``) ferryman reads; ``raw`` has the rest."""

    id: int = 0
    """``ID`` (``tailcfg.NodeID``)."""
    stable_id: str = ""
    """``StableID``."""
    name: str = ""
    """``Name``: the MagicDNS FQDN with its trailing dot, ``laptop.tail1234.ts.net.``."""
    computed_name: str = ""
    """``ComputedName``: the MagicDNS base name (or FQDN for shared-in nodes)."""
    addresses: tuple[str, ...] = ()
    """``Addresses``: the node's own prefixes, ``100.101.102.103/32``, ``fd7a:…/128``."""
    tags: tuple[str, ...] = ()
    """``Tags``: ``tag:prod`` …; non-empty means the node is owned by its tags."""
    user: int = 0
    """``User``: the owning user's ID (the tagged-devices pseudo-user for a tagged node)."""
    key_expiry: str = ""
    """``KeyExpiry`` as sent (RFC 3339; ``0001-01-01T00:00:00Z`` when it never expires)."""
    raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    """The whole JSON object, for fields not modelled here (``Hostinfo``, ``Online`` …)."""

    @property
    def short_name(self) -> str:
        """``ComputedName``, else the first label of ``Name`` (its trailing dot dropped)."""
        if self.computed_name:
            return self.computed_name
        return self.name.rstrip(".").split(".", 1)[0]


@dataclass(frozen=True, slots=True)
class WhoIsResponse:
    """``apitype.WhoIsResponse``: who owns an address, and the capabilities granted to it."""

    node: Node
    user_profile: UserProfile | None
    """None only if tailscaled sent none; successful answers from tailscaled always carry one."""
    cap_map: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """``CapMap`` (``tailcfg.PeerCapMap``): capability name → its raw JSON values, in order."""


def _get(obj: Mapping[str, Any], key: str, kind: type | tuple[type, ...], where: str) -> Any:
    value = obj.get(key)
    if value is None:
        return None
    # bool is an int in Python, not a number in Go's decoder.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind in (int, (int, float))):
        raise DecodeError(f"{where}.{key}: expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "string", int: "number", list: "array", dict: "object", bool: "bool"}
    if isinstance(kind, tuple):
        return " or ".join(names.get(k, k.__name__) for k in kind)
    return names.get(kind, kind.__name__)


def _str(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = _get(obj, key, str, where)
    return value if value is not None else ""


def _int(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = _get(obj, key, int, where)
    return value if value is not None else 0


def _str_list(obj: Mapping[str, Any], key: str, where: str) -> tuple[str, ...]:
    value = _get(obj, key, list, where)
    if value is None:
        return ()
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise DecodeError(f"{where}.{key}[{i}]: expected string, got {type(item).__name__}")
    return tuple(value)


def decode_user_profile(obj: Any, where: str = "UserProfile") -> UserProfile | None:
    if obj is None:
        return None
    if not isinstance(obj, dict):
        raise DecodeError(f"{where}: expected object, got {type(obj).__name__}")
    return UserProfile(
        id=_int(obj, "ID", where),
        login_name=_str(obj, "LoginName", where),
        display_name=_str(obj, "DisplayName", where),
        profile_pic_url=_str(obj, "ProfilePicURL", where),
    )


def decode_node(obj: Any, where: str = "Node") -> Node:
    if not isinstance(obj, dict):
        raise DecodeError(f"{where}: expected object, got {type(obj).__name__}")
    return Node(
        id=_int(obj, "ID", where),
        stable_id=_str(obj, "StableID", where),
        name=_str(obj, "Name", where),
        computed_name=_str(obj, "ComputedName", where),
        addresses=_str_list(obj, "Addresses", where),
        tags=_str_list(obj, "Tags", where),
        user=_int(obj, "User", where),
        key_expiry=_str(obj, "KeyExpiry", where),
        raw=MappingProxyType(obj),
    )


def decode_cap_map(obj: Any, where: str = "CapMap") -> Mapping[str, tuple[Any, ...]]:
    """``tailcfg.PeerCapMap`` = ``map[PeerCapability][]RawMessage``; ``null`` is empty."""
    if obj is None:
        return MappingProxyType({})
    if not isinstance(obj, dict):
        raise DecodeError(f"{where}: expected object, got {type(obj).__name__}")
    out: dict[str, tuple[Any, ...]] = {}
    for cap, values in obj.items():
        if values is None:
            out[cap] = ()
        elif isinstance(values, list):
            out[cap] = tuple(values)
        else:
            raise DecodeError(f"{where}[{cap!r}]: expected array, got {type(values).__name__}")
    return MappingProxyType(out)


_WHOIS_MEMO: dict[bytes, WhoIsResponse] = {}
_WHOIS_MEMO_SIZE = 256
_WHOIS_MEMO_MAX_BODY = 64 << 10


def decode_whois(body: bytes) -> WhoIsResponse:
    """Decode a ``/localapi/v0/whois`` 200 body. Raises :class:`DecodeError`.

    Decoding is pure, so a body identical to one decoded recently returns the same (frozen)
    answer again: every connection from one peer gets a byte-identical answer until its node,
    profile or CapMap changes, and the changed body is a new key. This memoises the parse, not
    the lookup -- each connection still asks tailscaled. Answers are shared: treat them (and
    the raw JSON values inside) as read-only.
    """
    memo = _WHOIS_MEMO
    answer = memo.get(body)
    if answer is None:
        answer = _decode_whois(body)
        if len(body) > _WHOIS_MEMO_MAX_BODY:
            return answer
        if len(memo) >= _WHOIS_MEMO_SIZE:
            del memo[next(iter(memo))]  # oldest first
        memo[body] = answer
    return answer


def _decode_whois(body: bytes) -> WhoIsResponse:
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise DecodeError(f"WhoIs answer is not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise DecodeError(f"WhoIs answer: expected object, got {type(doc).__name__}")
    if doc.get("Node") is None:
        # Go would decode a nil *Node; tailscaled never sends one, so treat it as garbage.
        raise DecodeError("WhoIs answer has no Node")
    return WhoIsResponse(
        node=decode_node(doc["Node"]),
        user_profile=decode_user_profile(doc.get("UserProfile")),
        cap_map=decode_cap_map(doc.get("CapMap")),
    )


def split_cert_pair(body: bytes) -> tuple[bytes, bytes]:
    """Split a ``?type=pair`` body into ``(cert_pem, key_pem)``.

    tailscaled writes the private key PEM block first, then the certificate chain
    (``serveKeyPair`` in ``ipn/localapi/cert.go``). The split follows
    ``CertPairWithValidity`` in ``client/local/cert.go``: cut after the first ``--\\n--``
    boundary and refuse a certificate part that still holds a private key.
    """
    i = body.find(b"--\n--")
    if i == -1:
        raise DecodeError("certificate pair: no delimiter between key and certificate")
    i += len(b"--\n")
    key_pem, cert_pem = body[:i], body[i:]
    if b" PRIVATE KEY-----" in cert_pem:
        raise DecodeError("certificate pair: private key found in the certificate part")
    if b" PRIVATE KEY-----" not in key_pem:
        raise DecodeError("certificate pair: first PEM block is not a private key")
    if b"-----BEGIN CERTIFICATE-----" not in cert_pem:
        raise DecodeError("certificate pair: no certificate after the key")
    return cert_pem, key_pem

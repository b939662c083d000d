"""Certificate names and RFC 6125 matching: pure, no TLS."""

import pytest

from ferryman.tls.names import certificate_names, name_matches
from tests.tls.certgen import Authority


@pytest.mark.parametrize(
    ("pattern", "server_name", "expected"),
    [
        ("db.example.com", "db.example.com", True),
        ("db.example.com", "DB.Example.COM", True),
        ("DB.EXAMPLE.com", "db.example.com", True),
        ("db.example.com", "db.example.org", False),
        ("db.example.com", "db.example.com.", False),  # RFC 6066: SNI has no trailing dot
        ("*.example.com", "a.example.com", True),
        ("*.example.com", "A.EXAMPLE.COM", True),
        ("*.example.com", "example.com", False),  # one label, not zero
        ("*.example.com", "a.b.example.com", False),  # one label, not two
        ("*.example.com", ".example.com", False),
        ("*.example.com", "*.example.com", False),
        ("*.com", "example.com", False),  # wildcard over a single-label suffix
        ("f*.example.com", "foo.example.com", False),  # partial-label wildcard: never
        ("a.*.example.com", "a.b.example.com", False),  # not left-most
        ("*", "localhost", False),
        ("", "", False),
    ],
)
def test_name_matches(pattern: str, server_name: str, expected: bool) -> None:
    assert name_matches(pattern, server_name) is expected


def test_names_come_from_san_dns_entries_lower_cased() -> None:
    leaf = Authority().issue(cn="ignored.test", dns=("A.example.com", "*.b.example.com"), ips=("10.0.0.1",))
    assert certificate_names(leaf.cert) == ("a.example.com", "*.b.example.com")


def test_cn_is_used_only_without_a_san_extension() -> None:
    ca = Authority()
    assert certificate_names(ca.issue(cn="Only-CN.test", san=False).cert) == ("only-cn.test",)
    # A SAN holding only an IP address still wins over the CN (RFC 6125 §6.4.4).
    assert certificate_names(ca.issue(cn="cn.test", ips=("10.0.0.1",)).cert) == ()

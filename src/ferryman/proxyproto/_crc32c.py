"""CRC-32C (Castagnoli), the checksum of the PROXY v2 ``PP2_TYPE_CRC32C`` TLV.

Owns: one pure function, :func:`crc32c`, as specified by RFC 4960 Appendix B (the reflected
polynomial 0x82F63B78, initial value and final XOR 0xFFFFFFFF). The standard library's
``zlib.crc32``/``binascii.crc32`` use a different polynomial (IEEE 802.3), hence this module.

Must not: do I/O or depend on anything outside the standard library. Headers are at most
65,551 bytes and the check is optional for senders, so a table-driven loop in pure Python is fast
enough; the check value of ``b"123456789"`` (0xE3069283) is asserted in the tests.
"""

from __future__ import annotations

from typing import Final

_POLY_REFLECTED: Final = 0x82F63B78  # Castagnoli 0x1EDC6F41, bit-reversed (RFC 4960 App. B)


def _make_table() -> tuple[int, ...]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ _POLY_REFLECTED if crc & 1 else crc >> 1
        table.append(crc)
    return tuple(table)


_TABLE: Final = _make_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """Return the CRC-32C of ``data`` as an unsigned 32-bit integer."""
    crc = 0xFFFFFFFF
    table = _TABLE
    for byte in bytes(data):
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF

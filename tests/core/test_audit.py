"""The audit sink: JSON lines, one per record, whatever the values."""

import json
import re
from ipaddress import ip_address
from pathlib import Path

from ferryman.audit import AuditLog


def test_records_are_json_lines_with_a_millisecond_utc_stamp(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.write("decision", user="zoë@example.com", allowed=True, bytes_up=2**40, grants=["a", "b"])
    audit.write("close", source=ip_address("192.0.2.7"), path=tmp_path, detail=None, duration=0.125)
    audit.close()
    lines = path.read_text(encoding="utf-8").splitlines()
    first, second = (json.loads(line) for line in lines)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", first["ts"])
    assert first == {
        "ts": first["ts"],
        "event": "decision",
        "user": "zoë@example.com",
        "allowed": True,
        "bytes_up": 2**40,
        "grants": ["a", "b"],
    }
    # Values JSON has no type for are written as their text, not dropped and not an error.
    assert (second["source"], second["path"]) == ("192.0.2.7", str(tmp_path))
    assert (second["detail"], second["duration"]) == (None, 0.125)


def test_reopen_appends_and_keeps_earlier_records(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(str(path))
    audit.write("decision", id="c1")
    audit.reopen(str(path))  # log rotation: the same file again
    audit.write("close", id="c1")
    audit.close()
    assert [json.loads(line)["event"] for line in path.read_text().splitlines()] == ["decision", "close"]

import pytest

from ferryman.units import format_duration, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90s", 90),
        ("1m", 60),
        ("24h", 86400),
        ("1h30m", 5400),
        ("500ms", 0.5),
        ("0", 0),
        (0, 0),
        (2.5, 2.5),
        ("7d", 604800),
        ("1.5s", 1.5),
        ("30", 30),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("bad", ["", "5x", "m5", "1h 30m", "-1s", True, None, [1], "1h30"])
def test_bad_durations_name_the_value(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (10485760, 10485760),
        ("10MiB", 10 * 1024**2),
        ("10GB", 10 * 1000**3),
        ("10 GB", 10 * 1000**3),
        ("1KiB", 1024),
        ("1kb", 1000),
        ("50G", 50 * 1000**3),
        ("0", 0),
        ("1.5MiB", 1572864),
        (3.0, 3),
    ],
)
def test_sizes(text: object, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("bad", ["10XB", "", "GB", -1, 1.5, True, "ten"])
def test_bad_sizes(bad: object) -> None:
    with pytest.raises(ValueError, match="byte size"):
        parse_size(bad)


def test_format_duration() -> None:
    assert [format_duration(s) for s in (3600, 120, 90, 1.5)] == ["1h", "2m", "90s", "1.5s"]

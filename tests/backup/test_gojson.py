"""Go-compatible JSON strings and timestamps."""

from __future__ import annotations

import datetime as dt
import json

import pytest

from blockera.backup import gojson
from blockera.backup.gojson import GoTime


@pytest.mark.parametrize("text, expected", [
    ("plain", '"plain"'),
    ("a<b>&c", '"a\\u003cb\\u003e\\u0026c"'),        # as restic 0.14 wrote this name
    ('quote " and \\ backslash', '"quote \\" and \\\\ backslash"'),
    ("tab\tnl\ncr\r", '"tab\\tnl\\ncr\\r"'),
    ("\b\f\x00\x1f", '"\\u0008\\u000c\\u0000\\u001f"'),  # never \b or \f
    ("ünïcode → 日本", '"ünïcode → 日本"'),             # UTF-8, not escaped
    ("line\u2028sep\u2029", '"line\\u2028sep\\u2029"'),
    ("bad\udcffbyte", '"bad\ufffdbyte"'),             # invalid UTF-8 becomes U+FFFD
])
def test_strings_as_go_writes_them(text: str, expected: str) -> None:
    assert gojson.string(text) == expected
    if "\udcff" not in text:
        assert json.loads(expected) == text


@pytest.mark.parametrize("text", [
    "2026-12-03T08:58:49.171223492Z",
    "2015-01-02T18:10:50.895208559+01:00",
    "2014-12-06T17:50:23.34513538+01:00",      # trailing zero dropped by Go
    "2020-02-29T23:59:59-07:30",
    "0001-01-01T00:00:00Z",                    # Go's zero time
    "2023-07-25T20:01:44.1+02:00",
])
def test_times_round_trip_exactly(text: str) -> None:
    assert GoTime.parse(text).format() == text


def test_time_fraction_and_zone() -> None:
    t = GoTime.parse("2015-01-02T18:10:50.895208559+01:00")
    assert t.utcoffset_s == 3600
    assert t.unix_ns == 1420218650_895208559
    assert GoTime(t.unix_ns, 0).format() == "2015-01-02T17:10:50.895208559Z"
    assert GoTime(1420218650_000000000, 0).format() == "2015-01-02T17:10:50Z"
    assert GoTime(1420218650_120000000, -3 * 3600).format() == "2015-01-02T14:10:50.12-03:00"
    # more than nine fraction digits are cut, as Go does
    assert GoTime.parse("2015-01-02T17:10:50.1234567891Z").unix_ns % 10**9 == 123456789


def test_time_from_and_to_datetime() -> None:
    aware = dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.timezone(dt.timedelta(hours=2)))
    t = GoTime.from_datetime(aware)
    assert t.format() == "2026-01-02T03:04:05.678901+02:00"
    assert t.to_datetime() == aware
    now = GoTime.now()
    assert abs(now.to_datetime().timestamp() - dt.datetime.now().timestamp()) < 5


@pytest.mark.parametrize("bad", ["2026-12-03 08:58:49Z", "2026-12-03T08:58:49", "yesterday"])
def test_bad_times_rejected(bad: str) -> None:
    with pytest.raises(ValueError):
        GoTime.parse(bad)

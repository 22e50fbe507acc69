"""JSON text exactly as Go's encoding/json writes it (docs/backup-repository.md §5.1).

restic names a tree blob by the SHA-256 of its JSON, so two writers deduplicate trees only when
they produce the same bytes. Go's encoder differs from Python's `json.dumps` in three ways that
matter here: it escapes `<`, `>`, `&`, U+2028 and U+2029 as `\\u003c`-style sequences, it writes
control characters other than `\\n`, `\\r`, `\\t` as `\\u00XX` (lower-case hex; never `\\b` or
`\\f`), and it writes non-ASCII characters as UTF-8. Invalid UTF-8 becomes U+FFFD.

`GoTime` is a point in time with nanoseconds and a UTC offset, formatted and parsed as Go's
`time.Time` does in JSON (RFC 3339 with the fraction's trailing zeros dropped, `Z` for UTC).
Python's `datetime` keeps only microseconds, which would change restic's timestamps (and so
the IDs of trees holding them) on a round trip.
"""

from __future__ import annotations

import base64
import datetime as _dt
import re
import time
from dataclasses import dataclass

_NEEDS_ESCAPE = re.compile('[\x00-\x1f"\\\\<>&\u2028\u2029\ud800-\udfff]')
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: re.Match[str]) -> str:
    ch = match.group()
    short = _SHORT.get(ch)
    if short is not None:
        return short
    if "\ud800" <= ch <= "\udfff":  # a lone surrogate: bytes that were not UTF-8
        return "\ufffd"
    return f"\\u{ord(ch):04x}"


def string(text: str) -> str:
    """`text` as a Go JSON string literal (with the quotes)."""
    return '"' + _NEEDS_ESCAPE.sub(_escape, text) + '"'


def string_list(items: list[str] | None) -> str:
    """A `[]string` field: `null` for None, else the array."""
    if items is None:
        return "null"
    return "[" + ",".join(string(s) for s in items) + "]"


def bytes_b64(data: bytes) -> str:
    """A `[]byte` field: standard base64 with padding."""
    return '"' + base64.b64encode(data).decode("ascii") + '"'


def boolean(value: bool) -> str:
    return "true" if value else "false"


def id_list(ids: list[bytes] | None) -> str:
    """A list of 32-byte IDs as hex strings (`null` for None)."""
    if ids is None:
        return "null"
    if not ids:
        return "[]"
    return '["' + '","'.join(i.hex() for i in ids) + '"]'


def obj(fields: list[tuple[str, str]]) -> str:
    """An object from (name, encoded value) pairs, in the order given."""
    return "{" + ",".join(f'"{name}":{value}' for name, value in fields) + "}"


_NS_PER_S = 1_000_000_000
_EPOCH_ORDINAL = _dt.date(1970, 1, 1).toordinal()
_TIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})$")


@dataclass(frozen=True, order=True)
class GoTime:
    """A timestamp as Go's `time.Time` marshals it: nanoseconds since the Unix epoch (UTC) and
    the UTC offset, in seconds, of the zone it was written in. Go's zero time
    (`0001-01-01T00:00:00Z`) is `GoTime.zero()`."""

    unix_ns: int
    utcoffset_s: int = 0

    @classmethod
    def now(cls) -> "GoTime":
        """The current time in the local zone, like Go's `time.Now()`."""
        ns = time.time_ns()
        offset = time.localtime(ns // _NS_PER_S).tm_gmtoff
        return cls(ns, offset)

    @classmethod
    def zero(cls) -> "GoTime":
        return cls.parse("0001-01-01T00:00:00Z")

    @classmethod
    def from_datetime(cls, value: _dt.datetime) -> "GoTime":
        """From an aware datetime (a naive one is taken as local time)."""
        if value.tzinfo is None:
            value = value.astimezone()
        offset = value.utcoffset()
        assert offset is not None
        utc = value.replace(tzinfo=None) - offset
        days = utc.toordinal() - _EPOCH_ORDINAL
        seconds = days * 86400 + utc.hour * 3600 + utc.minute * 60 + utc.second
        return cls(seconds * _NS_PER_S + utc.microsecond * 1000, int(offset.total_seconds()))

    @classmethod
    def parse(cls, text: str) -> "GoTime":
        """Parse RFC 3339 with any number of fraction digits (as Go's time.Parse does)."""
        match = _TIME_RE.match(text)
        if not match:
            raise ValueError(f"not an RFC 3339 time: {text!r}")
        year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
        frac = match.group(7) or ""
        nanos = int((frac + "000000000")[:9])
        zone = match.group(8)
        if zone in ("Z", "z"):
            offset = 0
        else:
            sign = -1 if zone[0] == "-" else 1
            offset = sign * (int(zone[1:3]) * 3600 + int(zone[4:6]) * 60)
        days = _dt.date(year, month, day).toordinal() - _EPOCH_ORDINAL
        local_s = days * 86400 + hour * 3600 + minute * 60 + second
        return cls((local_s - offset) * _NS_PER_S + nanos, offset)

    def format(self) -> str:
        """RFC 3339 with nanoseconds, trailing zeros dropped (Go's RFC3339Nano)."""
        local_ns = self.unix_ns + self.utcoffset_s * _NS_PER_S
        seconds, nanos = divmod(local_ns, _NS_PER_S)
        days, day_s = divmod(seconds, 86400)
        date = _dt.date.fromordinal(days + _EPOCH_ORDINAL)
        hour, rest = divmod(day_s, 3600)
        minute, second = divmod(rest, 60)
        text = (f"{date.year:04d}-{date.month:02d}-{date.day:02d}"
                f"T{hour:02d}:{minute:02d}:{second:02d}")
        if nanos:
            text += "." + f"{nanos:09d}".rstrip("0")
        if self.utcoffset_s == 0:
            return text + "Z"
        sign = "-" if self.utcoffset_s < 0 else "+"
        off_min = abs(self.utcoffset_s) // 60
        return text + f"{sign}{off_min // 60:02d}:{off_min % 60:02d}"

    def json(self) -> str:
        return '"' + self.format() + '"'

    def to_datetime(self) -> _dt.datetime:
        """As an aware datetime (nanoseconds truncated to microseconds)."""
        tz = _dt.timezone(_dt.timedelta(seconds=self.utcoffset_s))
        seconds, nanos = divmod(self.unix_ns, _NS_PER_S)
        base = _dt.datetime(1970, 1, 1, tzinfo=_dt.timezone.utc)
        return (base + _dt.timedelta(seconds=seconds, microseconds=nanos // 1000)).astimezone(tz)

    def __str__(self) -> str:
        return self.format()

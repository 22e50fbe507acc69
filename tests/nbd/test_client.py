"""The NBD client (blockera.nbd.client, blockera.nbd.uri): NBD URIs, then an export as a
BlockDevice against blockera's own server, a scripted server for what real servers rarely do,
and real peers (qemu-nbd, nbdkit)."""

from __future__ import annotations

import pytest

from blockera.errors import UsageError
from blockera.nbd.uri import NbdUri, NbdUriError, parse_nbd_uri

MiB = 1 << 20


# -- URIs ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    ("nbd://example.com/disk", NbdUri("disk", host="example.com", port=10809)),
    ("nbd://example.com:10900/disk", NbdUri("disk", host="example.com", port=10900)),
    ("nbd://example.com", NbdUri("", host="example.com")),
    ("nbd://example.com/", NbdUri("", host="example.com")),
    ("nbd://example.com//disk", NbdUri("/disk", host="example.com")),
    ("nbd://example.com/hello%20world", NbdUri("hello world", host="example.com")),
    ("nbd://127.0.0.1:1234/a+b", NbdUri("a+b", host="127.0.0.1", port=1234)),
    ("nbd://[::1]:10810/x", NbdUri("x", host="::1", port=10810)),
    ("NBD://Example.COM/Disk", NbdUri("Disk", host="example.com")),
    ("nbd+unix:///disk?socket=/run/x.sock", NbdUri("disk", unix_path="/run/x.sock")),
    ("nbd+unix:///?socket=nbd.sock", NbdUri("", unix_path="nbd.sock")),
    ("nbd+unix:///d?socket=/tmp/a%20b+c.sock", NbdUri("d", unix_path="/tmp/a b+c.sock")),
    ("nbd+unix:///?socket=%00/abstract", NbdUri("", unix_path="\0/abstract")),
    ("nbd+unix:///caf%C3%A9?socket=s", NbdUri("café", unix_path="s")),
])
def test_good_uris(text: str, expected: NbdUri) -> None:
    parsed = parse_nbd_uri(text)
    assert parsed == expected
    assert parse_nbd_uri(str(parsed)) == parsed  # str() gives a URI meaning the same


@pytest.mark.parametrize("text, complaint", [
    ("nbds://example.com/disk", "requires TLS"),
    ("nbds+unix:///disk?socket=/s", "requires TLS"),
    ("nbd://example.com/disk?tls-type=x509", "tls-type asks for TLS"),
    ("nbd://alice@example.com/disk", "user name is only used for TLS"),
    ("http://example.com/disk", "unsupported scheme 'http'"),
    ("nbd+vsock://1:10809/disk", "unsupported scheme"),
    ("disk", "expected nbd://"),
    ("", "expected nbd://"),
    ("nbd:disk", "expected nbd://"),
    ("nbd:///disk", "needs a host"),
    ("nbd://example.com:99999/disk", "out of range"),
    ("nbd://example.com:ten/disk", "Port could not be cast"),
    ("nbd://example.com:0/disk", "port 0"),
    ("nbd://[not-ipv6]/disk", "IPv6 address"),
    ("nbd://example.com/disk?socket=/s", "unknown query parameter 'socket'"),
    ("nbd://example.com/disk#part", "no fragment"),
    ("nbd://example.com/a b", "spaces"),
    ("nbd://example.com/50%", "percent-escape"),
    ("nbd://example.com/%ff", "UTF-8"),
    ("nbd://example.com/a%00b", "NUL"),
    ("nbd://example.com/" + "x" * 4097, "longer than 4096"),
    ("nbd+unix:///disk", "needs the socket"),
    ("nbd+unix:///disk?socket=", "needs the socket"),
    ("nbd+unix://host/disk?socket=/s", "takes no host"),
    ("nbd+unix:///disk?socket=/s&x-cache=1", "unknown query parameter 'x-cache'"),
    ("nbd+unix:///disk?socket=/s&socket=/t", "given twice"),
])
def test_bad_uris(text: str, complaint: str) -> None:
    with pytest.raises(NbdUriError, match="bad NBD URI") as info:
        parse_nbd_uri(text)
    assert complaint in str(info.value)
    assert isinstance(info.value, UsageError)

"""NBD URIs: where an export is and what it is called.

Owns the parsing of the URI forms the NBD URI specification defines, as far as the client
supports them: `nbd://HOST[:PORT]/NAME` (TCP; the port defaults to 10809) and
`nbd+unix:///NAME?socket=PATH` (a unix socket; a path that starts with a NUL byte, written
`%00`, is in the abstract namespace). The export name is the path without its leading `/`,
percent-decoded (`nbd://host` and `nbd://host/` both name the default export `""`).

There is no TLS support, so `nbds://` and `nbds+unix://` URIs, a user name (used only for TLS
authentication) and the `tls-*` query parameters are refused, as the specification asks of
clients without TLS; so is any other scheme or query parameter, and a fragment.

See docs/nbd.md §6.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit

from blockera.errors import UsageError
from blockera.nbd import protocol as p
from blockera.nbd.listeners import NBD_PORT

_TLS_SCHEMES = ("nbds", "nbds+unix", "nbds+vsock")
_TLS_PARAMETERS = ("tls-type", "tls-hostname", "tls-verify-peer", "tls-certificates",
                   "tls-psk-file", "tls-username")
_EXAMPLES = ("nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH")
_PERCENT_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


class NbdUriError(UsageError):
    """A string is not an NBD URI this client can connect to."""


@dataclass(frozen=True)
class NbdUri:
    """A parsed NBD URI: a unix socket (`unix_path`) or a TCP address (`host`, `port`), and
    the export name."""

    export_name: str
    unix_path: str | None = None
    host: str | None = None
    port: int = NBD_PORT

    @property
    def transport(self) -> str:
        return "unix" if self.unix_path is not None else "tcp"

    def __str__(self) -> str:
        """The URI, percent-encoded so that `parse_nbd_uri` gives this object back."""
        name = quote(self.export_name, safe="/:@!$&'()*+,;=")
        if self.unix_path is not None:
            return f"nbd+unix:///{name}?socket={quote(self.unix_path, safe='/:@!$()*+,;')}"
        host = self.host or ""
        if ":" in host:
            host = f"[{host}]"
        return f"nbd://{host}:{self.port}/{name}"


def _fail(uri: str, why: str) -> NbdUriError:
    return NbdUriError(f"bad NBD URI {uri!r}: {why}")


def _query(uri: str, text: str) -> dict[str, str]:
    """The query parameters, percent-decoded ('+' is a plus sign here, not a space)."""
    params: dict[str, str] = {}
    if not text:
        return params
    for part in text.split("&"):
        if not part:
            continue
        key, _, value = part.partition("=")
        key = unquote(key, errors="strict")
        if key in params:
            raise _fail(uri, f"query parameter {key!r} is given twice")
        params[key] = unquote(value, errors="strict")
    return params


def parse_nbd_uri(uri: str) -> NbdUri:
    """Parse an NBD URI; `NbdUriError` says what is wrong with one that cannot be used."""
    if not isinstance(uri, str) or not uri:
        raise NbdUriError(f"bad NBD URI {uri!r}: expected {_EXAMPLES}")
    if any(c.isspace() or ord(c) < 0x20 for c in uri):
        raise _fail(uri, "URIs cannot contain spaces or control characters; percent-encode "
                         "them (a space is %20)")
    if _PERCENT_ESCAPE.search(uri):
        raise _fail(uri, "a '%' must start a percent-escape such as %20")
    scheme, sep, _ = uri.partition("://")
    if not sep:
        raise _fail(uri, f"expected {_EXAMPLES}")
    scheme = scheme.lower()
    if scheme in _TLS_SCHEMES:
        raise _fail(uri, f"{scheme}:// requires TLS, which blockera's NBD client does not "
                         "support; use nbd:// or nbd+unix:// over a trusted network or a "
                         "unix socket")
    if scheme not in ("nbd", "nbd+unix"):
        raise _fail(uri, f"unsupported scheme {scheme!r}: expected {_EXAMPLES}")
    try:
        parts = urlsplit(uri)
        params = _query(uri, parts.query)
        export_name = unquote(parts.path, errors="strict")
        port_number = parts.port
    except UnicodeDecodeError:
        raise _fail(uri, "percent-escapes must encode UTF-8 text") from None
    except ValueError as exc:
        raise _fail(uri, str(exc)) from None
    if parts.fragment or uri.endswith("#"):
        raise _fail(uri, "NBD URIs have no fragment ('#...')")
    export_name = export_name.removeprefix("/")
    if "\0" in export_name:
        raise _fail(uri, "an export name cannot contain a NUL character")
    if len(export_name.encode()) > p.MAX_STRING_BYTES:
        raise _fail(uri, f"the export name is longer than {p.MAX_STRING_BYTES} bytes")
    for key in params:
        if key in _TLS_PARAMETERS:
            raise _fail(uri, f"{key} asks for TLS, which blockera's NBD client does not "
                             "support")
    if parts.username is not None:
        raise _fail(uri, "a user name is only used for TLS authentication, which blockera's "
                         "NBD client does not support")

    if scheme == "nbd+unix":
        unknown = sorted(set(params) - {"socket"})
        if unknown:
            raise _fail(uri, f"unknown query parameter {unknown[0]!r} (nbd+unix:// takes "
                             "only socket=PATH)")
        if parts.netloc:
            raise _fail(uri, f"nbd+unix:// takes no host ({parts.netloc!r}): write "
                             "nbd+unix:///NAME?socket=PATH")
        path = params.get("socket", "")
        if not path:
            raise _fail(uri, "nbd+unix:// needs the socket: nbd+unix:///NAME?socket=PATH")
        return NbdUri(export_name, unix_path=path)

    if params:
        raise _fail(uri, f"unknown query parameter {sorted(params)[0]!r} (nbd:// takes none; "
                         "for a unix socket write nbd+unix:///NAME?socket=PATH)")
    host = parts.hostname
    if not host:
        raise _fail(uri, "nbd:// needs a host: nbd://HOST[:PORT]/NAME")
    if parts.netloc.startswith("["):
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError:
            raise _fail(uri, f"{host!r} in brackets is not an IPv6 address") from None
    port = NBD_PORT if port_number is None else port_number
    if port == 0:
        raise _fail(uri, "port 0 cannot be connected to")
    return NbdUri(export_name, host=host, port=port)

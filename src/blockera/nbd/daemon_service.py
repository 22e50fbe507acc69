"""The NBD export of an engine daemon: where it listens, and starting and stopping it.

`blockera daemon` runs one `EngineNbdService` next to its control socket (see
`blockera.engine.daemon`). By default it listens on a unix socket beside the control socket
(`engine.sock` -> `engine-nbd.sock`, mode 0600); TCP is off unless an address is given, binds
to 127.0.0.1 when only a port is given, and refuses a non-loopback address unless remote
clients are allowed explicitly (NBD has no authentication or encryption here). Export names are
the engine's device names (`blockera.nbd.engine_devices`).

The daemon stops the service before it suspends its devices: no new connections, requests in
flight are answered (for at most `stop_timeout_s`: a request waiting on a suspended device is
then cut off), clients are disconnected, and only then does the engine suspend and commit.

See docs/nbd.md §1, §5.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from blockera.engine.userspace import Engine
from blockera.errors import UsageError
from blockera.nbd.engine_devices import EngineExports
from blockera.nbd.server import NbdServer, serve

log = logging.getLogger(__name__)

DEFAULT_STOP_TIMEOUT_S = 10.0


def default_nbd_socket_path(control_socket: Path) -> Path:
    """The NBD socket beside a control socket: `DIR/NAME.sock` -> `DIR/NAME-nbd.sock`."""
    return control_socket.with_name(f"{control_socket.stem}-nbd.sock")


@dataclass(frozen=True)
class NbdSettings:
    """Where the engine's devices are exported. At least one of `unix_path` and `tcp`."""

    unix_path: Path | None
    tcp: tuple[str, int] | None = None
    allow_remote: bool = False
    stop_timeout_s: float = DEFAULT_STOP_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.unix_path is None and self.tcp is None:
            raise UsageError("the NBD export needs a unix socket, a TCP address or both")
        if self.allow_remote and self.tcp is None:
            raise UsageError("allowing remote NBD clients only makes sense with a TCP address")


class EngineNbdService:
    """The NBD server over an engine's devices, with the daemon's start/stop life cycle."""

    def __init__(self, engine: Engine, settings: NbdSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.server: NbdServer | None = None

    def start(self) -> None:
        if self.server is not None:
            raise UsageError("the NBD service is already running")
        s = self.settings
        self.server = serve(EngineExports(self.engine), unix_path=s.unix_path, tcp=s.tcp,
                            allow_remote=s.allow_remote)

    def stop(self) -> None:
        server, self.server = self.server, None
        if server is not None and not server.shutdown(timeout_s=self.settings.stop_timeout_s):
            log.warning("NBD: some requests were still waiting (on a suspended device?) after "
                        "%g s; their connections were cut", self.settings.stop_timeout_s)

    def uris(self, name: str = "NAME") -> list[str]:
        """Where a client reaches export `name`, as NBD URIs (only while running)."""
        server = self.server
        if server is None:
            return []
        out = []
        if server.unix_path is not None:
            out.append(f"nbd+unix:///{name}?socket={server.unix_path}")
        if server.tcp_address is not None:
            host, port = server.tcp_address
            out.append(f"nbd://{f'[{host}]' if ':' in host else host}:{port}/{name}")
        return out

    def describe(self) -> str:
        return "NBD exports at " + " and ".join(self.uris())

"""An NBD (Network Block Device) server exporting `BlockDevice` objects.

Real clients -- qemu, the libnbd tools (nbdinfo, nbdcopy, nbdfuse, nbdsh), fio's nbd engine,
the kernel's nbd client -- can then read and write the devices over a unix socket or TCP.

    from blockera.nbd import Export, serve
    server = serve({"disk": device, "base": Export(other, read_only=True)},
                   unix_path="nbd.sock")
    ...
    server.shutdown()

`exports` may also be a callable returning that mapping; it is consulted whenever a client
negotiates or lists exports (see `blockera.nbd.exports`).

Modules, one protocol part each: `protocol` (constants and message layouts), `handshake`
(fixed newstyle option haggling), `transmission` (requests and replies), `workers` (the
threads of one connection), `wire` (socket I/O), `exports` (export names to devices), `limits`
(block size constraints), `listeners` (unix and TCP sockets, loopback rule), `connection` (one
client's life), `server` (accepting and shutdown), `errors` (exceptions and the device-error
to NBD-error mapping). For the device-mapper engine: `engine_devices` (the engine's devices as
exports, by name, live) and `daemon_service` (the export as a service of `blockera daemon`).

See docs/nbd.md.
"""

from blockera.errors import ListenError
from blockera.nbd.client import NbdDevice, open_nbd
from blockera.nbd.errors import RemoteBindRefusedError, UnknownExportError
from blockera.nbd.exports import Export, ExportMap, ExportSource
from blockera.nbd.limits import BlockLimits
from blockera.nbd.listeners import NBD_PORT
from blockera.nbd.server import NbdServer, serve

__all__ = ["BlockLimits", "Export", "ExportMap", "ExportSource", "ListenError", "NBD_PORT",
           "NbdDevice", "NbdServer", "RemoteBindRefusedError", "UnknownExportError", "open_nbd",
           "serve"]

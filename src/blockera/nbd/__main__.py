"""`python3 -m blockera.nbd`: export image files or block devices over NBD until interrupted.

    python3 -m blockera.nbd --unix nbd.sock disk=disk.img [base=base.img:ro]

Each EXPORT is NAME=PATH, optionally suffixed with `:ro`. The device-mapper engine embeds the
server through `blockera.nbd.serve` instead; this entry point serves files for manual use and
benchmarks.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading

from blockera.blockdev import FileDevice
from blockera.errors import BlockeraError
from blockera.nbd.exports import Export
from blockera.nbd.listeners import NBD_PORT
from blockera.nbd.server import DEFAULT_WORKERS_PER_CONNECTION, serve


def _parse_tcp(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, str(NBD_PORT)
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad TCP address {text!r}: use HOST:PORT") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m blockera.nbd",
                                     description="Serve files or block devices over NBD.")
    parser.add_argument("exports", nargs="+", metavar="NAME=PATH[:ro]")
    parser.add_argument("--unix", metavar="PATH", help="listen on this unix socket")
    parser.add_argument("--tcp", metavar="HOST:PORT", type=_parse_tcp,
                        help="listen on TCP (loopback only unless --allow-remote)")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow a TCP address reachable from other hosts")
    parser.add_argument("--read-only", action="store_true", help="export everything read-only")
    parser.add_argument("--direct", action="store_true", help="O_DIRECT for block devices")
    parser.add_argument("--workers", type=int, default=DEFAULT_WORKERS_PER_CONNECTION,
                        help="worker threads per connection")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING - 10 * min(args.verbose, 2),
                        format="%(asctime)s %(name)s: %(message)s")
    exports = {}
    try:
        for spec in args.exports:
            name, sep, path = spec.partition("=")
            if not sep or not name:
                parser.error(f"export {spec!r}: use NAME=PATH")
            read_only = path.endswith(":ro")
            path = path.removesuffix(":ro")
            device = FileDevice(path, writable=not (read_only or args.read_only),
                                direct=args.direct)
            exports[name] = Export(device, read_only=read_only)
        server = serve(exports, unix_path=args.unix, tcp=args.tcp,
                       allow_remote=args.allow_remote, read_only=args.read_only,
                       default_export=next(iter(exports)), workers_per_connection=args.workers)
    except BlockeraError as exc:
        parser.exit(exc.exit_code, f"error: {exc}\n")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.shutdown()
    for export in exports.values():
        export.device.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

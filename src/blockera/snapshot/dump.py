"""`blockera cow dump`: everything on a persistent COW's metadata, for inspection
(docs/snapshot.md §1, §2, §6).

Prints the header, the geometry, the load state a kernel would reach (`current_area`,
`current_committed`, `next_free`, and the status line it would show right after activation),
then every record in list order as `area slot old_chunk new_chunk`, then the anomalies of
`blockera.snapshot.anomalies` and, if reading stopped early (bad header, area beyond the end),
why. Records are read even when the header says invalid (the kernel would not read them).

JSON: `{"header": {...}, "cow_sectors", "exceptions_per_area", "exceptions",
"current_area", "current_committed", "next_free", "status", "records": [[area, slot, old,
new], ...], "anomalies": [{kind, index, area, slot, old_chunk, new_chunk, message}],
"error": null | "..."}`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, BinaryIO

import numpy as np

from blockera.blockdev import BlockDevice
from blockera.row_render import Num, render_lines
from blockera.snapshot.anomalies import AnomalyReport, find_anomalies
from blockera.snapshot.layout import SNAP_MAGIC
from blockera.snapshot.cow_image import CowImage, read_cow
from blockera.units import SECTOR_BYTES


@dataclass
class CowDump:
    image: CowImage
    anomalies: AnomalyReport | None

    @property
    def ok(self) -> bool:
        return self.image.error is None and not self.anomalies

    def status(self) -> str | None:
        """The status a kernel would report right after activating this COW."""
        image = self.image
        if image.header is None or image.table is None:
            return None
        if not image.header.is_valid:
            return "Invalid"
        cs = image.chunk_sectors
        return (f"{image.table.next_free() * cs}/{image.size_bytes // SECTOR_BYTES} "
                f"{image.geometry.metadata_sectors(image.table.current_area)}")

    def _record_columns(self) -> tuple[np.ndarray, ...]:
        table = self.image.table
        assert table is not None
        index = np.arange(len(table), dtype=np.uint64)
        epa = np.uint64(table.geometry.exceptions_per_area)
        return index // epa, index % epa, table.old, table.new


def dump_cow(dev: BlockDevice) -> CowDump:
    image = read_cow(dev, lenient=True)
    report = find_anomalies(image.table, image.size_bytes) if image.table is not None else None
    return CowDump(image, report)


def write_text(result: CowDump, out: BinaryIO) -> None:
    image = result.image
    lines = []
    if image.header is not None:
        lines.append(f"header: {image.header.describe()}")
    lines.append(f"cow: {image.size_bytes // SECTOR_BYTES} sectors ({image.size_bytes} bytes)")
    table = image.table
    if table is not None:
        g = table.geometry
        lines.append(f"geometry: {g.chunk_bytes}-byte chunks, {image.size_bytes // g.chunk_bytes}"
                     f" whole chunks, {g.exceptions_per_area} exceptions per area, area a at "
                     f"chunk 1 + {g.stride_chunks}*a")
        lines.append(f"exceptions: {len(table)}; current_area {table.current_area}, "
                     f"current_committed {table.current_committed}, next_free "
                     f"{table.next_free()}")
        status = result.status()
        note = " (valid=0: the kernel does not load these records)" if status == "Invalid" else ""
        lines.append(f"status: {status}{note}")
        lines.append("# area slot old_chunk new_chunk")
    out.write(("\n".join(lines) + "\n").encode())
    if table is not None and len(table):
        area, slot, old, new = result._record_columns()
        parts = [Num(area), b" ", Num(slot), b" ", Num(old), b" ", Num(new), b"\n"]
        for chunk in render_lines(parts, len(table)):
            out.write(chunk)
    tail = []
    if result.anomalies is not None:
        tail.append(f"anomalies: {result.anomalies.summary()}")
        tail.extend(f"anomaly: area {a.area} slot {a.slot}: {a.kind}: {a.message}"
                    for a in result.anomalies)
    if image.error is not None:
        tail.append(f"error: {image.error}")
    if tail:
        out.write(("\n".join(tail) + "\n").encode())


def _header_dict(image: CowImage) -> dict[str, Any] | None:
    h = image.header
    if h is None:
        return None
    return {"magic": h.magic, "magic_ok": h.magic == SNAP_MAGIC, "valid": h.valid,
            "version": h.version, "chunk_size": h.chunk_sectors}


def write_json(result: CowDump, out: BinaryIO) -> None:
    image = result.image
    table = image.table
    doc: dict[str, Any] = {"header": _header_dict(image),
                           "cow_sectors": image.size_bytes // SECTOR_BYTES}
    if table is not None:
        doc.update({"exceptions_per_area": table.geometry.exceptions_per_area,
                    "exceptions": len(table), "current_area": table.current_area,
                    "current_committed": table.current_committed,
                    "next_free": table.next_free(), "status": result.status()})
    head = json.dumps(doc)[:-1].encode()
    out.write(head + b', "records": ')
    if table is not None and len(table):
        area, slot, old, new = result._record_columns()
        parts = [b"[", Num(area), b", ", Num(slot), b", ", Num(old), b", ", Num(new), b"], "]
        body = b"".join(render_lines(parts, len(table)))
        out.write(b"[" + body[:-2] + b"]")
    else:
        out.write(b"[]")
    anomalies = [a.as_dict() for a in result.anomalies] if result.anomalies is not None else []
    out.write(b', "anomalies": ' + json.dumps(anomalies).encode())
    out.write(b', "error": ' + json.dumps(image.error).encode() + b"}\n")

"""Trees: the directory listings of a snapshot (docs/backup-repository.md §8).

A tree blob is the JSON `{"nodes":[<node>,<node>,…]}` followed by a newline, nodes sorted by
name (byte order of their UTF-8), names unique. Its blob ID is the SHA-256 of exactly these
bytes, so a tree that did not change is stored once however many snapshots hold it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from blockera.backup.errors import RepositoryFormatError
from blockera.backup.ids import hash_id
from blockera.backup.node import Node


@dataclass
class Tree:
    nodes: list[Node] = field(default_factory=list)

    def sorted_nodes(self) -> list[Node]:
        nodes = sorted(self.nodes, key=lambda n: n.name.encode("utf-8", "surrogateescape"))
        for a, b in zip(nodes, nodes[1:]):
            if a.name == b.name:
                raise ValueError(f"a tree cannot hold two nodes named {a.name!r}")
        return nodes

    def encode(self) -> bytes:
        """The blob's bytes, as restic writes them."""
        body = ",".join(n.encode() for n in self.sorted_nodes())
        return ('{"nodes":[' + body + "]}\n").encode("utf-8")

    def id(self) -> bytes:
        return hash_id(self.encode())

    def find(self, name: str) -> Node | None:
        for node in self.nodes:
            if node.name == name:
                return node
        return None

    @classmethod
    def decode(cls, raw: bytes, what: str) -> "Tree":
        try:
            doc = json.loads(raw)
            nodes = [Node.from_json(n) for n in doc.get("nodes") or []]
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RepositoryFormatError(f"{what}: not a valid tree ({exc})") from None
        return cls(nodes)

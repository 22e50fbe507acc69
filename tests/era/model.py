"""Test-side description of era metadata: hypothesis strategies, an independent XML writer in
era_dump's layout, and ground truth computed directly from the description."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from hypothesis import strategies as st


@dataclass
class Desc:
    block_size: int
    nr_blocks: int
    current_era: int
    writesets: dict[int, np.ndarray] = field(default_factory=dict)   # era -> bool bits
    eras: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint32))

    def xml(self) -> str:
        out = [f'<superblock uuid="" block_size="{self.block_size}" nr_blocks="{self.nr_blocks}" '
               f'current_era="{self.current_era}">']
        for era in sorted(self.writesets):
            bits = self.writesets[era]
            out.append(f'  <writeset era="{era}" nr_bits="{len(bits)}">')
            out.extend(f'    <bit block="{i}" value="{"true" if v else "false"}"/>'
                       for i, v in enumerate(bits.tolist()))
            out.append("  </writeset>")
        out.append("  <era_array>")
        out.extend(f'    <era block="{i}" era="{e}"/>' for i, e in enumerate(self.eras.tolist()))
        out.append("  </era_array>")
        out.append("</superblock>")
        return "\n".join(out) + "\n"

    def write_xml(self, path: Path) -> Path:
        path.write_text(self.xml())
        return path

    def changed_since(self, threshold: int) -> list[int]:
        changed = set(np.flatnonzero(self.eras >= threshold).tolist())
        for era, bits in self.writesets.items():
            if era >= threshold:
                changed.update(np.flatnonzero(bits).tolist())
        return sorted(changed)

    def newest_eras(self) -> np.ndarray:
        out = self.eras.astype(np.int64).copy()
        for era, bits in self.writesets.items():
            hit = np.flatnonzero(bits[: self.nr_blocks])
            out[hit] = np.maximum(out[hit], era)
        return out

    def blocks_in_several_writesets(self) -> bool:
        counts = np.zeros(max([self.nr_blocks] + [len(b) for b in self.writesets.values()]), int)
        for bits in self.writesets.values():
            counts[: len(bits)] += bits
        return bool((counts[: self.nr_blocks] > 1).any())


def invalidate_xml(blocks: list[int]) -> bytes:
    """era_invalidate 0.9.0's output for a sorted block list, written independently."""
    lines = ["<blocks>"]
    i = 0
    while i < len(blocks):
        j = i
        while j + 1 < len(blocks) and blocks[j + 1] == blocks[j] + 1:
            j += 1
        if i == j:
            lines.append(f'  <block block="{blocks[i]}"/>')
        else:
            lines.append(f'  <range begin="{blocks[i]}" end = "{blocks[j] + 1}"/>')
        i = j + 1
    lines.append("</blocks>")
    return ("\n".join(lines) + "\n").encode()


@st.composite
def descs(draw, max_blocks: int = 4000, max_writesets: int = 4) -> Desc:
    nr_blocks = draw(st.one_of(st.integers(1, 70), st.integers(1010, 1030),
                               st.integers(32570, 32580), st.integers(1, max_blocks)))
    current_era = draw(st.one_of(st.integers(0, 20), st.integers(0, 2**32 - 1)))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    nr_ws = draw(st.integers(0, max_writesets))
    ws_eras = draw(st.lists(st.integers(0, current_era), min_size=nr_ws, max_size=nr_ws,
                            unique=True)) if current_era >= nr_ws else []
    writesets = {}
    for era in ws_eras:
        nr_bits = draw(st.sampled_from([nr_blocks, nr_blocks, max(1, nr_blocks - 5),
                                        nr_blocks + 70]))
        density = draw(st.sampled_from([0.0, 0.01, 0.3, 1.0]))
        writesets[era] = rng.random(nr_bits) < density
    eras = rng.integers(0, current_era + 1, nr_blocks, dtype=np.uint64).astype(np.uint32)
    if draw(st.booleans()):
        eras[rng.random(nr_blocks) < 0.7] = 0
    block_size = draw(st.sampled_from([8, 24, 128, 4096, 2**20]))
    return Desc(block_size, nr_blocks, current_era, writesets, eras)

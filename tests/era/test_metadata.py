"""Era metadata operations against the kernel's recorded behaviour and a simple model."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from blockera.blockdev import MemoryDevice
from blockera.errors import NoSpaceError, TargetError
from blockera.era.check import check_era_metadata
from blockera.era.metadata import DigestProgress, EraMetadata
from blockera.era.image import EraImage


def _create(dev, nr_blocks: int, block_size: int = 128) -> EraMetadata:
    """What `dmsetup create` does: format, then preresume (resize + commit, rollover + commit)."""
    md = EraMetadata(dev, block_size)
    md.resize(nr_blocks)
    md.commit()
    md.era_rollover()
    md.commit()
    return md


def _write(md: EraMetadata, *blocks: int) -> None:
    """One batch of first writes: on-disk bits, commit, then the in-core bits."""
    new = [b for b in blocks if not md.writeset_test_and_set(b)]
    if new:
        md.commit()
        for b in new:
            md.current_writeset.mark(b)


def test_status_used_counts_follow_the_kernel_trace() -> None:
    # docs/era.md §3 (8 MiB metadata, 512 x 64 KiB blocks), real kernel 6.1
    md = _create(MemoryDevice(8 << 20), 512)
    trace = [(md.stats().used, md.stats().era)]
    _write(md, 3)
    _write(md, 200)
    _write(md, 201)
    trace.append((md.stats().used, md.stats().era))
    md.checkpoint()
    md.commit()
    trace.append((md.stats().used, md.stats().era))
    md.digest_all()
    _write(md, 5, 3)
    trace.append((md.stats().used, md.stats().era))
    md.take_snap()
    md.commit()
    trace.append((md.stats().used, md.stats().era))
    md.digest_all()
    _write(md, 7)
    trace.append((md.stats().used, md.stats().era))
    md.drop_snap()
    md.commit()
    trace.append((md.stats().used, md.stats().era))
    md.checkpoint()
    md.commit()
    trace.append((md.stats().used, md.stats().era))
    assert trace == [(9, 1), (9, 1), (11, 2), (9, 2), (12, 3), (15, 3), (9, 3), (11, 4)]
    assert md.stats().total == 2048


def test_snapshot_messages_fail_like_the_kernel() -> None:
    md = _create(MemoryDevice(1 << 20), 64)
    with pytest.raises(TargetError, match="no snap to drop"):
        md.drop_snap()
    md.take_snap()
    md.commit()
    with pytest.raises(TargetError, match="metadata snapshot already exists"):
        md.take_snap()


def test_metadata_full_fails_cleanly_and_keeps_what_was_tracked() -> None:
    from blockera.era.size import metadata_size

    minimum = metadata_size(4096 * 8, 8).minimum_blocks
    dev = MemoryDevice((minimum + 4) * 4096)
    md = _create(dev, 4096, block_size=8)
    _write(md, 10)
    md.checkpoint()
    md.commit()
    tracked_era = md.current_era
    with pytest.raises(NoSpaceError, match="metadata device is full"):
        for _ in range(20):
            md.checkpoint()
            md.commit()
    md.abort()
    assert check_era_metadata(dev).ok
    image = EraImage(dev)
    assert image.changed_since(tracked_era - 1)[10]
    assert md.current_era >= tracked_era


def test_reopen_continues_from_disk() -> None:
    dev = MemoryDevice(1 << 20)
    md = _create(dev, 300)
    _write(md, 1, 2, 250)
    md.checkpoint()
    md.commit()
    again = EraMetadata(dev, 128)
    assert (again.current_era, again.nr_blocks) == (md.current_era, 300)
    with pytest.raises(Exception, match="changing the data block size"):
        EraMetadata(dev, 256)


class EraMachine(RuleBasedStateMachine):
    """Random writes, checkpoints, digestion steps, metadata snapshots, resizes and reopens
    keep the metadata valid (exact reference counts) and equal to a model of last-written
    eras; the live view and the snapshot view both match."""

    def __init__(self) -> None:
        super().__init__()
        self.dev = MemoryDevice(4 << 20)
        self.digest = DigestProgress()

    @initialize(nr_blocks=st.integers(1, 3000))
    def create(self, nr_blocks: int) -> None:
        self.md = _create(self.dev, nr_blocks, 8)
        self.nr_blocks = nr_blocks
        self.last = np.zeros(nr_blocks, dtype=np.int64)     # model: era of the last write
        self.ever = np.zeros(3000, dtype=np.int64)          # newest era ever written, any size
        self.shrunk = False
        self.current: set[int] = set()
        self.snapshot: np.ndarray | None = None

    @rule(data=st.data())
    def write(self, data: st.DataObject) -> None:
        blocks = data.draw(st.lists(st.integers(0, self.nr_blocks - 1), min_size=1, max_size=8))
        _write(self.md, *blocks)
        self.current.update(blocks)

    def _archive_current(self) -> None:
        for b in self.current:
            self.last[b] = self.md.current_era
            self.ever[b] = self.md.current_era
        self.current = set()

    @rule()
    def checkpoint(self) -> None:
        self._archive_current()
        self.md.checkpoint()
        self.md.commit()

    @rule(steps=st.integers(1, 40))
    def digest_steps(self, steps: int) -> None:
        self.md.digest_start(self.digest)
        for _ in range(steps):
            if self.digest.step is None:
                break
            self.md.digest_step(self.digest)
        self.md.commit()

    @precondition(lambda self: self.snapshot is None)
    @rule()
    def take_snapshot(self) -> None:
        self._archive_current()
        self.md.take_snap()
        self.md.commit()
        self.snapshot = self.last.copy()

    @precondition(lambda self: self.snapshot is not None)
    @rule()
    def drop_snapshot(self) -> None:
        self.md.drop_snap()
        self.md.commit()
        self.snapshot = None

    @rule(new_size=st.integers(1, 3000))
    def resize(self, new_size: int) -> None:
        """preresume with a new table length; restart digestion as a new instance would."""
        self._archive_current()
        self.md.resize(new_size)
        self.md.commit()
        self.md.era_rollover()
        self.md.commit()
        self.digest = DigestProgress()
        self.shrunk |= new_size < self.nr_blocks
        grown = np.zeros(new_size, dtype=np.int64)
        keep = min(new_size, self.nr_blocks)
        grown[:keep] = self.last[:keep]
        self.last = grown
        self.nr_blocks = new_size

    @rule()
    def reopen(self) -> None:
        """Reload the table: a fresh instance reads the superblock, archives the current era."""
        self.md.commit()
        self._archive_current()
        self.md = EraMetadata(self.dev, 8)
        self.md.resize(self.nr_blocks)
        self.md.commit()
        self.md.era_rollover()
        self.md.commit()
        self.digest = DigestProgress()

    @invariant()
    def metadata_is_valid_and_matches_the_model(self) -> None:
        report = check_era_metadata(self.dev)
        unexpected = [w for w in report.warnings if "past the end of the array" not in w]
        assert report.ok and not unexpected, report.lines()
        image = EraImage(self.dev)
        logical = image.logical_eras().astype(np.int64)
        assert len(logical) == self.nr_blocks
        # Writes of the current era count from the moment their marks are committed.
        live = self.last.copy()
        live[sorted(self.current)] = self.md.current_era
        if not self.shrunk:
            assert np.array_equal(logical, live)
        else:
            # After a shrink, writes beyond the new end may come back when the device grows
            # again before their writeset is digested (the kernel clips only at digestion):
            # never fewer changes than were made, never an era nobody wrote in.
            assert np.all(logical >= live)
            assert np.all(logical <= np.maximum(self.ever[: self.nr_blocks], live))
        if self.snapshot is not None and not self.shrunk:
            snap = EraImage(self.dev, use_snapshot=True)
            assert np.array_equal(snap.logical_eras().astype(np.int64), self.snapshot)


EraMachine.TestCase.settings = settings(max_examples=30, stateful_step_count=25, deadline=None)
TestEraMachine = EraMachine.TestCase

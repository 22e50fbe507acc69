"""The kernel's persistent-data library (drivers/md/persistent-data), byte-compatible:
checksums and validators, block manager and transactions, the metadata space map, btrees,
arrays and bitsets. See docs/persistent-data.md."""

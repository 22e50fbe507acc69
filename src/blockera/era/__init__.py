"""dm-era: its on-disk metadata (superblock, writeset tree, era array), the metadata-level
operations the target performs, the era target itself, and the era tools
(docs/era.md §1, §2, §3, §5, §6; docs/persistent-data.md §7)."""

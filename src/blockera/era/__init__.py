"""dm-era: its on-disk metadata (superblock, writeset tree, era array), the metadata-level
operations the target performs, the era target itself, and the era tools
(specs/era-metadata.md §9-§15)."""

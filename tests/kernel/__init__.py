"""Tests against the real Linux device-mapper, run inside a qemu guest."""

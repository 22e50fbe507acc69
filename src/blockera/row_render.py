"""Vectorised rendering of text made of many similar rows: the line-per-element XML the era
tools print, the range lists of the COW tools.

A dump of a 16 TiB device has tens of millions of `<bit .../>` and `<era .../>` lines; formatting
them one Python string at a time is what makes such tools slow. Here each batch of lines is laid
out as a 2-D byte array (one row per line, fixed-width fields padded with NUL), the digits of
every number are filled column by column with numpy, and the NULs are squeezed out at the end.
NUL never occurs in the output, so the squeeze cannot remove real content.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence, Union

import numpy as np

_PAD = 0
BATCH_ROWS = 1 << 19


@dataclass
class Num:
    """A decimal number per row. Rows where `show` is False render nothing."""

    values: np.ndarray
    show: np.ndarray | None = None


@dataclass
class Choice:
    """One of several byte strings per row, picked by `index`."""

    index: np.ndarray
    options: Sequence[bytes]


Part = Union[bytes, Num, Choice]


def _digits_needed(max_value: int) -> int:
    return max(1, len(str(max_value)))


_POW10 = np.array([10 ** k for k in range(1, 20)], dtype=np.uint64)


def _fill_number(grid: np.ndarray, col: int, width: int, values: np.ndarray,
                 show: np.ndarray | None) -> None:
    """Right-align the decimal digits of `values` in columns [col, col + width); digits before
    a number's first digit (and whole rows where `show` is False) stay NUL. Digits are built
    one contiguous row per position (two per division) and transposed into place once."""
    ndigits = np.searchsorted(_POW10, values.astype(np.uint64), side="right") + 1
    if show is not None:
        ndigits = np.where(show, ndigits, 0)
    x = values.astype(np.uint32 if width <= 9 else np.uint64)
    ten, hundred = x.dtype.type(10), x.dtype.type(100)
    digits = np.empty((width, len(x)), dtype=np.uint8)
    for k in range(0, width, 2):
        pair = x % hundred
        x //= hundred
        np.multiply((pair % ten).astype(np.uint8) + np.uint8(48), ndigits > k,
                    out=digits[width - 1 - k])
        if k + 1 < width:
            np.multiply((pair // ten).astype(np.uint8) + np.uint8(48), ndigits > k + 1,
                        out=digits[width - 2 - k])
    grid[:, col: col + width] = digits.T


def _render_batch(parts: Sequence[Part], start: int, stop: int) -> bytes:
    n = stop - start
    widths: list[int] = []
    for part in parts:
        if isinstance(part, bytes):
            widths.append(len(part))
        elif isinstance(part, Num):
            vals = part.values[start:stop]
            widths.append(_digits_needed(int(vals.max())) if n else 1)
        else:
            widths.append(max(len(o) for o in part.options))
    grid = np.zeros((n, sum(widths)), dtype=np.uint8)
    col = 0
    for part, width in zip(parts, widths):
        if isinstance(part, bytes):
            grid[:, col: col + width] = np.frombuffer(part, dtype=np.uint8)
        elif isinstance(part, Num):
            _fill_number(grid, col, width, part.values[start:stop],
                         None if part.show is None else part.show[start:stop])
        else:
            table = np.zeros((len(part.options), width), dtype=np.uint8)
            for i, option in enumerate(part.options):
                table[i, : len(option)] = np.frombuffer(option, dtype=np.uint8)
            grid[:, col: col + width] = table[part.index[start:stop]]
        col += width
    return grid[grid != _PAD].tobytes()


def render_lines(parts: Sequence[Part], nr_rows: int, batch_rows: int = BATCH_ROWS,
                 on_rows: Callable[[int], object] | None = None) -> Iterator[bytes]:
    """Yield the concatenated rows, batch by batch (calling `on_rows(count)` after each)."""
    for start in range(0, nr_rows, batch_rows):
        end = min(nr_rows, start + batch_rows)
        yield _render_batch(parts, start, end)
        if on_rows is not None:
            on_rows(end - start)

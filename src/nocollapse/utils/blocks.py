"""Row blocks for the passes over B x K matrices.

At the papers' K = 65,536 a 256 x K fp32 matrix is 64 MiB: each elementwise pass over it is
memory traffic, not arithmetic. Working through such a matrix a block of rows at a time, with
every step of one block done before the next block is read, keeps the block in the processor's
cache, so that a chain of elementwise steps costs about one pass over memory instead of one each.
"""

from __future__ import annotations

# elements of one block of rows (fp32: 1 MiB), the unit the B x K passes work on
BLOCK_ELEMENTS = 1 << 18


def row_blocks(rows: int, width: int, block_elements: int | None = None) -> list[slice]:
    """Consecutive row ranges of a ``rows x width`` matrix, each of about ``block_elements``
    (default ``BLOCK_ELEMENTS``) elements and at least one row."""
    step = max(1, (block_elements or BLOCK_ELEMENTS) // max(width, 1))
    return [slice(start, min(start + step, rows)) for start in range(0, rows, step)]


def column_blocks(rows: int, width: int, block_elements: int | None = None, min_width: int = 256) -> list[slice]:
    """Consecutive column ranges of a ``rows x width`` matrix, each of about ``block_elements``
    elements and at least ``min_width`` columns (so that a product with one block still runs at
    the matrix unit's speed)."""
    step = max(min_width, (block_elements or BLOCK_ELEMENTS) // max(rows, 1), 1)
    return [slice(start, min(start + step, width)) for start in range(0, width, step)]

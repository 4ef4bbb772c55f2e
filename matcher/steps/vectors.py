"""Vectors in Arrow columns: the one conversion from a list<float> column to a float32 matrix, and back."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def vector_matrix(column: pa.ChunkedArray | pa.Array, dim: int | None = None, name: str = "vector",
                  row_ids: np.ndarray | None = None) -> np.ndarray:
    """A list<float> column as a (rows, d) float32 matrix. `dim` is d when known; else the rows give it, and they
    must agree. A null row, or a row of another length, is a ValueError naming the column and the row (by its
    `row_ids` entry, e.g. the score stage's idx, when given)."""
    lists = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(lists) == 0:
        return np.zeros((0, dim or 0), np.float32)

    def row(i: int) -> str:
        return f"row {i}" if row_ids is None else f"idx {int(row_ids[i])}"

    if lists.null_count:
        raise ValueError(f"{name} is null in {row(int(np.argmax(np.asarray(lists.is_null()))))}")
    lengths = pc.list_value_length(lists).to_numpy()
    width = lengths[0] if dim is None else dim
    if (lengths != width).any():
        bad = int(np.argmax(lengths != width))
        raise ValueError(f"{name} of {row(bad)} has {lengths[bad]} values, not {width}")
    flat = lists.flatten().to_numpy(zero_copy_only=False)
    matrix = np.ascontiguousarray(flat, dtype=np.float32).reshape(len(lists), int(width))
    # A view of Arrow's read-only buffer: torch warns on a tensor over it (the train stage's log said so every night).
    return matrix if matrix.flags.writeable else matrix.copy()


def vector_column(matrix: np.ndarray) -> pa.Array:
    """A (rows, d) matrix as a list<float> column, without a Python list per row."""
    matrix = np.ascontiguousarray(matrix, dtype=np.float32)
    rows, width = matrix.shape
    offsets = np.arange(rows + 1, dtype=np.int32) * width
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(matrix.ravel()))

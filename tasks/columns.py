"""Arrow columns and NumPy arrays through their buffers, both ways.

pyarrow's own conversions (``Array.to_numpy``, ``pa.array`` of an ndarray) and its dataset layer
(``pq.read_table``) import pandas: a quarter to most of a second of a command that needs none of
it (a rerun with nothing to do, a query's start). Numeric columns without nulls need no more
than their data buffer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa

_DTYPES: dict[pa.DataType, np.dtype[Any]] = {
    pa.int64(): np.dtype(np.int64),
    pa.int32(): np.dtype(np.int32),
    pa.uint8(): np.dtype(np.uint8),
    pa.float32(): np.dtype(np.float32),
    pa.float64(): np.dtype(np.float64),
}


def numbers(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The values (n,) of a numeric column without nulls: a read-only view of its buffer (of a
    one-chunk column; several chunks are joined first)."""
    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    dtype = _DTYPES.get(array.type)
    if dtype is None or array.null_count:
        raise ValueError(f"expected numbers without nulls, got {array.type} ({array.null_count})")
    if len(array) == 0:
        return np.empty(0, dtype)
    return np.frombuffer(array.buffers()[1], dtype, len(array), array.offset * dtype.itemsize)


def int64_array(values: np.ndarray) -> pa.Array:
    """``values`` (n,) as an Arrow int64 array."""
    data = np.ascontiguousarray(values, dtype=np.int64)
    return pa.Array.from_buffers(pa.int64(), len(data), [None, pa.py_buffer(data)])

"""Arrow columns as NumPy arrays through their buffers: the values pyarrow's own conversion
gives, for slices and several chunks too, without importing pandas."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pyarrow as pa
import pytest

from tasks.columns import int64_array, numbers


@pytest.mark.parametrize("dtype", [np.int64, np.int32, np.uint8, np.float32, np.float64])
def test_numbers_are_the_columns_values(dtype: type) -> None:
    values = (np.arange(50) * 3).astype(dtype)
    array = pa.array(values)
    np.testing.assert_array_equal(numbers(array), values)
    np.testing.assert_array_equal(numbers(array.slice(7, 20)), values[7:27])  # an offset
    chunked = pa.chunked_array([array.slice(0, 10), array.slice(10)])
    np.testing.assert_array_equal(numbers(chunked), values)
    assert numbers(array).dtype == np.dtype(dtype)
    assert len(numbers(array.slice(5, 0))) == 0


def test_nulls_and_other_types_are_refused() -> None:
    with pytest.raises(ValueError, match="without nulls"):
        numbers(pa.array([1, None, 3], pa.int64()))
    with pytest.raises(ValueError, match="string"):
        numbers(pa.array(["a"]))


def test_int64_array_round_trips() -> None:
    values = np.array([5, -1, 2**40], dtype=np.int64)
    array = int64_array(values)
    assert array.type == pa.int64() and array.to_pylist() == values.tolist()


@pytest.mark.slow
def test_no_pandas_on_the_way() -> None:
    """What these helpers exist for: pyarrow's own conversions import pandas."""
    code = (
        "import sys, numpy as np, pyarrow as pa\n"
        "from tasks.columns import numbers, int64_array\n"
        "numbers(pa.chunked_array([int64_array(np.arange(9))]))\n"
        "assert 'pandas' not in sys.modules\n"
        "pa.array(np.arange(3)).to_numpy()\n"
        "print('pandas' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"  # pyarrow's own conversion does import it

"""The comparison every chain-equivalence test uses."""

import chex
import numpy as np


def assert_relatively_close(actual, expected, tol: float) -> None:
    """``max |actual - expected| <= tol · max |expected|``, against a non-zero reference."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    chex.assert_equal_shape([actual, expected])
    scale = float(np.abs(expected).max())
    assert scale > 0, "the reference is identically zero: the comparison would prove nothing"
    chex.assert_trees_all_close(actual, expected, rtol=0.0, atol=tol * scale)

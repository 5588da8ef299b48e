"""Linear-time stable sorts by small integer keys (user or item indices), compiled: O(n + keys) where a
comparison sort of millions of rows is O(n log n) with a random memory access per step."""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True)
def counting_sort(keys, n_keys, order):
    """`order` stably re-sorted by keys[order] (keys in [0, n_keys)): one counting sort, O(n + n_keys)."""
    start = np.zeros(n_keys + 1, np.int64)
    for j in range(order.shape[0]):
        start[keys[order[j]] + 1] += 1
    start = np.cumsum(start)
    out = np.empty_like(order)
    for j in range(order.shape[0]):
        k = keys[order[j]]
        out[start[k]] = order[j]
        start[k] += 1
    return out

"""Token-position bins for streaming cross-entropy (paper Fig. 5: CE of each bin relative to the first bin).

Position ``t`` (0-based, the position of the *predicted* token in the document) falls in bin ``t // bin_size``.
:func:`bin_means` averages per-position values (e.g. per-token CE) inside each bin; :func:`bin_means_reference`
is the readable loop it is tested against. :func:`relative_to_first` gives ``(m_b - m_0) / m_0``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def bin_index(position: int, bin_size: int) -> int:
    """The bin of a 0-based token position."""
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    if position < 0:
        raise ValueError(f"position must be >= 0, got {position}")
    return position // bin_size


def bin_edges(n_positions: int, bin_size: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` half-open position ranges covering ``range(n_positions)``; the last may be short."""
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    return [(s, min(s + bin_size, n_positions)) for s in range(0, n_positions, bin_size)]


def bin_means_reference(values: Sequence[float], bin_size: int) -> list[float]:
    """Mean of ``values[start:end]`` for each bin, one Python loop (the specification)."""
    out = []
    for start, end in bin_edges(len(values), bin_size):
        chunk = [float(v) for v in values[start:end]]
        out.append(sum(chunk) / len(chunk))
    return out


def bin_means(values: Sequence[float] | np.ndarray, bin_size: int, mask: Sequence[bool] | None = None) -> np.ndarray:
    """Vectorised per-bin means of ``values`` with shape ``[T]`` or ``[N, T]`` (documents x positions).

    ``mask`` (same shape, True = counted) excludes padding; a bin with no counted value is NaN. For 2-D input
    the mean runs over every counted value of the bin across documents (token-weighted).
    """
    if bin_size < 1:
        raise ValueError(f"bin_size must be >= 1, got {bin_size}")
    v = np.asarray(values, dtype=np.float64)
    if v.ndim == 1:
        v = v[None, :]
    if v.ndim != 2:
        raise ValueError(f"values must be 1-D or 2-D, got shape {v.shape}")
    m = np.ones_like(v, dtype=bool) if mask is None else np.asarray(mask, dtype=bool).reshape(v.shape)
    n_bins = -(-v.shape[1] // bin_size)
    pad = n_bins * bin_size - v.shape[1]
    v = np.pad(np.where(m, v, 0.0), ((0, 0), (0, pad)))
    m = np.pad(m, ((0, 0), (0, pad)))
    sums = v.reshape(v.shape[0], n_bins, bin_size).sum(axis=(0, 2))
    counts = m.reshape(m.shape[0], n_bins, bin_size).sum(axis=(0, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


def relative_to_first(means: Sequence[float]) -> list[float]:
    """``(m_b - m_0) / m_0`` for each bin (0 for the first bin)."""
    if len(means) == 0:
        raise ValueError("relative_to_first needs at least one bin")
    first = float(means[0])
    if first == 0.0:
        raise ValueError("relative_to_first: the first bin's mean is 0")
    return [(float(m) - first) / first for m in means]

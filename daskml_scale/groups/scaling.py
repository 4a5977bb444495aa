"""Per-group scaling (``fit_groups(..., per_group_scaling=True)``): every group's
numeric features standardized with the group's own mean and scale.

The Preprocessor's statistics stay global (one pass over the data, before the
shuffle): its transform gives every numeric feature as ``z = (x - mean) / scale``.
After the shuffle, a worker holds each group's rows whole and computes, per group
and numeric column, the mean and the standard deviation of the group's *training*
rows (held-out rows are not looked at), in the units of the raw column, as the
Preprocessor does globally: a constant column gets scale 1. A group's features are
then ``(x - group_mean) / group_scale``, computed from ``z`` (the raw values are not
kept): ``(z * scale + mean - group_mean) / group_scale``.

The statistics are stored in the group bundle next to the weights and applied at
prediction to every row routed to its group's model. Rows of other groups (unseen,
under ``min_rows``, no key) go to the fallback model with the global statistics,
which is what the fallback was trained on.

The numeric features are the first ``len(preprocessor.numeric)`` columns of the
transform's output (:meth:`daskml_scale.Preprocessor.feature_names_`).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

__all__ = ["GroupScaling", "group_statistics", "apply_group_scaling"]


class GroupScaling:
    """The per-group statistics of the numeric columns: ``means`` and ``scales``, each
    ``(groups, columns)`` in the raw columns' units, in the order of the stacked weights;
    ``global_means`` / ``global_scales`` are the Preprocessor's."""

    def __init__(self, columns: Sequence[str], means: np.ndarray, scales: np.ndarray,
                 global_means: Sequence[float], global_scales: Sequence[float]) -> None:
        self.columns = [str(c) for c in columns]
        self.means = np.asarray(means, np.float64).reshape(-1, len(self.columns))
        self.scales = np.asarray(scales, np.float64).reshape(-1, len(self.columns))
        self.global_means = np.asarray(global_means, np.float64)
        self.global_scales = np.asarray(global_scales, np.float64)
        if self.means.shape != self.scales.shape:
            raise ValueError(f"Expected means and scales of one shape. Received: {self.means.shape}, {self.scales.shape}")
        if len(self.global_means) != len(self.columns) or len(self.global_scales) != len(self.columns):
            raise ValueError(f"Expected global statistics for the {len(self.columns)} numeric columns")
        if np.any(~np.isfinite(self.scales)) or np.any(self.scales <= 0):
            raise ValueError("Expected positive, finite per-group scales")

    @classmethod
    def of(cls, preprocessor: Any, means: np.ndarray, scales: np.ndarray) -> "GroupScaling":
        cols = list(preprocessor.numeric)
        return cls(cols, means, scales, [preprocessor.means_[c] for c in cols],
                   [preprocessor.scales_[c] for c in cols])

    def __len__(self) -> int:
        return len(self.means)

    def apply(self, X: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``X`` (the Preprocessor's output) with row ``i``'s numeric columns rescaled by
        group ``codes[i]``'s statistics; a copy, float32."""
        return apply_group_scaling(X, codes, self.means, self.scales, self.global_means, self.global_scales)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"means": self.means, "scales": self.scales}


def group_statistics(X: np.ndarray, positions: Sequence[np.ndarray], global_means: Sequence[float],
                     global_scales: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Per group (its training rows ``positions[g]`` of ``X``), the mean and scale of
    every numeric column in raw units: ``(means, scales)``, each ``(groups, columns)``."""
    k = len(global_means)
    m = np.asarray(global_means, np.float64)
    s = np.asarray(global_scales, np.float64)
    means = np.empty((len(positions), k), np.float64)
    scales = np.empty((len(positions), k), np.float64)
    for g, pos in enumerate(positions):
        z = np.asarray(X[pos, :k], np.float64)
        if len(z) == 0:
            means[g], scales[g] = m, s
            continue
        mu = z.mean(axis=0)
        sd = z.std(axis=0)
        means[g] = m + s * mu
        raw_sd = s * sd
        # a column constant within the group gets scale 1, as the Preprocessor does globally
        scales[g] = np.where(raw_sd > 1e-12 * np.maximum(1.0, np.abs(means[g])), raw_sd, 1.0)
    return means, scales


def apply_group_scaling(X: np.ndarray, codes: np.ndarray, means: np.ndarray, scales: np.ndarray,
                        global_means: np.ndarray, global_scales: np.ndarray) -> np.ndarray:
    """Rows of ``X`` rescaled by their group (``codes``, positions in ``means``/``scales``)."""
    k = means.shape[1]
    out = np.array(X, dtype=np.float32, copy=True)
    if k == 0 or len(out) == 0:
        return out
    codes = np.asarray(codes, np.int64)
    raw = out[:, :k].astype(np.float64) * global_scales + global_means
    out[:, :k] = ((raw - means[codes]) / scales[codes]).astype(np.float32)
    return out

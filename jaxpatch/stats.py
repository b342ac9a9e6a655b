"""Rank statistics shared by every method's evaluation: ranks, Spearman correlation, ROC.

One rank convention everywhere: 1-based ranks of ascending values, ties sharing their average
rank.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = ["average_ranks", "spearman", "roc_auc", "roc_curve"]


def average_ranks(x: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks of ascending values, ties sharing their average rank.

    Arguments:
        x: the values.

    Returns:
        float64 ranks, one per value.

    Example:
        >>> average_ranks([10.0, 30.0, 20.0, 20.0]).tolist()
        [1.0, 4.0, 2.5, 2.5]
    """
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse.reshape(-1), weights=ranks)
    return (sums / counts)[inverse.reshape(-1)]


def spearman(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties); NaN when either side is constant.

    Example:
        >>> spearman([1, 2, 3], [10, 20, 30])
        1.0
        >>> spearman([1, 2, 3], [3, 1, 2])
        -0.5
    """
    ra, rb = average_ranks(a), average_ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def roc_auc(scores: Sequence[float] | np.ndarray, labels: Sequence[bool] | np.ndarray) -> float:
    """The area under the ROC curve of ranking by `scores` (higher = more likely in the set):
    the probability that a random positive outranks a random negative, ties counting one half.

    Arguments:
        scores: one score per component.
        labels: True for components in the planted set.

    Returns:
        The AUC in [0, 1] (0.5 for a random ranking); NaN when either class is empty.

    Example:
        >>> roc_auc([0.9, 0.1, 0.5, 0.5], [True, False, True, False])
        0.875
    """
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    if s.shape != y.shape:
        raise ValueError(f"{len(s)} scores for {len(y)} labels")
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = average_ranks(s)
    return float((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def roc_curve(scores: Sequence[float] | np.ndarray,
              labels: Sequence[bool] | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """False- and true-positive rates at every threshold, from (0, 0) to (1, 1); tied scores
    move along one diagonal step.

    Example:
        >>> fpr, tpr = roc_curve([0.9, 0.1], [True, False])
        >>> fpr.tolist(), tpr.tolist()
        ([0.0, 0.0, 1.0], [0.0, 1.0, 1.0])
    """
    s, y = np.asarray(scores, np.float64), np.asarray(labels, bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s) != 0), len(s) - 1]
    tp, fp = np.cumsum(y)[last_of_tie], np.cumsum(~y)[last_of_tie]
    tpr = np.r_[0.0, tp / max(int(y.sum()), 1)]
    fpr = np.r_[0.0, fp / max(int((~y).sum()), 1)]
    return fpr, tpr

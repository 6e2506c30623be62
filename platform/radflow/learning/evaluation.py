"""Judging model versions: operating points, calibration and the paired AUC test for promotion.

A new version replaces the champion only if its AUC on the task's fixed evaluation set is
higher with statistical significance: DeLong's test for two correlated ROC curves (DeLong,
DeLong & Clarke-Pearson, Biometrics 1988), computed with the fast midrank algorithm of Sun & Xu
(IEEE Signal Processing Letters 21(11), 2014), one-sided at ``settings.promotion_alpha``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import norm, rankdata
from sklearn.metrics import roc_auc_score, roc_curve

from radflow.learning.tasks import OperatingPoint


def youden_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    if len(np.unique(targets)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(targets, scores)
    best = int(np.argmax(tpr - fpr))
    return float(min(max(thresholds[best], 0.0), 1.0))


def max_accuracy_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold with the highest accuracy (the highest such cut on a tie)."""
    if len(np.unique(targets)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(targets, scores)
    positives = float(np.sum(targets == 1))
    correct = tpr * positives + (1.0 - fpr) * (len(targets) - positives)
    best = int(np.argmax(correct))
    return float(min(max(thresholds[best], 0.0), 1.0))


def binary_metrics(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and accuracy, sensitivity and specificity at ``threshold``."""
    targets = targets.astype(int)
    predicted = scores >= threshold
    positives, negatives = targets == 1, targets == 0
    return {
        "auc": float(roc_auc_score(targets, scores))
        if positives.any() and negatives.any()
        else float("nan"),
        "accuracy": float((predicted == positives).mean()) if len(targets) else float("nan"),
        "sensitivity": float(predicted[positives].mean()) if positives.any() else float("nan"),
        "specificity": float((~predicted[negatives]).mean()) if negatives.any() else float("nan"),
        "threshold": float(threshold),
        "n": float(len(targets)),
    }


@dataclass(frozen=True)
class DeLong:
    """AUCs of k classifiers on the same cases and the covariance of those estimates."""

    aucs: np.ndarray  # (k,)
    covariance: np.ndarray  # (k, k)


def delong(targets: np.ndarray, scores: np.ndarray) -> DeLong:
    """DeLong AUCs and covariance for ``scores`` of shape (k, n) against binary ``targets``."""
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    targets = np.asarray(targets).astype(bool)
    positives, negatives = scores[:, targets], scores[:, ~targets]
    m, n = positives.shape[1], negatives.shape[1]
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong's test needs at least 2 positive and 2 negative cases, got {m} and {n}"
        )
    # Midranks (average ranks of ties) within each class and over all cases.
    tx = rankdata(positives, axis=1)
    ty = rankdata(negatives, axis=1)
    tz = rankdata(np.concatenate([positives, negatives], axis=1), axis=1)
    aucs = tz[:, :m].sum(axis=1) / (m * n) - (m + 1.0) / (2.0 * n)
    v01 = (tz[:, :m] - tx) / n  # structural components of the positive cases
    v10 = 1.0 - (tz[:, m:] - ty) / m  # ... and of the negative cases
    sx = np.atleast_2d(np.cov(v01))
    sy = np.atleast_2d(np.cov(v10))
    return DeLong(aucs=aucs, covariance=sx / m + sy / n)


@dataclass(frozen=True)
class PairedTest:
    auc_new: float
    auc_old: float
    z: float
    p_value: float  # one-sided: H1 is "the new AUC is higher"


def delong_paired(targets: np.ndarray, new: np.ndarray, old: np.ndarray) -> PairedTest:
    """One-sided DeLong test that ``new`` has a higher AUC than ``old`` on the same cases."""
    result = delong(targets, np.vstack([new, old]))
    diff = float(result.aucs[0] - result.aucs[1])
    cov = result.covariance
    variance = float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    if variance <= 1e-15:
        # Identical rankings: no evidence either way.
        z = 0.0 if abs(diff) < 1e-12 else float(np.sign(diff) * np.inf)
    else:
        z = diff / np.sqrt(variance)
    return PairedTest(float(result.aucs[0]), float(result.aucs[1]), z, float(norm.sf(z)))


def expected_calibration_error(targets: np.ndarray, scores: np.ndarray, bins: int = 10) -> float:
    """ECE: the gap between predicted probability and observed frequency, over equal-width bins."""
    targets = np.asarray(targets, dtype=np.float64)
    scores = np.asarray(scores, dtype=np.float64)
    if len(targets) == 0:
        return float("nan")
    which = np.minimum((scores * bins).astype(int), bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += in_bin.mean() * abs(scores[in_bin].mean() - targets[in_bin].mean())
    return float(ece)


def choose_threshold(policy: OperatingPoint, targets: np.ndarray, scores: np.ndarray) -> float:
    """The operating threshold the task's policy picks on validation scores."""
    if policy.policy == "youden":
        return youden_threshold(targets, scores)
    if policy.policy == "max-accuracy":
        return max_accuracy_threshold(targets, scores)
    if len(np.unique(targets)) < 2:
        return 0.5
    _fpr, tpr, thresholds = roc_curve(targets, scores)
    # The highest threshold (best specificity) that still reaches the target sensitivity.
    reaching = np.flatnonzero(tpr >= policy.target_sensitivity)
    return float(min(max(thresholds[reaching[0]], 0.0), 1.0))


def evaluate(targets: np.ndarray, scores: np.ndarray, threshold: float) -> dict[str, float]:
    """AUC, and ACC, sensitivity, specificity at ``threshold``, and calibration (ECE)."""
    metrics = binary_metrics(targets, scores, threshold)
    metrics["ece"] = expected_calibration_error(targets, scores)
    return metrics


@dataclass(frozen=True)
class Decision:
    promote: bool
    reason: str
    test: PairedTest | None


def decide(
    targets: np.ndarray, new: np.ndarray, champion: np.ndarray | None, alpha: float
) -> Decision:
    """Whether the new version replaces the champion, and why, in words for the registry."""
    if champion is None:
        return Decision(True, "no champion yet: the first version becomes champion", None)
    positives = int(np.asarray(targets).astype(bool).sum())
    if min(positives, len(targets) - positives) < 2:
        return Decision(
            False,
            f"challenger: the evaluation set ({positives} positive, {len(targets) - positives} "
            "negative studies) is too small for the paired test; promote by hand if wanted",
            None,
        )
    test = delong_paired(targets, new, champion)
    summary = (
        f"AUC {test.auc_new:.4f} vs champion {test.auc_old:.4f} on {len(targets)} evaluation "
        f"studies; one-sided DeLong p = {test.p_value:.3g} (alpha {alpha:g})"
    )
    if test.auc_new > test.auc_old and test.p_value < alpha:
        return Decision(True, f"promoted: better than the champion. {summary}", test)
    return Decision(False, f"challenger: not significantly better. {summary}", test)

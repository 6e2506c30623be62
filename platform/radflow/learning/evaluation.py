"""Judging model versions: operating points, calibration and the paired AUC test for promotion.

A new version replaces the champion only if its AUC on the task's fixed evaluation set is
higher with statistical significance: DeLong's test for two correlated ROC curves (DeLong,
DeLong & Clarke-Pearson, Biometrics 1988), computed with the fast midrank algorithm of Sun & Xu
(IEEE Signal Processing Letters 21(11), 2014), one-sided at ``settings.promotion_alpha``.

A runtime variant of a version (ONNX fp32, int8) is judged the other way round: it must not be
worse than the version's own PyTorch outputs on the same studies by more than a margin
(:func:`non_inferiority`), on the task kind's primary metric.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
from monai.metrics import compute_hausdorff_distance
from scipy.stats import norm, rankdata, wilcoxon
from sklearn.metrics import roc_auc_score, roc_curve

from radflow.learning.tasks import OperatingPoint, TaskKind


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


def _auc(targets: np.ndarray, scores: np.ndarray) -> float:
    targets = np.asarray(targets).astype(int)
    if len(np.unique(targets)) < 2 or not np.isfinite(scores).all():
        return float("nan")
    return float(roc_auc_score(targets, scores))


METRICS: Mapping[str, Callable[[np.ndarray, np.ndarray], float]] = {"auc": _auc}
"""Metrics a variant is judged on: (targets, the network's outputs) -> value, higher is better.
A segmentation kind adds "dice" (masks, probability maps) here."""
PRIMARY_METRIC: Mapping[TaskKind, str] = {"binary-classification": "auc"}


def primary_metric(kind: TaskKind) -> str:
    """The metric a variant of a ``kind`` model must not lose on."""
    try:
        return PRIMARY_METRIC[kind]
    except KeyError:
        raise NotImplementedError(
            f"runtime variants of {kind} models need a primary metric in "
            "radflow.learning.evaluation.PRIMARY_METRIC first"
        ) from None


@dataclass(frozen=True)
class NonInferiority:
    """A candidate's outputs against the reference's, on the same cases (paired)."""

    metric: str
    reference: float
    candidate: float
    margin: float
    n: int

    @property
    def drop(self) -> float:
        return self.reference - self.candidate

    @property
    def passed(self) -> bool:
        return (
            math.isfinite(self.reference)
            and math.isfinite(self.candidate)
            and (self.drop <= self.margin)
        )

    @property
    def reason(self) -> str:
        if not math.isfinite(self.reference) or not math.isfinite(self.candidate):
            return (
                f"refused: {self.metric} cannot be computed on the {self.n} evaluation studies "
                "(one class only, or outputs that are not numbers)"
            )
        verdict = "passed" if self.passed else "refused"
        return (
            f"{verdict}: {self.metric} {self.candidate:.4f} vs {self.reference:.4f} of the "
            f"PyTorch weights on the same {self.n} evaluation studies (drop {self.drop:+.4f}, "
            f"allowed {self.margin:g})"
        )


def non_inferiority(
    metric: str,
    targets: np.ndarray,
    reference: np.ndarray,
    candidate: np.ndarray,
    margin: float,
) -> NonInferiority:
    """Whether ``candidate`` outputs lose at most ``margin`` of ``metric`` against
    ``reference`` outputs for the same ``targets``."""
    measure = METRICS[metric]
    return NonInferiority(
        metric=metric,
        reference=measure(targets, reference),
        candidate=measure(targets, candidate),
        margin=margin,
        n=len(targets),
    )


# Segmentation: pixels of the evaluation set's images, counted inside each image's region (the
# field of view where a dataset gives one), and one Dice per study for the paired test.

THRESHOLD_BINS = 200
"""Pixel thresholds tried when choosing a segmentation threshold (0.005 apart)."""


@dataclass(frozen=True)
class Pixels:
    """One study's counted pixels: probabilities and ground truth, flattened."""

    scores: np.ndarray  # float probabilities
    truth: np.ndarray  # bool


def dice_threshold(studies: list[Pixels]) -> float:
    """The pixel threshold with the highest Dice over all counted pixels (max-dice policy)."""
    edges = np.linspace(0.0, 1.0, THRESHOLD_BINS + 1)
    positive = sum(np.histogram(s.scores[s.truth], edges)[0] for s in studies)
    negative = sum(np.histogram(s.scores[~s.truth], edges)[0] for s in studies)
    # At threshold edges[i]: true positives are the positives in bins i.., and so on.
    tp = np.cumsum(np.asarray(positive)[::-1])[::-1]
    fp = np.cumsum(np.asarray(negative)[::-1])[::-1]
    total_positive = tp[0] if len(tp) else 0
    dice = 2 * tp / np.maximum(2 * tp + fp + (total_positive - tp), 1)
    return float(edges[int(np.argmax(dice))])


def dice(predicted: np.ndarray, truth: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty: nothing to find, nothing found)."""
    both = int(np.count_nonzero(predicted & truth))
    total = int(np.count_nonzero(predicted)) + int(np.count_nonzero(truth))
    return 1.0 if total == 0 else 2.0 * both / total


def hd95(predicted: np.ndarray, truth: np.ndarray) -> float:
    """95th percentile Hausdorff distance in pixels (nan when either mask is empty)."""
    if not predicted.any() or not truth.any():
        return float("nan")
    value = compute_hausdorff_distance(
        np.asarray(predicted, dtype=np.float32)[None, None],
        np.asarray(truth, dtype=np.float32)[None, None],
        include_background=True,
        percentile=95,
    )
    return float(value.item())


def segmentation_metrics(
    studies: list[Pixels], masks: list[tuple[np.ndarray, np.ndarray]], threshold: float
) -> tuple[dict[str, float], np.ndarray]:
    """Pooled pixel metrics (AUC; Dice, accuracy, sensitivity, specificity at ``threshold``),
    mean per-study Dice and HD95, and the per-study Dice (for the paired test).

    ``masks``: each study's (predicted, truth) boolean masks inside its region, for HD95.
    """
    scores = np.concatenate([s.scores for s in studies])
    truth = np.concatenate([s.truth for s in studies])
    pooled = binary_metrics(truth, scores, threshold)
    per_study = np.array([dice(s.scores >= threshold, s.truth) for s in studies])
    distances = [hd95(p, t) for p, t in masks]
    metrics = {
        "dice": dice(scores >= threshold, truth),
        "mean_dice": float(per_study.mean()),
        "hd95": float(np.nanmean(distances)) if not np.isnan(distances).all() else float("nan"),
        "auc": pooled["auc"],
        "accuracy": pooled["accuracy"],
        "sensitivity": pooled["sensitivity"],
        "specificity": pooled["specificity"],
        "threshold": float(threshold),
        "n": float(len(studies)),
    }
    return metrics, per_study


def decide_dice(new: np.ndarray, champion: np.ndarray | None, alpha: float) -> Decision:
    """Whether a segmentation version replaces the champion: a one-sided Wilcoxon signed-rank
    test on the per-study Dice of both on the evaluation set (H1: the new one is higher)."""
    if champion is None:
        return Decision(True, "no champion yet: the first version becomes champion", None)
    differences = np.asarray(new) - np.asarray(champion)
    mean_new, mean_old = float(np.mean(new)), float(np.mean(champion))
    if 0.5 ** len(differences) >= alpha:
        # Even n wins out of n give the exact one-sided p = 2^-n: no evidence can be enough.
        return Decision(
            False,
            f"challenger: the evaluation set ({len(differences)} studies) is too small for the "
            f"paired Wilcoxon test at alpha {alpha:g} (mean Dice {mean_new:.4f} vs champion "
            f"{mean_old:.4f}); promote by hand if wanted",
            PairedTest(mean_new, mean_old, 0.0, 1.0),
        )
    if not np.any(differences):
        p_value, statistic = 1.0, 0.0
    else:
        result = wilcoxon(new, champion, alternative="greater", zero_method="zsplit")
        p_value, statistic = float(result.pvalue), float(result.statistic)
    test = PairedTest(mean_new, mean_old, statistic, p_value)
    summary = (
        f"mean Dice {mean_new:.4f} vs champion {mean_old:.4f} on {len(differences)} evaluation "
        f"studies; one-sided Wilcoxon signed-rank p = {p_value:.3g} (alpha {alpha:g})"
    )
    if mean_new > mean_old and p_value < alpha:
        return Decision(True, f"promoted: better than the champion. {summary}", test)
    return Decision(False, f"challenger: not significantly better. {summary}", test)

"""Evaluation metrics and the operating point of a binary classifier."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score, roc_curve


def youden_threshold(targets: np.ndarray, scores: np.ndarray) -> float:
    """The score threshold maximising sensitivity + specificity - 1 (Youden's J)."""
    if len(np.unique(targets)) < 2:
        return 0.5
    fpr, tpr, thresholds = roc_curve(targets, scores)
    best = int(np.argmax(tpr - fpr))
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

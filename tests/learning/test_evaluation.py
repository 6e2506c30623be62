"""Evaluation: DeLong's paired AUC test, calibration, operating points, promotion decisions."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from radflow.learning.evaluation import (
    choose_threshold,
    decide,
    delong,
    delong_paired,
    expected_calibration_error,
)
from radflow.learning.tasks import OperatingPoint


def _delong_by_definition(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """DeLong et al. 1988 written out with the O(m*n) kernel psi: the reference to match."""
    covs = []
    comps = []
    for s in (a, b):
        pos, neg = s[y == 1], s[y == 0]
        psi = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
        comps.append((psi.mean(axis=1), psi.mean(axis=0)))
    m, n = int((y == 1).sum()), int((y == 0).sum())
    for i in range(2):
        row = []
        for j in range(2):
            s10 = np.cov(comps[i][0], comps[j][0])[0, 1]
            s01 = np.cov(comps[i][1], comps[j][1])[0, 1]
            row.append(s10 / m + s01 / n)
        covs.append(row)
    return np.array(covs)


def test_fast_delong_matches_the_definition_with_ties() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 120)
    a = np.round(y + rng.normal(0, 1, 120), 1)  # rounding makes ties
    b = np.round(y + rng.normal(0, 1.3, 120), 1)

    result = delong(y, np.vstack([a, b]))

    assert result.aucs == pytest.approx([roc_auc_score(y, a), roc_auc_score(y, b)])
    np.testing.assert_allclose(result.covariance, _delong_by_definition(y, a, b), rtol=1e-10)


def test_delong_variance_agrees_with_a_paired_bootstrap() -> None:
    rng = np.random.default_rng(2)
    y = rng.integers(0, 2, 300)
    a, b = y + rng.normal(0, 1, 300), y + rng.normal(0, 1.2, 300) + 0.3 * rng.normal(0, 1, 300)
    test = delong_paired(y, a, b)
    diffs = []
    for _ in range(400):
        i = rng.integers(0, 300, 300)
        diffs.append(roc_auc_score(y[i], a[i]) - roc_auc_score(y[i], b[i]))
    result = delong(y, np.vstack([a, b]))
    cov = result.covariance
    delong_sd = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert delong_sd == pytest.approx(np.std(diffs), rel=0.15)
    assert test.z == pytest.approx((test.auc_new - test.auc_old) / delong_sd)


def test_promotion_needs_a_significantly_better_auc() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 400)
    strong, weak = y + rng.normal(0, 0.6, 400), y + rng.normal(0, 2.0, 400)
    same = strong + rng.normal(0, 0.01, 400)

    assert decide(y, strong, None, 0.05).promote  # no champion: first version wins
    better = decide(y, strong, weak, 0.05)
    assert better.promote and better.reason.startswith("promoted")
    assert better.test is not None and better.test.p_value < 1e-6
    tie = decide(y, same, strong, 0.05)
    assert not tie.promote and tie.reason.startswith("challenger: not significantly better")
    assert not decide(y, weak, strong, 0.05).promote


def test_calibration_error() -> None:
    y = np.array([0, 0, 1, 1])
    assert expected_calibration_error(y, np.array([0.0, 0.0, 1.0, 1.0])) == pytest.approx(0.0)
    # All at 0.5 where half are positive: calibrated.
    assert expected_calibration_error(y, np.full(4, 0.5)) == pytest.approx(0.0)
    # Everything predicted 0.9 but half negative: off by 0.4.
    assert expected_calibration_error(y, np.full(4, 0.9)) == pytest.approx(0.4)


def test_operating_point_policies() -> None:
    y = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    s = np.array([0.1, 0.2, 0.3, 0.6, 0.4, 0.7, 0.8, 0.9])
    sens = choose_threshold(OperatingPoint("target-sensitivity", 1.0), y, s)
    assert sens == pytest.approx(0.4)  # the highest cut that still finds every positive
    assert choose_threshold(OperatingPoint("target-sensitivity", 0.75), y, s) == pytest.approx(0.7)
    youden = choose_threshold(OperatingPoint("youden"), y, s)
    assert youden in (pytest.approx(0.4), pytest.approx(0.7))
    # Rare positives: the most accurate cut calls fewer positives than Youden's.
    rare_y = np.array([0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1])
    rare_s = np.array([0.1, 0.2, 0.25, 0.28, 0.29, 0.5, 0.55, 0.6, 0.3, 0.32, 0.7])
    assert choose_threshold(OperatingPoint("youden"), rare_y, rare_s) == pytest.approx(0.3)
    assert choose_threshold(OperatingPoint("max-accuracy"), rare_y, rare_s) == pytest.approx(0.7)

"""flatlab.study.statistics: paired and Welch t tests against hand-computed values, the choice
between them, and a scorecard that counts only significant differences."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from flatlab.study.statistics import (
    paired_difference,
    scorecard,
    seed_difference,
    welch_difference,
)

# Student t with 2 degrees of freedom has F(t) = 1/2 + t / (2 sqrt(2 + t^2)), so its 97.5%
# point solves t / sqrt(2 + t^2) = 0.95: t^2 = 2 * 0.95^2 / (1 - 0.95^2)
T_975_DF2 = math.sqrt(2 * 0.95**2 / (1 - 0.95**2))


def test_t_critical_value_for_three_seeds():
    assert T_975_DF2 == pytest.approx(4.302652729749464, rel=1e-12)
    assert stats.t.ppf(0.975, 2) == pytest.approx(T_975_DF2, rel=1e-10)


def test_paired_difference_by_hand():
    # d = (2-1, 4-2, 9-3) = (1, 2, 6): mean 3, sample variance (4 + 1 + 9) / 2 = 7
    d = paired_difference(np.array([2.0, 4.0, 9.0]), np.array([1.0, 2.0, 3.0]))
    se = math.sqrt(7 / 3)
    t = 3 / se                                   # = sqrt(27 / 7)
    assert (d.test, d.n, d.df) == ("paired", 3, 2)
    assert d.mean == pytest.approx(3.0, rel=1e-12)
    assert d.se == pytest.approx(se, rel=1e-12)
    assert d.t == pytest.approx(t, rel=1e-12)
    # two-sided p with 2 df: 1 - |t| / sqrt(2 + t^2) = 1 - sqrt(27 / 41)
    assert d.p == pytest.approx(1 - math.sqrt(27 / 41), rel=1e-9)
    assert d.ci_low == pytest.approx(3 - T_975_DF2 * se, rel=1e-9)
    assert d.ci_high == pytest.approx(3 + T_975_DF2 * se, rel=1e-9)
    assert not d.significant()                   # |t| = 1.96 < 4.30: not at 5% with 2 df
    ref = stats.ttest_rel([2.0, 4.0, 9.0], [1.0, 2.0, 3.0])
    assert (d.t, d.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)


def test_paired_difference_significant_when_t_exceeds_the_critical_value():
    # d = (1.0, 1.1, 0.9): mean 1, sd 0.1, se 0.1 / sqrt(3), t = sqrt(300) = 17.3 > 4.30
    d = paired_difference(np.array([1.0, 1.1, 0.9]), np.zeros(3))
    assert d.t == pytest.approx(math.sqrt(300), rel=1e-9)
    assert d.p == pytest.approx(1 - math.sqrt(300 / 302), rel=1e-6)
    assert d.significant() and d.ci_low > 0


def test_welch_difference_by_hand():
    # a: mean 2, var 1, n 3; b: mean 6, var 10, n 5 -> se^2 = 1/3 + 2 = 7/3,
    # df = (7/3)^2 / ((1/3)^2 / 2 + 2^2 / 4) = 98 / 19
    a, b = np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.0, 8.0, 10.0])
    d = welch_difference(a, b)
    assert d.test == "welch"
    assert d.mean == pytest.approx(-4.0, rel=1e-12)
    assert d.df == pytest.approx(98 / 19, rel=1e-12)
    assert d.t == pytest.approx(-4 / math.sqrt(7 / 3), rel=1e-12)
    assert d.p == pytest.approx(2 * stats.t.sf(4 / math.sqrt(7 / 3), 98 / 19), rel=1e-10)
    half = stats.t.ppf(0.975, 98 / 19) * math.sqrt(7 / 3)
    assert (d.ci_low, d.ci_high) == pytest.approx((-4 - half, -4 + half), rel=1e-10)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert (d.t, d.p) == pytest.approx((ref.statistic, ref.pvalue), rel=1e-10)


def test_seed_difference_pairs_by_seed_else_welch():
    paired = seed_difference({2: 9.0, 0: 2.0, 1: 4.0}, {0: 1.0, 1: 2.0, 2: 3.0})
    assert paired.test == "paired" and paired.mean == pytest.approx(3.0)
    assert paired.se == pytest.approx(math.sqrt(7 / 3))  # pairs matched by seed, not order
    unpaired = seed_difference({0: 1.0, 1: 2.0, 2: 3.0}, {0: 2.0, 1: 4.0, 3: 6.0})
    assert unpaired.test == "welch" and unpaired.mean == pytest.approx(-2.0)


def test_degenerate_differences_have_no_test():
    constant = paired_difference(np.array([3.0, 4.0]), np.array([1.0, 2.0]))  # d = (2, 2)
    assert constant.mean == 2.0 and constant.se == 0.0
    assert math.isnan(constant.t) and math.isnan(constant.p) and not constant.significant()
    single = paired_difference(np.array([1.0]), np.array([0.0]))
    assert math.isnan(single.t) and not single.significant()
    assert math.isnan(welch_difference(np.array([1.0]), np.array([1.0, 2.0])).t)


def test_scorecard_counts_only_significant_differences():
    def row(setting, quantity, diff, p, sam_diff, sam_p):
        return {"setting": setting, "budget": "same epochs", "nso": "nso k=1",
                "quantity": quantity, "diff": diff, "p": p, "vs_sam_diff": sam_diff,
                "vs_sam_p": sam_p}

    comparison = pd.DataFrame([
        row("s1", "trace", -1.0, 0.01, -1.0, 0.2),    # flatter than best: counted
        row("s2", "trace", +1.0, 0.04, -2.0, 0.001),  # sharper than best; flatter than SAM
        row("s3", "trace", -5.0, 0.20, +3.0, 0.049),  # lower mean, not significant
        row("s1", "test_acc", +0.02, 0.03, -0.01, 0.5),   # higher accuracy: better
        row("s2", "test_acc", -0.02, 0.03, -0.03, 0.01),  # lower accuracy: worse
        row("mean over 2 settings", "trace", -9.0, math.nan, -9.0, math.nan),  # not counted
    ])
    card = scorecard(comparison).set_index("quantity")
    assert card.loc["trace", "better than best baseline"] == "1 of 3"
    assert card.loc["trace", "worse than best baseline"] == "1 of 3"
    assert card.loc["trace", "better than SAM"] == "1 of 3"
    assert card.loc["trace", "worse than SAM"] == "1 of 3"
    assert card.loc["test acc", "better than best baseline"] == "1 of 2"
    assert card.loc["test acc", "worse than best baseline"] == "1 of 2"
    assert card.loc["test acc", "worse than SAM"] == "1 of 2"
    assert card.loc["test acc", "better than SAM"] == "0 of 2"


def test_docstring_examples():
    import doctest

    import flatlab.study.statistics as module

    result = doctest.testmod(module)
    assert result.attempted >= 3 and result.failed == 0

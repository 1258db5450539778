"""Discovery statistics with hand-computed answers: AUROC, Cohen's d, ranking, rise."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from featurewatch.analysis.discover import auroc, cohens_d, rank_contrast, rank_rise


def test_auroc_by_hand_with_ties():
    # Pairs (pos, neg): 3 beats 2, 0, 1 (3); 1 beats 0 (1), ties 1 (0.5), loses to 2 -> 4.5/6
    pos, neg = np.array([[3.0], [1.0]]), np.array([[2.0], [0.0], [1.0]])
    assert auroc(pos, neg) == pytest.approx([0.75])


def test_auroc_matches_sklearn_per_column():
    rng = np.random.default_rng(1)
    pos = np.maximum(rng.normal(0.3, 1, (40, 6)), 0)  # sparse-ish: many ties at zero
    neg = np.maximum(rng.normal(0.0, 1, (55, 6)), 0)
    labels = np.r_[np.ones(40), np.zeros(55)]
    expected = [roc_auc_score(labels, np.r_[pos[:, c], neg[:, c]]) for c in range(6)]
    assert auroc(pos, neg) == pytest.approx(expected)


def test_cohens_d_by_hand():
    # pos mean 2, var 2 (n=2); neg all 0 (n=3): pooled sd = sqrt((1*2 + 2*0) / 3)
    pos, neg = np.array([[1.0, 5.0], [3.0, 5.0]]), np.zeros((3, 2))
    neg[:, 1] = 5.0  # column 1 is constant everywhere: d = 0, not NaN
    assert cohens_d(pos, neg) == pytest.approx([2 / np.sqrt(2 / 3), 0.0])


def test_rank_contrast_puts_the_separating_feature_first_with_intervals():
    rng = np.random.default_rng(0)
    pos, neg = rng.random((30, 50)), rng.random((30, 50))
    pos[:, 17] += 2.0  # separates perfectly
    pos[:, 3] += 0.3  # separates partly
    rows = rank_contrast(pos, neg, top=5, bootstrap=200)
    assert [r["feature_id"] for r in rows[:2]] == [17, 3]
    assert rows[0]["auroc"] == 1.0 and rows[0]["auroc_lo"] == 1.0
    for row in rows:
        assert row["auroc_lo"] <= row["auroc"] <= row["auroc_hi"]
        assert row["effect_lo"] <= row["effect_size"] <= row["effect_hi"]
    assert rows[1]["auroc_lo"] < rows[1]["auroc"] < rows[1]["auroc_hi"]


def test_rank_rise_by_hand():
    base = np.zeros((3, 4))
    candidate = base.copy()
    candidate[:, 2] = [1.0, 2.0, 3.0]  # mean paired rise 2
    candidate[:, 0] = [0.5, 0.0, 0.0]
    rows = rank_rise(base, candidate, top=2, bootstrap=300)
    assert [r["feature_id"] for r in rows] == [2, 0]
    assert rows[0]["rise"] == pytest.approx(2.0)
    assert 1.0 <= rows[0]["rise_lo"] <= 2.0 <= rows[0]["rise_hi"] <= 3.0
    assert rows[0]["fired_base"] == 0.0 and rows[0]["fired_candidate"] == 1.0
    with pytest.raises(ValueError, match="shape"):
        rank_rise(base, candidate[:2])

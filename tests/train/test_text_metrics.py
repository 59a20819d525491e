"""Finetuning metrics against scikit-learn / SciPy on random inputs (property tests)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from gmlp.train.text import classification_metrics, regression_metrics


@st.composite
def _labelled(draw: st.DrawFn) -> tuple[list[int], list[int], int]:
    num_labels = draw(st.integers(2, 5))
    n = draw(st.integers(1, 40))
    ids = st.lists(st.integers(0, num_labels - 1), min_size=n, max_size=n)
    return draw(ids), draw(ids), num_labels


@pytest.mark.filterwarnings("ignore:A single label was found")
@settings(max_examples=200, deadline=None)
@given(_labelled())
def test_classification_metrics_equal_sklearn(case: tuple[list[int], list[int], int]) -> None:
    pred, gold, num_labels = case
    got = classification_metrics(torch.tensor(pred), torch.tensor(gold), num_labels)
    seen = sorted(set(pred) | set(gold))
    assert got["accuracy"] == pytest.approx(accuracy_score(gold, pred), abs=1e-12)
    assert got["macro_f1"] == pytest.approx(f1_score(gold, pred, labels=seen, average="macro"), abs=1e-12)
    assert got["mcc"] == pytest.approx(matthews_corrcoef(gold, pred), abs=1e-12)


@st.composite
def _scored(draw: st.DrawFn) -> tuple[list[float], list[float]]:
    n = draw(st.integers(2, 40))
    # few distinct values, so that ties are common (Spearman's average ranks)
    # (no subnormals: a process whose CPU flushes them, as one of a single-process run's earlier tests left
    # it, makes hypothesis refuse such a strategy)
    finite = st.floats(-5, 5, allow_nan=False, width=32, allow_subnormal=False)
    values = st.one_of(st.integers(-3, 3).map(float), finite)
    return draw(st.lists(values, min_size=n, max_size=n)), draw(st.lists(values, min_size=n, max_size=n))


@settings(max_examples=200, deadline=None)
@given(_scored())
def test_regression_metrics_equal_scipy(case: tuple[list[float], list[float]]) -> None:
    pred, gold = case
    got = regression_metrics(torch.tensor(pred), torch.tensor(gold))
    p, g = torch.tensor(pred).double(), torch.tensor(gold).double()
    assert got["mse"] == pytest.approx(float(((p - g) ** 2).mean()), rel=1e-12, abs=1e-12)
    if len(set(pred)) == 1 or len(set(gold)) == 1:
        assert got["pearson"] is None and got["spearman"] is None
        return
    # float32 inputs as SciPy sees them
    p32, g32 = [float(x) for x in torch.tensor(pred)], [float(x) for x in torch.tensor(gold)]
    assert got["pearson"] == pytest.approx(stats.pearsonr(p32, g32)[0], abs=1e-9)
    assert got["spearman"] == pytest.approx(stats.spearmanr(p32, g32)[0], abs=1e-9)


def test_undefined_correlations_are_null_and_divergence_shows() -> None:
    one = regression_metrics(torch.tensor([1.0]), torch.tensor([2.0]))
    assert one == {"mse": 1.0, "pearson": None, "spearman": None}
    empty = regression_metrics(torch.zeros(0), torch.zeros(0))
    assert empty == {"mse": None, "pearson": None, "spearman": None}
    diverged = regression_metrics(torch.tensor([float("nan"), 1.0]), torch.tensor([0.0, 1.0]))
    assert math.isnan(diverged["mse"]) and diverged["pearson"] is None and diverged["spearman"] is None
    # one class everywhere: MCC is undefined and reported as 0 (scikit-learn's convention)
    same = classification_metrics(torch.tensor([1, 1, 1]), torch.tensor([0, 1, 1]), 2)
    assert same["mcc"] == 0.0 and same["accuracy"] == pytest.approx(2 / 3)


def test_bad_metric_inputs_are_named() -> None:
    with pytest.raises(ValueError, match="pred and gold must be 1-d"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0]), 2)
    with pytest.raises(ValueError, match=r"gold must hold class ids in \[0, 2\), got 0..2"):
        classification_metrics(torch.tensor([0, 1]), torch.tensor([0, 2]), 2)
    with pytest.raises(ValueError, match="pred and gold must be 1-d"):
        regression_metrics(torch.zeros(2, 1), torch.zeros(2, 1))
    with pytest.raises(ValueError, match="gold must be finite, got 1 non-finite"):
        regression_metrics(torch.zeros(2), torch.tensor([0.0, float("inf")]))

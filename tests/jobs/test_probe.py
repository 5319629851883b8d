"""The bottleneck probe on synthetic features with known separability."""

from __future__ import annotations

import math

import pytest
import torch

from jobs import probe


def _clusters(n: int, dim: int, classes: int, seed: int, spread: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = 3.0 * torch.randn(classes, dim, generator=g)
    labels = torch.arange(n) % classes
    return centres[labels] + spread * torch.randn(n, dim, generator=g), labels


def test_pool_plans_means_over_rows():
    plans = torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4)
    pooled = probe.pool_plans(plans)
    assert pooled.shape == (2, 4)
    assert torch.equal(pooled[0], torch.tensor([4.0, 5.0, 6.0, 7.0]))
    with pytest.raises(ValueError, match=r"\(N, P, D\)"):
        probe.pool_plans(torch.zeros(2, 4))


def test_separable_features_reach_full_accuracy():
    x, y = _clusters(360, 32, 18, seed=0)
    labels = (y + 100).tolist()  # arbitrary label values, like category ids
    result = probe.single_label_probe(x[:180], labels[:180], x[180:], labels[180:])
    assert result.accuracy == 1.0
    assert result.num_classes == 18 and result.chance == pytest.approx(1 / 18)
    assert result.num_train == result.num_test == 180


def test_random_labels_stay_near_chance():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 32, generator=g)
    y = torch.randint(0, 5, (1000,), generator=g).tolist()
    result = probe.single_label_probe(x[:500], y[:500], x[500:], y[500:])
    assert result.chance == pytest.approx(0.2)
    assert result.accuracy < 0.3  # chance 0.2; a leak of test labels would show as far more


def test_probe_is_deterministic():
    x, y = _clusters(200, 16, 4, seed=2, spread=4.0)
    a = probe.single_label_probe(x[:100], y[:100].tolist(), x[100:], y[100:].tolist())
    b = probe.single_label_probe(x[:100], y[:100].tolist(), x[100:], y[100:].tolist())
    assert a == b


def test_majority_rate_and_unseen_test_labels():
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(3))
    train_y = [0, 0, 0, 1]
    test_y = [0, 2, 2, 2]  # class 2 was never seen in training: can never be right
    result = probe.single_label_probe(x[:4], train_y, x[4:], test_y)
    assert result.majority == 0.25  # "always 0" gets the one test 0
    assert result.accuracy <= 0.25
    assert result.chance == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="2 classes"):
        probe.single_label_probe(x[:4], [1, 1, 1, 1], x[4:], test_y)


def test_average_precision_by_hand():
    # ranking by score: pos, neg, pos, neg -> precision at the positives 1/1 and 2/3
    scores = torch.tensor([0.9, 0.8, 0.7, 0.1])
    labels = torch.tensor([1, 0, 1, 0])
    assert probe.average_precision(scores, labels) == pytest.approx((1 + 2 / 3) / 2)
    # a tie between a positive and a negative is one threshold: precision 1/2 at recall 1
    assert probe.average_precision(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)
    assert math.isnan(probe.average_precision(torch.tensor([0.1, 0.2]), torch.tensor([0, 0])))  # no positive


def test_mean_average_precision_skips_categories_without_positives():
    scores = torch.tensor([[0.9, 0.1, 0.3], [0.2, 0.8, 0.2], [0.1, 0.3, 0.1]])
    labels = torch.tensor([[1, 0, 0], [0, 0, 0], [0, 1, 0]])
    # column 0: positive ranked first -> 1.0; column 1: positive ranked 2nd of 3 -> 1/2; column 2 skipped
    mean_ap, counted = probe.mean_average_precision(scores, labels)
    assert counted == 2
    assert mean_ap == pytest.approx((1.0 + 0.5) / 2)


def test_multi_hot_ignores_unknown_ids():
    out = probe.multi_hot([[1, 3], [], [3, 99]], categories=[1, 2, 3])
    assert out.tolist() == [[1, 0, 1], [0, 0, 0], [0, 0, 1]]


def test_multilabel_probe_learns_separable_categories():
    x, y = _clusters(400, 32, 8, seed=4)
    # each image carries its cluster's category and the "next" one, as ids from a sparse 80-id space
    ids = [[int(c) * 10 + 1, (int(c) + 1) % 8 * 10 + 1] for c in y]
    categories = list(range(1, 91))
    result = probe.multilabel_probe(x[:200], ids[:200], x[200:], ids[200:], categories)
    assert result.num_categories == 8
    assert result.map > 0.95
    assert result.prevalence_map == pytest.approx(0.25)
    g = torch.Generator().manual_seed(5)
    shuffled = [ids[i] for i in torch.randperm(400, generator=g).tolist()]
    weak = probe.multilabel_probe(x[:200], shuffled[:200], x[200:], shuffled[200:], categories)
    assert weak.map < 0.5

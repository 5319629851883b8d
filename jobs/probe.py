"""The bottleneck probe: how much category information the latent plan carries.

Run 2 of the research log replaced the decoder with `mean_pool(plan) -> Linear -> class`
and got 32.1% on 20 keyword categories (chance 5%). This module is that probe, made
reproducible: features are standardised with the train split's statistics, the linear
layer starts at zero and is trained full-batch with AdamW for a fixed number of steps, so
the same plans give the same numbers on any machine. Three uses:

- single-label on the log's 20 keyword categories (accuracy vs chance and majority rate);
- multi-label on COCO's 80 instance categories (mean average precision);
- single-label on the synthetic shapes' 18 category ids (the log's Run-0 "100%").

Pure torch on CPU; plans are computed elsewhere (jobs.evaluate) and passed in as tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

PROBE_STEPS = 300
PROBE_LR = 0.05
PROBE_WEIGHT_DECAY = 1e-3


def pool_plans(plans: Tensor) -> Tensor:
    """(N, P, D) plans -> (N, D) mean over the plan's rows, as the log's probe did."""
    if plans.dim() != 3:
        raise ValueError(f"plans must be (N, P, D), got shape {tuple(plans.shape)}")
    return plans.float().mean(dim=1)


def _standardise(train_x: Tensor, test_x: Tensor) -> tuple[Tensor, Tensor]:
    """Zero-mean unit-variance features using train statistics only (no test leakage)."""
    mean = train_x.mean(dim=0, keepdim=True)
    std = train_x.std(dim=0, keepdim=True, unbiased=False).clamp_min(1e-6)
    return (train_x - mean) / std, (test_x - mean) / std


def fit_linear(
    x: Tensor,
    targets: Tensor,
    num_outputs: int,
    *,
    multilabel: bool = False,
    steps: int = PROBE_STEPS,
    lr: float = PROBE_LR,
    weight_decay: float = PROBE_WEIGHT_DECAY,
) -> nn.Linear:
    """Train Linear(D -> num_outputs) full-batch from zero init; deterministic for fixed inputs.

    x: (N, D) float; targets: (N,) long class indices, or (N, C) {0,1} floats when multilabel.
    """
    layer = nn.Linear(x.shape[1], num_outputs)
    nn.init.zeros_(layer.weight)
    nn.init.zeros_(layer.bias)
    opt = torch.optim.AdamW(layer.parameters(), lr=lr, weight_decay=weight_decay)
    # Hundreds of tiny steps: one thread avoids intra-op sync, which dominates on a busy machine.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.enable_grad():
            for _ in range(steps):
                logits = layer(x)  # (N, C)
                if multilabel:
                    loss = F.binary_cross_entropy_with_logits(logits, targets)
                else:
                    loss = F.cross_entropy(logits, targets)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return layer.requires_grad_(False)


@dataclass
class SingleLabelResult:
    accuracy: float  # on the held-out split, in [0, 1]
    chance: float  # 1 / number of classes present (train and test): the log's "random baseline"
    majority: float  # accuracy of always predicting the train split's most frequent class
    num_classes: int
    num_train: int
    num_test: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def single_label_probe(
    train_x: Tensor, train_y: Sequence[int], test_x: Tensor, test_y: Sequence[int], **fit_kwargs: Any
) -> SingleLabelResult:
    """Softmax probe; labels are arbitrary ints, remapped to classes seen in training.

    A test label never seen in training can not be predicted and counts as an error.
    """
    if len(train_y) != len(train_x) or len(test_y) != len(test_x):
        raise ValueError("probe features and labels differ in length")
    classes = sorted(set(train_y))
    if len(classes) < 2 or not len(test_y):
        raise ValueError(f"probe needs >= 2 classes in training and a non-empty test set (got {len(classes)} classes)")
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in train_y])
    xtr, xte = _standardise(train_x.float(), test_x.float())
    layer = fit_linear(xtr, y, len(classes), **fit_kwargs)
    predicted = [classes[i] for i in layer(xte).argmax(dim=1).tolist()]
    accuracy = sum(p == t for p, t in zip(predicted, test_y, strict=True)) / len(test_y)
    counts = Counter(train_y)
    majority_class = min(classes, key=lambda c: (-counts[c], c))
    return SingleLabelResult(
        accuracy=accuracy,
        chance=1.0 / len(set(train_y) | set(test_y)),
        majority=sum(t == majority_class for t in test_y) / len(test_y),
        num_classes=len(classes),
        num_train=len(train_y),
        num_test=len(test_y),
    )


# ---------------------------------------------------------------------------
# Multi-label probe and average precision.


def average_precision(scores: Tensor, labels: Tensor) -> float:
    """Non-interpolated AP of one category: sum over thresholds of (recall step) x precision.

    scores: (N,) any real; labels: (N,) {0, 1}. Tied scores form one threshold (the same
    convention as sklearn's average_precision_score). NaN when there is no positive.
    """
    labels = labels.float()
    positives = labels.sum().item()
    if positives == 0:
        return float("nan")
    order = torch.argsort(scores, descending=True, stable=True)
    s, y = scores[order], labels[order]
    tp = torch.cumsum(y, 0)
    seen = torch.arange(1, len(y) + 1, dtype=torch.float32)
    # keep only the last position of each run of equal scores: the threshold boundaries
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]
    tp, seen = tp[last], seen[last]
    precision = tp / seen
    recall = tp / positives
    recall_step = torch.diff(recall, prepend=torch.zeros(1))
    return float((recall_step * precision).sum())


def mean_average_precision(scores: Tensor, labels: Tensor) -> tuple[float, int]:
    """Macro mAP over the categories with at least one positive: (mAP, categories counted)."""
    aps = [average_precision(scores[:, c], labels[:, c]) for c in range(labels.shape[1]) if labels[:, c].any()]
    return (sum(aps) / len(aps) if aps else float("nan")), len(aps)


def multi_hot(category_ids: Sequence[Sequence[int]], categories: Sequence[int]) -> Tensor:
    """Lists of category ids per image -> (N, C) {0,1} in the order of `categories`; unknown ids ignored."""
    column = {c: i for i, c in enumerate(categories)}
    out = torch.zeros(len(category_ids), len(categories))
    for row, ids in enumerate(category_ids):
        for c in ids:
            if c in column:
                out[row, column[c]] = 1.0
    return out


@dataclass
class MultiLabelResult:
    map: float  # macro mAP over test categories with a positive, in [0, 1]
    num_categories: int  # categories counted in the mean
    prevalence_map: float  # mAP of the constant-score baseline: mean positive rate of those categories
    num_train: int
    num_test: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def multilabel_probe(
    train_x: Tensor,
    train_ids: Sequence[Sequence[int]],
    test_x: Tensor,
    test_ids: Sequence[Sequence[int]],
    categories: Sequence[int],
    **fit_kwargs: Any,
) -> MultiLabelResult:
    """Sigmoid probe over `categories` (e.g. COCO's 80 instance category ids), scored by mAP."""
    if len(train_ids) != len(train_x) or len(test_ids) != len(test_x):
        raise ValueError("probe features and labels differ in length")
    ytr, yte = multi_hot(train_ids, categories), multi_hot(test_ids, categories)
    xtr, xte = _standardise(train_x.float(), test_x.float())
    layer = fit_linear(xtr, ytr, len(categories), multilabel=True, **fit_kwargs)
    mean_ap, counted = mean_average_precision(layer(xte), yte)
    present = yte[:, yte.any(dim=0)]
    # a constant score ranks every image equally: AP equals the positive rate of the category
    baseline = float(present.mean(dim=0).mean()) if present.numel() else float("nan")
    return MultiLabelResult(
        map=mean_ap, num_categories=counted, prevalence_map=baseline, num_train=len(train_ids), num_test=len(test_ids)
    )

"""Late fusion of single-modality predictions: a weighted vote on labels, or the mean of probabilities."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def vote(predictions: Sequence[torch.Tensor], best: int, classes: int) -> torch.Tensor:
    """Per-pixel majority vote over label maps (each (B, H, W)); model ``best`` counts twice, ties go to it.

    With weights 2, 1, 1, 1 every tie involves the best model's label, so adding half a vote to that label
    settles them all without changing any clear majority.
    """
    counts = sum(F.one_hot(p.long(), classes) * (2 if i == best else 1) for i, p in enumerate(predictions))
    counts = counts.float() + 0.5 * F.one_hot(predictions[best].long(), classes)
    return counts.argmax(-1)


def mean_probabilities(probabilities: Sequence[torch.Tensor]) -> torch.Tensor:
    """Soft late fusion: the mean of the models' softmax maps (each (B, C, H, W))."""
    return torch.stack(list(probabilities)).float().mean(0)

"""What a model predicts, by task, and how its outputs become BraTS labels: one place for every command.

- ``multiclass``: a softmax over background, NCR, ED and ET; labels by the largest probability.
- ``binary``: a softmax over background and whole tumour.
- ``regions``: three sigmoids, WT, TC and ET, each trained on its own region (nnU-Net's region-based training for
  BraTS). Labels are drawn as nnU-Net draws them: where WT is above 0.5 the voxel is oedema, where TC is above 0.5
  necrosis, where ET is above 0.5 enhancing tumour, each overwriting the one before, so that ET lies in TC and TC in
  WT by construction.

Probabilities of one task can be averaged (test-time mirroring, ensembles) before labels are drawn.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from builder.format import REGIONS

TASKS = ("multiclass", "binary", "regions")
#: Network outputs per task.
OUTPUTS = {"multiclass": 4, "binary": 2, "regions": 3}
#: The label each region draws, in drawing order (nnU-Net's ``regions_class_order`` for BraTS).
REGION_LABELS = (("WT", 2), ("TC", 1), ("ET", 3))
#: A region counts as present where its probability is above this.
REGION_THRESHOLD = 0.5


def label_classes(task: str) -> int:
    """How many label values a task's label maps hold: 2 (binary) or the four BraTS labels."""
    return 2 if task == "binary" else 4


def probabilities(logits: torch.Tensor, task: str) -> torch.Tensor:
    """(B, outputs, ...) logits to probabilities: sigmoids per region, or a softmax over classes."""
    return logits.sigmoid() if task == "regions" else logits.softmax(1)


def classes(probs: torch.Tensor, task: str) -> torch.Tensor:
    """(B, outputs, ...) probabilities to (B, ...) label values (0..3; 0/1 for binary)."""
    if task != "regions":
        return probs.max(1).indices  # the argmax (first maximum on ties), about 20x faster than argmax(1) on CPUs
    labels = torch.zeros(probs[:, 0].shape, dtype=torch.long, device=probs.device)
    for channel, (_, label) in enumerate(REGION_LABELS):
        labels[probs[:, channel] > REGION_THRESHOLD] = label
    return labels


def region_targets(labels: torch.Tensor) -> torch.Tensor:
    """(B, ...) label values to (B, 3, ...) float masks of WT, TC and ET."""
    masks = [torch.isin(labels, torch.tensor(REGIONS[name], device=labels.device)) for name, _ in REGION_LABELS]
    return torch.stack(masks, 1).float()


def encode(labels: torch.Tensor, task: str) -> torch.Tensor:
    """(B, ...) label values as the probabilities that would say them for certain: one-hot classes, or region masks
    (what a vote's labels are scored as, and the target of the MSE)."""
    if task == "regions":
        return region_targets(labels)
    return F.one_hot(labels.long(), OUTPUTS[task]).movedim(-1, 1).float()


def region_confidence(probs: np.ndarray, task: str) -> np.ndarray:
    """(outputs, ...) probabilities of one task to (regions, ...) probabilities of its regions (WT, TC, ET; WT alone
    for binary) as uint8, 0-255: what a confidence-based clean-up weighs a component by, whatever the task (a
    region's probability is the sum of its classes'), at a quarter of float32's memory."""
    if task == "regions":
        regions = probs.astype(np.float32)
    elif task == "binary":
        regions = probs[1:2].astype(np.float32)
    else:
        regions = np.stack([probs[list(REGIONS[name])].sum(0, dtype=np.float32) for name, _ in REGION_LABELS])
    return np.rint(np.clip(regions, 0, 1) * 255).astype(np.uint8)


def _unsure(probs: np.ndarray) -> np.ndarray:
    """Where a probability lies strictly between 0 and 1. For float16 (what inference hands on) on the bits: numpy
    compares float16 element by element in software, ten times slower than the integers that order the same way
    for values from 0 to 1 (0 is 0x0000, 1 is 0x3C00)."""
    if probs.dtype == np.float16:
        return (probs.view(np.uint16) - np.uint16(1)) < np.uint16(0x3BFF)  # 0 wraps to 0xFFFF
    return (probs > 0) & (probs < 1)


def uncertainty(probs: np.ndarray, task: str) -> np.ndarray:
    """(outputs, ...) probabilities to each voxel's entropy, normalised to 0 (certain) .. 1 (a uniform guess) by the
    entropy of a uniform guess: over the classes of a softmax; summed over the independent sigmoids of ``regions``.
    float32. A voxel whose every probability is 0 or 1 (most of a volume: where the network saw no brain) is 0
    without its logarithms being taken."""
    out = np.zeros(probs.shape[1:], np.float32)
    unsure = _unsure(probs).any(0)
    p = probs[:, unsure].astype(np.float32)
    if task == "regions":
        q = np.clip(p, 1e-7, 1 - 1e-7)
        out[unsure] = (-(q * np.log(q) + (1 - q) * np.log1p(-q))).sum(0) / np.float32(len(p) * np.log(2))
    else:
        q = np.clip(p, 1e-7, 1)
        out[unsure] = np.clip(-(q * np.log(q)).sum(0) / np.float32(np.log(len(p))), 0, 1)
    return out

"""Epoch metrics from summed counts, so they do not depend on batch size and reduce exactly across ranks.

- pixel accuracy: correct pixels / all pixels
- mean IoU: mean over classes of tp / (tp + fp + fn), pooled over the epoch (a class absent from both
  prediction and truth counts as 1)
- MSE: mean squared error between the predicted probabilities and the target's certain ones, over pixels and
  outputs (softmax against the one-hot class; with ``--task regions``, the three sigmoids against the WT, TC and ET
  masks)
- Dice of the BraTS regions WT (labels 1+2+3), TC (1+3), ET (3), per slice, averaged over slices; a region
  absent from both the prediction and the truth of a slice scores 1 (nnU-Net's BraTS convention), predicted
  but absent scores 0. Binary task: WT only. These per-slice numbers are not the official BraTS 2023 lesion-wise
  3D scores and cannot be compared with leaderboard figures.

Every task is scored on the label maps its outputs turn into (``trainer.tasks``), so a region-based model's numbers
mean what a multiclass model's do.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from builder.format import REGIONS
from trainer.scoring.brats import dice_from_counts, region_names
from trainer.tasks import classes as classes_of
from trainer.tasks import encode, label_classes, probabilities


def slice_confusion(pred: torch.Tensor, target: torch.Tensor, classes: int) -> torch.Tensor:
    """(B, C, C) confusion matrix of each slice (truth rows, predicted columns) in one ``bincount`` on the device:
    every count the metrics need, with no per-sample loop and no host sync (smp's multiclass ``get_stats`` loops
    over the samples into CPU tensors)."""
    batch = target.shape[0]
    offset = torch.arange(batch, device=target.device).view(batch, *[1] * (target.dim() - 1)) * classes
    index = ((offset + target) * classes + pred).flatten()
    return torch.bincount(index, minlength=batch * classes * classes).view(batch, classes, classes)


def class_counts(pred: torch.Tensor, target: torch.Tensor, classes: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-class true positives, false positives and false negatives over a whole batch."""
    return _class_counts(slice_confusion(pred, target, classes).sum(0))


def _class_counts(confusion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tp = confusion.diagonal()
    return tp, confusion.sum(0) - tp, confusion.sum(1) - tp


def _membership(task: str, classes: int, device: torch.device) -> torch.Tensor:
    """(R, C) 1 where label c belongs to region r (binary task: WT is class 1)."""
    if task == "binary":
        return torch.tensor([[0.0, 1.0]], device=device)
    return torch.tensor([[float(c in labels) for c in range(classes)] for labels in REGIONS.values()], device=device)


def _region_dice(confusion: torch.Tensor, membership: torch.Tensor) -> torch.Tensor:
    """(B, R) Dice of each region per slice from per-slice confusion matrices (``dice_from_counts``)."""
    counts = confusion.double()
    tp = torch.einsum("rt,btp,rp->br", membership.double(), counts, membership.double())
    truth = counts.sum(2) @ membership.double().T
    predicted = counts.sum(1) @ membership.double().T
    return dice_from_counts(tp, predicted - tp, truth - tp)


def region_dice(pred: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """(B, R) Dice of each region per slice; 1 where the region is absent from both."""
    classes = label_classes(task)
    membership = _membership(task, classes, pred.device)
    return _region_dice(slice_confusion(pred, target, classes), membership).float()


class SegmentationMetrics:
    """Accumulates one epoch's sums; ``compute`` turns them into the metrics above."""

    def __init__(self, task: str, device: torch.device, keep_per_slice: bool = False) -> None:
        self.classes, self.task = label_classes(task), task
        self.regions = region_names(task)
        # One float64 vector of sums: [loss*n, n, slices, correct, pixels, sq_error, sq_count, tp(C), fp(C), fn(C),
        # dice(R)], so that reducing across ranks is one all_reduce and exact.
        self.sums = torch.zeros(7 + 3 * self.classes + len(self.regions), dtype=torch.float64, device=device)
        self._membership = _membership(task, self.classes, device)
        self.per_slice: list[dict[str, float]] | None = [] if keep_per_slice else None

    def update(self, logits: torch.Tensor, target: torch.Tensor, loss: torch.Tensor | float | None = None,
               rows: torch.Tensor | None = None) -> None:
        """Add a batch: logits (B, outputs, H, W) already cropped to the stored size, target (B, H, W) label values
        (0/1 for the binary task)."""
        self.update_probabilities(probabilities(logits.detach().float(), self.task), target, loss, rows)

    def update_probabilities(self, probs: torch.Tensor, target: torch.Tensor,
                             loss: torch.Tensor | float | None = None, rows: torch.Tensor | None = None) -> None:
        """Add a batch of the task's probabilities (B, outputs, H, W): how fused predictions are scored like models."""
        with torch.no_grad():
            probs = probs.float()
            batch = target.shape[0]
            confusion = slice_confusion(classes_of(probs, self.task), target, self.classes)
            tp, fp, fn = _class_counts(confusion.sum(0))
            dice = _region_dice(confusion, self._membership)
            c = self.classes
            s = self.sums
            if loss is not None:
                s[0] += loss * batch
                s[1] += batch
            s[2] += batch
            s[3] += tp.sum()
            s[4] += target.numel()
            if self.task == "regions":
                s[5] += ((probs - encode(target, self.task)) ** 2).sum()
            else:  # sum over pixels of |p - onehot|^2 = sum p^2 - 2 p[truth] + 1, with no one-hot tensor
                s[5] += (probs * probs).sum() - 2 * probs.gather(1, target.unsqueeze(1)).sum() + target.numel()
            s[6] += probs.numel()
            s[7 : 7 + c] += tp
            s[7 + c : 7 + 2 * c] += fp
            s[7 + 2 * c : 7 + 3 * c] += fn
            s[7 + 3 * c :] += dice.sum(0)
            if self.per_slice is not None:
                accuracy = confusion.diagonal(dim1=1, dim2=2).sum(1).double() / target[0].numel()
                self._keep(accuracy, dice, rows)

    def _keep(self, accuracy: torch.Tensor, dice: torch.Tensor, rows: torch.Tensor | None) -> None:
        for i in range(accuracy.shape[0]):
            record = {"row": int(rows[i]) if rows is not None else -1, "pixel_accuracy": float(accuracy[i])}
            record.update({f"dice_{r}": float(dice[i, j]) for j, r in enumerate(self.regions)})
            self.per_slice.append(record)  # type: ignore[union-attr]

    @property
    def slices(self) -> float:
        """Slices counted so far (over every rank once ``all_reduce`` ran)."""
        return float(self.sums[2])

    def all_reduce(self) -> None:
        """Sum the counts over every rank (the per-slice records stay on their rank)."""
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(self.sums)

    def compute(self) -> dict[str, float]:
        """The metrics of the epoch (over every rank once ``all_reduce`` ran)."""
        s = self.sums.cpu()
        c = self.classes
        tp, fp, fn = s[7 : 7 + c], s[7 + c : 7 + 2 * c], s[7 + 2 * c : 7 + 3 * c]
        union = tp + fp + fn
        iou = torch.where(union > 0, tp / union.clamp_min(1), torch.ones_like(tp))
        out = {
            "loss": float(s[0] / s[1]) if s[1] > 0 else float("nan"),
            "pixel_accuracy": float(s[3] / s[4]),
            "mean_iou": float(iou.mean()),
            "mse": float(s[5] / s[6]),
        }
        dice = s[7 + 3 * c :] / s[2].clamp_min(1)
        out.update({f"dice_{r}": float(d) for r, d in zip(self.regions, dice)})
        out["dice_mean"] = float(dice.mean())
        return out

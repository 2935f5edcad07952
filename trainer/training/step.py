"""The training step and the evaluation pass: losses, optimiser, learning-rate schedule, gradient clipping.

``train_step`` is the one function both ``fit`` and ``benchmarks/`` time, so a benchmark measures the code users run.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import FitConfig
from trainer.data.inputs import NetworkInputs
from trainer.device import autocast_context
from trainer.tasks import probabilities, region_targets
from trainer.training.clock import RunClock
from trainer.training.metrics import SegmentationMetrics

#: Exponent of the polynomial decay, as nnU-Net uses it.
POLY_EXPONENT = 0.9


class SummedLoss(nn.Module):
    """The sum of several losses on the same logits and targets."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([part(logits, target) for part in self.parts]).sum()


class OnRegions(nn.Module):
    """A multilabel loss on the WT, TC and ET masks drawn from label targets (``--task regions``)."""

    def __init__(self, loss: nn.Module) -> None:
        super().__init__()
        self.loss = loss

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss(logits, region_targets(target))


def make_loss(name: str, task: str = "multiclass") -> nn.Module:
    """Cross-entropy and/or smp's focal and Dice losses on logits, summed: e.g. "ce+dice". With ``task`` regions,
    each on the three region masks: binary cross-entropy ("ce") and smp's multilabel Dice and focal losses, as
    nnU-Net trains BraTS regions (Dice + BCE)."""
    if task == "regions":
        available = {
            "ce": nn.BCEWithLogitsLoss,
            "focal": lambda: smp.losses.FocalLoss(mode="multilabel"),
            "dice": lambda: smp.losses.DiceLoss(mode="multilabel", from_logits=True),
        }
        return SummedLoss([OnRegions(available[part]()) for part in name.split("+")])
    available = {
        "ce": nn.CrossEntropyLoss,
        "focal": lambda: smp.losses.FocalLoss(mode="multiclass"),
        "dice": lambda: smp.losses.DiceLoss(mode="multiclass", from_logits=True),
    }
    return SummedLoss([available[part]() for part in name.split("+")])


def lr_factor(step: int, warmup: int, schedule: str, progress: float) -> float:
    """The share of the base learning rate at ``step``: linear warm-up over ``warmup`` steps, then polynomial
    (nnU-Net's (1 - t)^0.9), cosine or constant at ``progress`` t (0 to 1) through the run."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    if schedule == "poly":
        return (1.0 - progress) ** POLY_EXPONENT
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class Optimiser:
    """Everything that changes the weights: AdamW, its learning-rate schedule, the AMP grad scaler, clipping."""

    optimizer: torch.optim.Optimizer
    schedule: LambdaLR
    scaler: torch.amp.GradScaler
    clip_grad: float | None

    @classmethod
    def create(cls, model: nn.Module, config: FitConfig, device: torch.device, amp_dtype: torch.dtype | None,
               total_steps: float, steps_per_epoch: int, clock: RunClock | None = None) -> Optimiser:
        """AdamW (on CUDA the fused kernel: one launch per step instead of several per parameter tensor). The
        schedule runs over ``total_steps`` (at most; may be infinite with a time budget), or over the time budget of
        ``clock`` when it has one."""
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                      fused=device.type == "cuda")
        warmup = int(min(round(config.warmup_epochs * steps_per_epoch), total_steps // 2))
        timed = clock is not None and clock.budget is not None

        def factor(step: int) -> float:
            progress = clock.fraction() if timed else min(1.0, (step - warmup) / max(1, total_steps - warmup))
            return lr_factor(step, warmup, config.schedule, progress)

        schedule = LambdaLR(optimizer, factor)
        scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
        return cls(optimizer, schedule, scaler, config.clip_grad)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "schedule": self.schedule.state_dict(),
                "scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.scaler.load_state_dict(state["scaler"])


def train_step(network: nn.Module, batches: NetworkInputs, images: torch.Tensor, labels: torch.Tensor,
               generator: torch.Generator, loss_fn: nn.Module, optimiser: Optimiser, amp_dtype: torch.dtype | None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One optimiser step on a stored batch: device-side augmentation and crops, forward, backward, clipped update.

    Returns (logits, target, loss), still on the device: nothing here waits for the GPU.
    """
    inputs, target = batches.inputs(images, labels, generator)
    with autocast_context(batches.device, amp_dtype):
        logits = batches.crop(network(inputs), target)
        loss = loss_fn(logits.float(), target)
    optimiser.optimizer.zero_grad(set_to_none=True)
    optimiser.scaler.scale(loss).backward()
    if optimiser.clip_grad is not None:
        optimiser.scaler.unscale_(optimiser.optimizer)
        nn.utils.clip_grad_norm_(network.parameters(), optimiser.clip_grad)
    optimiser.scaler.step(optimiser.optimizer)
    optimiser.scaler.update()
    optimiser.schedule.step()
    return logits.detach(), target, loss.detach()


def per_slice_loss(loss_fn: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over slices of each slice's loss: unlike a batch's Dice loss, independent of how slices are
    batched or sharded, so evaluation gives the same number in one process or across ranks."""
    return torch.stack([loss_fn(logits[i : i + 1], target[i : i + 1]) for i in range(len(target))]).mean()


def evaluation_pass(model: nn.Module, source: Iterable, batches: NetworkInputs, amp_dtype: torch.dtype | None,
                    keep_per_slice: bool = False, kept: list[torch.Tensor] | None = None) -> SegmentationMetrics:
    """Metrics of ``model`` over ``source`` (this rank's share; call ``all_reduce`` for the whole split).

    With a ``kept`` list, each batch's probabilities (``trainer.tasks.probabilities``) are appended to it (float16, on
    the CPU).
    """
    config = batches.config
    metrics = SegmentationMetrics(config.task, batches.device, keep_per_slice)
    loss_fn = make_loss(config.loss, config.task).to(batches.device)
    model.eval()
    with torch.no_grad(), autocast_context(batches.device, amp_dtype):
        for images, labels, rows in source:
            inputs, target = batches.inputs(images, labels)  # whole slices: no slice's result depends on its batch
            logits = batches.crop(model(inputs), target).float()
            metrics.update(logits, target, per_slice_loss(loss_fn, logits, target), rows)
            if kept is not None:
                kept.append(probabilities(logits, config.task).half().cpu())
    return metrics

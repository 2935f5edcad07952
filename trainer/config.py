"""A run's configuration: every option, checked when made, saved as config.json and inside each checkpoint."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from builder.format import MODALITIES, canonical_modality
from trainer.transforms import NORMALISATIONS

LOSSES = ("ce+dice", "ce", "dice", "focal+dice")
TASKS = ("multiclass", "binary")
CACHES = ("auto", "stream", "device")
SCHEDULES = ("poly", "cosine", "constant")
#: The batch size when none is given: what a CPU gets through in reasonable time, and what fills a GPU.
DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 64}


class FitError(Exception):
    """A run that cannot start as configured; one line naming the problem and the fix."""


@dataclass
class FitConfig:
    """Every option of a run; saved as config.json and inside each checkpoint (plain JSON types only)."""

    data: str
    modality: str
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = "imagenet"
    task: str = "multiclass"
    loss: str = "ce+dice"
    norm: str = "zscore"
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int | None = None  # None: DEFAULT_BATCH_SIZE of the device, at most the train split
    lr: float = 1e-3
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    clip_grad: float | None = 12.0
    weight_decay: float = 1e-4
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    augment: bool = True
    crop: int | None = None
    seed: int = 0
    patience: int = 5
    cache: str = "auto"
    out: str = "runs"
    name: str | None = None
    # Filled from the artifact when the run starts, so that a checkpoint alone can segment and name its data:
    axis_codes: list[str] | None = None
    voxel_size: list[float] | None = None
    slice_shape: list[int] | None = None
    data_sha256: str | None = None
    data_id: str | None = None

    def __post_init__(self) -> None:
        self.modality = "all" if self.modality.lower() in ("all", "early", "fusion") else canonical_modality(self.modality)
        for value, valid, what in ((self.task, TASKS, "task"), (self.loss, LOSSES, "loss"),
                                   (self.norm, NORMALISATIONS, "normalisation"), (self.cache, CACHES, "cache"),
                                   (self.schedule, SCHEDULES, "schedule")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if self.encoder_weights in ("none", "None", ""):
            self.encoder_weights = None
        if self.crop is not None and self.crop % 32:
            raise ValueError(f"--crop {self.crop}: use a multiple of 32 (what the encoders need)")
        if not (0 < self.lr < float("inf")):
            raise ValueError(f"--lr {self.lr}: use a positive finite learning rate, e.g. 1e-3")
        if self.clip_grad is not None and not (0 < self.clip_grad < float("inf")):
            raise ValueError(f"--clip-grad {self.clip_grad}: use a positive finite gradient norm, or none")

    @property
    def channels(self) -> list[str]:
        return list(MODALITIES) if self.modality == "all" else [self.modality]

    @property
    def classes(self) -> int:
        return 4 if self.task == "multiclass" else 2

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": self.channels, "classes": self.classes}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FitError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FitError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None


def default_batch_size(device: torch.device, train_rows: int) -> int:
    """The device's default batch size, but never more than the train split holds."""
    return min(DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"]), train_rows)

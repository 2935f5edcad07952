"""A run's configuration: every option, checked when made, saved as config.json and inside each checkpoint."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import Any, Union

from builder.format import MAX_CONTEXT, MODALITIES, canonical_modality
from trainer.tasks import OUTPUTS, TASKS

LOSSES = ("ce+dice", "ce", "dice", "focal+dice")
CACHES = ("auto", "stream", "device")
SCHEDULES = ("poly", "cosine", "constant")
#: Per-slice intensity normalisations over brain pixels (``trainer.data.transforms.normalise``).
NORMALISATIONS = ("zscore", "minmax")
MAX_FOLDS = 20
#: The layout of a run's saved configuration (config.json and every checkpoint's): 1 before it was recorded, 2 with
#: context, plane, folds and this number; a reader refuses a later one in one line.
CONFIG_VERSION = 2


@dataclass
class FitConfig:
    """Every option of a run; saved as config.json and inside each checkpoint (plain JSON types only)."""

    data: str
    modality: str
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = "imagenet"
    decoder_channels: int | None = None  # the widest decoder block, halving after (None: smp's 256)
    task: str = "multiclass"
    loss: str = "ce+dice"
    norm: str = "zscore"
    epochs: int = 50
    max_steps: int | None = None
    time_limit: float | None = None  # minutes of training and validation (trainer.training.clock), across resumes
    batch_size: int | None = None  # None: trainer.device.DEFAULT_BATCH_SIZE of the device, at most the train split
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
    context: int = 0  # neighbouring slices on each side fed as extra channels (2.5D); at most the file's
    folds: int | None = None  # cross-validation: train on the other folds of the train and val patients ...
    fold: int | None = None  # ... and validate on this one
    keep_last: bool = False  # keep the resume state (last.pt) when the run ends, to extend it later
    quiet: bool = False  # print only the run folder (log.txt has everything)
    tensorboard: bool = False  # also write the metrics for TensorBoard
    out: str = "runs"
    name: str | None = None
    # Filled from the artifact when the run starts, so that a checkpoint alone can segment and name its data:
    plane: str = "axial"
    slice_axis: int = 2
    axis_codes: list[str] | None = None
    voxel_size: list[float] | None = None
    slice_shape: list[int] | None = None
    data_sha256: str | None = None
    data_url: str | None = None  # the address DATA was fetched from, pinned to its SHA-256 (builder.remote)
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
        if self.decoder_channels is not None and not 16 <= self.decoder_channels <= 4096:
            raise ValueError(f"--decoder-channels {self.decoder_channels}: use 16 to 4096 (smp's default is 256)")
        if not 0 <= self.context <= MAX_CONTEXT:
            raise ValueError(f"--context {self.context}: use 0 to {MAX_CONTEXT} slices on each side")
        if self.time_limit is not None and not (0 < self.time_limit < math.inf):
            raise ValueError(f"--time-limit {self.time_limit}: use a positive number of minutes, e.g. 30")
        for name, value, low in (("epochs", self.epochs, 1), ("max-steps", self.max_steps, 1),
                                 ("batch-size", self.batch_size, 1), ("workers", self.workers, 0),
                                 ("patience", self.patience, 1), ("warmup-epochs", self.warmup_epochs, 0),
                                 ("weight-decay", self.weight_decay, 0)):
            if value is not None and not (low <= value < math.inf):
                raise ValueError(f"--{name} {value}: use a finite number of at least {low}")
        if self.slice_axis not in (0, 1, 2):
            raise ValueError(f"slice axis {self.slice_axis}: a volume has axes 0, 1 and 2")
        for name, value, length in (("axis codes", self.axis_codes, 3), ("voxel size", self.voxel_size, 3),
                                    ("slice shape", self.slice_shape, 2)):
            if value is not None and (len(value) != length or not all(
                    isinstance(v, str) or 0 < v < math.inf for v in value)):
                raise ValueError(f"{name} {str(value)[:40]}: expected {length} values (positive sizes)")
        if (self.folds is None) != (self.fold is None):
            raise ValueError("--folds and --fold go together: e.g. --folds 5 --fold 0 (folds 0 to 4)")
        if self.folds is not None and not (2 <= self.folds <= MAX_FOLDS and 0 <= self.fold < self.folds):  # type: ignore[operator]
            raise ValueError(f"--folds {self.folds} --fold {self.fold}: use 2 to {MAX_FOLDS} folds and a fold from 0 "
                             f"to {(self.folds or 1) - 1}")

    @property
    def channels(self) -> list[str]:
        return list(MODALITIES) if self.modality == "all" else [self.modality]

    @property
    def classes(self) -> int:
        """Network outputs: 4 classes (multiclass), 2 (binary) or 3 regions."""
        return OUTPUTS[self.task]

    @property
    def in_channels(self) -> int:
        """Network inputs: each channel's slice and its ``context`` neighbours on each side."""
        return len(self.channels) * (2 * self.context + 1)

    def to_dict(self) -> dict[str, Any]:
        """Every option, with what they imply and the layout's version: what config.json and checkpoints hold."""
        return {**dataclasses.asdict(self), "channels": self.channels, "classes": self.classes,
                "config_version": CONFIG_VERSION}

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "configuration") -> FitConfig:
        """A configuration from saved values (config.json, a checkpoint), each checked by type and range first:
        ValueError names ``source``, the field and what it should be. Keys it does not know are ignored."""
        if not isinstance(values, dict):
            raise ValueError(f"{source}: not a mapping of options; not a brats2d run configuration")
        hints = typing.get_type_hints(cls)
        known = {f.name: f for f in dataclasses.fields(cls)}
        for name, value in values.items():
            if name in known and not _matches(value, hints[name]):
                raise ValueError(f"{source}: {name} is {str(value)[:40]!r}, not {_describe(hints[name])}; the file is "
                                 "damaged or was edited")
        missing = [name for name in ("data", "modality") if name not in values]
        if missing:
            raise ValueError(f"{source}: no {missing[0]}; not a brats2d run configuration")
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except ValueError as error:
            raise ValueError(f"{source}: {error}") from None


def _matches(value: Any, hint: Any) -> bool:
    """Whether a saved ``value`` is of the annotated type (JSON's types: bool is no number, an int is a float)."""
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(hint))
    if origin is list:
        return isinstance(value, list) and len(value) <= 16 and all(_matches(v, typing.get_args(hint)[0]) for v in value)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str) and len(value) <= 4096
    return False


def _describe(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(option) for option in typing.get_args(hint))
    if origin is list:
        return f"a list of {_describe(typing.get_args(hint)[0])}"
    return {type(None): "none", bool: "true/false", int: "a whole number", float: "a number", str: "text"}.get(hint, "?")

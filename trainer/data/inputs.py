"""Where a run's batches come from (streamed from the file or held on the device), and how stored rows become
network inputs and targets on the device, the same way for training, evaluation and whole volumes."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.data.loading import DeviceCache, RowReader, SliceDataset, make_loader
from trainer.data.transforms import augment, crop, normalise, pad, padding_for, random_crop
from trainer.device import channels_last

#: The device cache is used automatically when the split needs less than this share of free GPU memory.
DEVICE_CACHE_SHARE = 0.25


class NetworkInputs:
    """Turns stored batches into network inputs and targets on the device, the same way for train and eval."""

    def __init__(self, config: FitConfig, device: torch.device) -> None:
        self.config, self.device = config, device
        self.channels_last = channels_last(device)

    def inputs(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input (zero-padded to a multiple of 32) and targets; with a ``generator`` (training) augmented
        and maybe cropped."""
        images = normalise(images.to(self.device, non_blocking=True), self.config.norm)
        target = self.targets(labels)
        if generator is not None:
            if self.config.augment:
                images, target = augment(images, target, generator)
            if self.config.crop:
                images, target = random_crop(images, target, self.config.crop, generator)
        return self._layout(pad(images, padding_for(*images.shape[-2:]))), target

    def targets(self, labels: torch.Tensor) -> torch.Tensor:
        """Stored labels as targets on the device (binary: tumour or not; regions: the loss and the metrics draw WT,
        TC and ET from the labels)."""
        target = labels.to(self.device, non_blocking=True).long()
        return (target > 0).long() if self.config.task == "binary" else target

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def crop(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits at the target's size: undo the padding."""
        return logits if logits.shape[-2:] == target.shape[-2:] else crop(logits, padding_for(*target.shape[-2:]))


def open_artifact(config: FitConfig) -> Artifact:
    """The run's artifact, checked to hold what the run reads, as the run sees it (a fold run: its fold)."""
    artifact = Artifact.open(config.data)
    artifact.require(config.channels, config.context)
    return artifact.with_folds(config.folds, config.fold) if config.folds else artifact


def dataset_for(config: FitConfig, artifact: Artifact, rows: np.ndarray) -> SliceDataset:
    """The rows a run reads: its channels, each with its ``context`` neighbours."""
    return SliceDataset(RowReader(artifact.path, config.channels, artifact.stamp, config.context, artifact.context),
                        rows)


def make_source(config: FitConfig, artifact: Artifact, split: str, train: bool, device: torch.device,
                use_cache: bool, rank: int = 0, world_size: int = 1) -> Iterable:
    """Batches of ``split``: a DataLoader streaming from the file, or the split held on the device."""
    dataset = dataset_for(config, artifact, artifact.rows_of(split))
    if use_cache:
        return DeviceCache(dataset, config.batch_size, train, config.seed, device, rank, world_size)
    return make_loader(dataset, config.batch_size, train, config.workers, config.seed, rank, world_size,
                       pin_memory=device.type == "cuda")


def choose_cache(config: FitConfig, artifact: Artifact, device: torch.device) -> bool:
    """Whether to hold the splits on the device: asked for, or (auto) on a GPU with room to spare."""
    if config.cache != "auto":
        return config.cache == "device"
    if device.type != "cuda":
        return False
    needed = sum(DeviceCache.nbytes(artifact.path, len(artifact.splits[s]), config.channels, config.context)
                 for s in ("train", "val"))
    free, _ = torch.cuda.mem_get_info(device)
    return needed < DEVICE_CACHE_SHARE * free

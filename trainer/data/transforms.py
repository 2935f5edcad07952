"""Batch transforms that run on the device: intensity normalisation, padding, augmentation.

The file stores raw scanner values; these turn a batch of stored integers into what the network sees. On a GPU
they cost microseconds, where the same work in DataLoader workers would halve the loader's throughput.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from trainer.config import NORMALISATIONS


def normalise(images: torch.Tensor, mode: str) -> torch.Tensor:
    """Float images, each slice and channel normalised over its brain (non-zero) pixels; background stays 0.

    ``zscore``: (x - mean) / std over the brain. ``minmax``: x / max, the original notebooks' scaling.
    """
    x = images.float()
    brain = x != 0
    count = brain.sum(dim=(-2, -1), keepdim=True).clamp_min(1)
    if mode == "minmax":
        peak = x.abs().amax(dim=(-2, -1), keepdim=True).clamp_min(1e-6)
        return x / peak
    if mode != "zscore":
        raise ValueError(f"unknown normalisation {mode!r}; valid: {', '.join(NORMALISATIONS)}")
    mean = x.sum(dim=(-2, -1), keepdim=True) / count
    var = ((x - mean) ** 2 * brain).sum(dim=(-2, -1), keepdim=True) / count
    return (x - mean) / var.sqrt().clamp_min(1e-6) * brain


def padding_for(height: int, width: int, multiple: int = 32) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding that makes both sides a multiple of ``multiple``, centred."""
    pad_h, pad_w = -height % multiple, -width % multiple
    return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2


def pad(images: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Zero-pad images to a size the encoder accepts (never resize: label maps must not be interpolated)."""
    return F.pad(images, padding) if any(padding) else images


def crop(logits: torch.Tensor, padding: tuple[int, int, int, int]) -> torch.Tensor:
    """Undo ``pad`` on network outputs, so that metrics see exactly the stored pixels."""
    left, right, top, bottom = padding
    height, width = logits.shape[-2:]
    return logits[..., top : height - bottom, left : width - right]


def augment(images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, 90-degree rotations (square slices) and intensity jitter, per sample, on the device."""
    batch = images.shape[0]

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(images.device)

    target = labels.unsqueeze(1)
    for dim in (-1, -2):
        flip = draw(batch) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(dim), images)
        target = torch.where(flip[:, None, None, None], target.flip(dim), target)
    if images.shape[-1] == images.shape[-2]:
        turns = (draw(batch) * 4).long()
        for k in (1, 2, 3):
            chosen = (turns == k)[:, None, None, None]
            images = torch.where(chosen, torch.rot90(images, k, (-2, -1)), images)
            target = torch.where(chosen, torch.rot90(target, k, (-2, -1)), target)
    scale = 1 + 0.1 * (draw(batch, images.shape[1], 1, 1) * 2 - 1)
    shift = 0.1 * (draw(batch, images.shape[1], 1, 1) * 2 - 1)
    images = torch.where(images != 0, images * scale + shift, images)
    return images, target.squeeze(1)


def random_crop(images: torch.Tensor, labels: torch.Tensor, size: int, generator: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """A size x size patch per sample, centred on a random tumour pixel two times in three (as nnU-Net
    oversamples foreground), else anywhere. Training on patches is 3-4x cheaper; the network stays fully
    convolutional, so validation and prediction still see whole slices.

    Drawn for the whole batch at once on the device (no per-sample ``nonzero`` or ``.tolist()``: no host sync):
    the tumour pixel with the largest of a uniform draw per pixel is a uniformly random tumour pixel.
    """
    batch, height, width = labels.shape
    if size >= min(height, width):
        return images, labels
    device = labels.device

    def draw(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator, device=generator.device).to(device)

    scores = torch.where(labels > 0, draw(batch, height, width), torch.full_like(labels, -1, dtype=torch.float))
    best, pixel = scores.flatten(1).max(1)
    choice = draw(batch, 3)
    centred = (choice[:, 0] < 2 / 3) & (best >= 0)
    top = torch.where(centred, pixel // width - size // 2, (choice[:, 1] * (height - size + 1)).long())
    left = torch.where(centred, pixel % width - size // 2, (choice[:, 2] * (width - size + 1)).long())
    top, left = top.clamp(0, height - size), left.clamp(0, width - size)
    steps = torch.arange(size, device=device)
    rows, cols = (top[:, None] + steps)[:, :, None], (left[:, None] + steps)[:, None, :]
    samples = torch.arange(batch, device=device)[:, None, None]
    return images[samples, :, rows, cols].permute(0, 3, 1, 2), labels[samples, rows, cols]

"""One network over a whole volume: its brain slices in the run's plane, each with the run's neighbouring slices
(``trainer.data.context``), normalised and padded as in training (``trainer.data.inputs.NetworkInputs``), mirrored at
test time if asked. ``trainer.inference.ensemble.Segmenter`` averages such passes and draws the labels."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from builder.progress import Progress
from trainer.config import FitConfig
from trainer.data.context import volume_inputs
from trainer.data.inputs import NetworkInputs
from trainer.device import autocast_context, autocast_dtype
from trainer.tasks import encode, probabilities

#: Test-time augmentation: each slice also mirrored along one, the other and both of its in-plane axes.
TTA_FLIPS: tuple[tuple[int, ...], ...] = ((), (-1,), (-2,), (-2, -1))


@dataclass(frozen=True)
class VolumeProbabilities:
    """Probabilities (``trainer.tasks``) over a volume, and what the passes that made them cost."""

    probabilities: np.ndarray  # (outputs, X, Y, Z) float16
    brain_slices: int
    seconds: float
    member_uncertainty: np.ndarray | None = None  # an ensemble's members' mean ``uncertainty``, when asked for

    @property
    def slices_per_second(self) -> float:
        return self.brain_slices / self.seconds if self.seconds > 0 else float("inf")


def brain_box(brain: np.ndarray) -> tuple[slice, slice]:
    """The in-plane box holding every brain pixel of a volume's slices ((H, W): any slice's), grown to a multiple
    of 32 where the slice allows: outside it the network has nothing to see. One box for the whole volume, so that
    no slice's result depends on another's."""
    box = []
    for axis, size in ((1, brain.shape[0]), (0, brain.shape[1])):
        found = np.flatnonzero(brain.any(axis))
        start, length = int(found[0]), int(found[-1]) + 1 - int(found[0])
        wanted = min(size, length + (-length % 32))
        start = max(0, min(start - (wanted - length) // 2, size - wanted))
        box.append(slice(start, start + wanted))
    return box[0], box[1]


def empty_probabilities(task: str) -> np.ndarray:
    """(outputs,) probabilities that say "background" for certain, where the network does not look."""
    return encode(torch.zeros((1, 1), dtype=torch.long), task)[0, :, 0].numpy()


def network_probabilities(model: torch.nn.Module, config: FitConfig, images: np.ndarray, device: torch.device,
                          batch_size: int = 16, progress: bool = True, tta: bool = False, box: bool = True
                          ) -> VolumeProbabilities:
    """The task's probabilities for a (C, X, Y, Z) stack of the run's channels, slice by slice in the run's plane.
    Slices with no brain skip the network, which sees only the brain's bounding box (padded to a multiple of 32:
    about half of a BraTS slice; ``box=False``: whole slices, the previous release's pass, which benchmarks compare
    against). With ``tta``, probabilities are averaged over the slice and its mirror images along its in-plane axes
    (``TTA_FLIPS``: four passes)."""
    started = time.perf_counter()
    stack = np.moveaxis(images, 1 + config.slice_axis, -1)  # (C, H, W, S): slices along the run's axis
    brain = stack.any(axis=0)
    slices = np.flatnonzero(brain.any(axis=(0, 1)))
    out = np.empty((config.classes, *stack.shape[1:]), dtype=np.float16)
    out[:] = empty_probabilities(config.task)[:, None, None, None]
    flips = TTA_FLIPS if tta else TTA_FLIPS[:1]
    if slices.size:
        rows, cols = brain_box(brain.any(axis=2)) if box else (slice(None), slice(None))
        cropped = stack[:, rows, cols]
        inputs = NetworkInputs(config, device)
        starts = range(0, len(slices), batch_size)
        with torch.no_grad(), autocast_context(device, autocast_dtype(device, config.amp)):
            for start in Progress(starts, f"{len(slices)} {config.plane} slices", unit="batch", show=progress,
                                  leave=False):
                zs = slices[start : start + batch_size]
                stored = torch.from_numpy(volume_inputs(cropped, zs, config.context))
                no_labels = torch.zeros((len(zs), *stored.shape[-2:]), dtype=torch.uint8)

                def mirrored(dims: tuple[int, ...]) -> torch.Tensor:
                    batch, target = inputs.inputs(stored.flip(dims) if dims else stored, no_labels)
                    probs = probabilities(inputs.crop(model(batch), target).float(), config.task)
                    return probs.flip(dims) if dims else probs

                mean = sum(mirrored(dims) for dims in flips) / len(flips)
                out[:, rows, cols, zs] = mean.half().cpu().numpy().transpose(1, 2, 3, 0)
    return VolumeProbabilities(np.moveaxis(out, -1, 1 + config.slice_axis), len(slices), time.perf_counter() - started)

"""Segment new cases: every axial slice of the volume through a trained 2D model, written as a BraTS seg NIfTI.

Needs nibabel (``pip install 'brats2d[predict]'``): the only part of the trainer that reads NIfTI.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from builder.format import REGIONS, SEG
from builder.layout import find_cases
from trainer.metrics import region_masks
from trainer.model import load_model
from trainer.train import Batches, FitConfig, FitError, autocast_context, autocast_dtype, resolve_device

#: Binary (whole tumour) models write this label: the oedema value, the largest part of most tumours.
BINARY_LABEL = 2


def _nibabel():
    try:
        import nibabel
    except ImportError:
        raise FitError("predict reads NIfTI: pip install 'brats2d[predict]' (adds nibabel)") from None
    return nibabel


def dice_3d(pred: np.ndarray, truth: np.ndarray, task: str) -> dict[str, float]:
    """Whole-volume Dice per BraTS region (1 when a region is absent from both)."""
    p = region_masks(torch.from_numpy(pred).long()[None], "multiclass")[0]
    t = region_masks(torch.from_numpy(truth).long()[None], "multiclass")[0]
    names = list(REGIONS) if task == "multiclass" else ["WT"]
    out = {}
    for i, name in enumerate(names):
        inter, total = float((p[i] * t[i]).sum()), float(p[i].sum() + t[i].sum())
        out[f"dice_{name}"] = 1.0 if total == 0 else 2 * inter / total
    return out


def predict_volume(model: torch.nn.Module, config: FitConfig, volumes: np.ndarray, device: torch.device,
                   batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """Labels (X, Y, Z) for a (C, X, Y, Z) stack of modality volumes, slice by slice in batches."""
    channels, x, y, z = volumes.shape
    batches = Batches(config, (x, y), device)
    amp = autocast_dtype(device, config.amp)
    out = np.zeros((x, y, z), dtype=np.uint8)
    with torch.no_grad(), autocast_context(device, amp), tqdm(total=z, unit="slice", disable=None if progress else True,
                                                              leave=False) as bar:
        for start in range(0, z, batch_size):
            stop = min(start + batch_size, z)
            images = torch.from_numpy(np.ascontiguousarray(np.moveaxis(volumes[..., start:stop], -1, 0)))
            empty = torch.zeros(images.shape[0], x, y, dtype=torch.uint8)
            inputs, target = batches.inputs(images, empty)
            labels = batches.crop(model(inputs), target).argmax(1).to(torch.uint8).cpu().numpy()
            out[..., start:stop] = np.moveaxis(labels, 0, -1)
            bar.update(stop - start)
    return out if config.task == "multiclass" else out * BINARY_LABEL


def predict_cases(run_dir: Path, case_dirs: list[Path], out: Path, device_name: str = "auto",
                  checkpoint: str = "best.pt") -> list[dict]:
    """Write ``<case>-seg.nii.gz`` for each case in ``out``; return 3D Dice rows for cases that have a seg."""
    nib = _nibabel()
    device = resolve_device(device_name)
    model, saved = load_model(run_dir / checkpoint, device)
    config = FitConfig.from_dict({**saved, "device": str(device)})
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    for case_dir in case_dirs:
        found = find_cases(case_dir) if case_dir.is_dir() else []
        if len(found) != 1:
            raise FitError(f"{case_dir}: not one BraTS case folder (expected files like <case>-t1c.nii.gz)")
        case = found[0]
        missing = [case.files[c].name for c in config.channels if not case.files[c].is_file()]
        if missing:
            raise FitError(f"{case_dir}: missing {', '.join(missing)}, which this {config.modality} model needs")
        images = [nib.load(case.files[c]) for c in config.channels]
        shapes = {img.shape for img in images}
        if len(shapes) != 1 or len(next(iter(shapes))) != 3:
            raise FitError(f"{case_dir}: the model needs 3D volumes of one shape, got {sorted(shapes)}")
        volumes = np.stack([np.asanyarray(img.dataobj) for img in images])
        if volumes.dtype.kind == "f" and not np.isfinite(volumes).all():
            raise FitError(f"{case_dir}: NaN or infinite voxels in the input volumes")
        labels = predict_volume(model, config, volumes, device)
        reference = images[-1]
        header = reference.header.copy()
        header.set_data_dtype(np.uint8)
        header.set_slope_inter(1, 0)
        target = out / f"{case.case_id}-seg.nii.gz"
        partial = out / f".{target.name}.partial.nii.gz"
        nib.save(nib.Nifti1Image(labels, reference.affine, header), partial)
        os.replace(partial, target)
        report = {"case_id": case.case_id, "output": str(target)}
        if case.files[SEG].is_file():
            truth = np.asanyarray(nib.load(case.files[SEG]).dataobj).astype(np.uint8)
            truth[truth == 4] = 3
            report |= dice_3d(labels, truth, config.task)
        reports.append(report)
    if any(len(r) > 2 for r in reports):
        with open(out / "predict_dice.csv", "w", newline="") as handle:
            fields = sorted({k for r in reports for k in r}, key=lambda k: (k != "case_id", k))
            writer = csv.DictWriter(handle, fieldnames=fields)
            writer.writeheader()
            writer.writerows(reports)
    return reports


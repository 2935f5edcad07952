"""Calibration and uncertainty on real patients, from what benchmarks/budget.py cached (every prediction's region
probabilities, as uint8 0-255; raw masks, no clean-up):

- temperature scaling (trainer.scoring.calibration) fitted per fold on the fold's validation patients and scored
  on its held-out ones (never fitted on the patients it is scored on): the voxel ECE inside the brain before and
  after, each region's sigmoid a binary prediction;
- the Dice of the voxels above and below the median uncertainty (trainer.scoring.uncertainty) of the held-out
  patients.

    python benchmarks/uncertainty.py [--rows planes@30min,axial@500]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budget import CACHE, FOLDS, REAL, REGIONS, Fold, Row, cached, truths  # noqa: E402

from builder.layout import Case, find_cases  # noqa: E402
from trainer.scoring.brats import region_mask  # noqa: E402
from trainer.scoring.calibration import VoxelSample, confidence_and_correct, reliability  # noqa: E402
from trainer.scoring.uncertainty import dice_by_uncertainty  # noqa: E402
from trainer.tasks import uncertainty  # noqa: E402


def calibration_rows(folds: list[Fold], text: str, truth: dict) -> str | None:
    """One table row: the voxel ECE of the held-out patients before and after the fold's val-fitted temperatures."""
    fits: dict[int, VoxelSample] = {}
    held: list[tuple[int, np.ndarray, np.ndarray, np.ndarray]] = []
    for fold, patient, saved in cached(folds, Row.parse(text)):
        probs = saved["regions"].astype(np.float32) / 255
        brain = truth[patient][2]
        if saved["held_out"]:
            held.append((fold.index, probs, truth[patient][0], brain))
        else:
            fits.setdefault(fold.index, VoxelSample("regions")).add(probs, truth[patient][0], brain)
    if not held or not all(index in fits for index, *_ in held):
        return None
    calibrations = {index: sample.calibrate(f"fold {index}'s val patients")[0] for index, sample in fits.items()}
    voxels: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"before": [], "after": []}
    for index, probs, labels, brain in held:  # every brain voxel of the held-out patients
        targets = np.stack([region_mask(labels[brain], r) for r in REGIONS])
        for name, shown in (("before", probs[:, brain]), ("after", calibrations[index].apply(probs[:, brain]))):
            voxels[name].append(confidence_and_correct(shown, targets, "regions"))
    ece_before, ece_after = (reliability(np.concatenate([c for c, _ in voxels[n]]),
                                         np.concatenate([r for _, r in voxels[n]]))[0] for n in ("before", "after"))
    shown = "; ".join(f"fold {i}: " + ", ".join(f"{t:.2f}" for t in c.temperatures) for i, c in calibrations.items())
    return f"| {text} | {len(held)} | {ece_before:.4f} | {ece_after:.4f} | {shown} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="planes@30min,axial@30min,axial@500")
    args = parser.parse_args()
    patients = sorted(c.case_id for c in find_cases(REAL))
    folds = [Fold.of(CACHE, patients, index) for index in range(FOLDS)]
    cases = {c.case_id: c for c in find_cases(REAL)}
    truth = {p: (*t, brain_of(cases[p])) for p, t in truths(REAL, patients).items()}
    print("| row | held-out patients | voxel ECE inside the brain, before | after | temperatures WT, TC, ET |\n"
          "|---|---|---|---|---|")
    for text in args.rows.split(","):
        line = calibration_rows(folds, text, truth)
        if line:
            print(line)
    print("\n| row | held-out patients | " + " | ".join(f"{r} Dice, uncertain / certain half" for r in REGIONS)
          + " |\n|---|---|" + "---|" * len(REGIONS))
    for text in args.rows.split(","):
        scores: list[dict[str, float]] = []
        for _, patient, saved in cached(folds, Row.parse(text)):
            if saved["held_out"]:
                entropy = uncertainty(saved["regions"].astype(np.float32) / 255, "regions")
                scores.append(dice_by_uncertainty(saved["labels"], truth[patient][0], entropy))
        if scores:
            cells = [f"{np.mean([s[f'dice_{r}_uncertain'] for s in scores]):.3f} / "
                     f"{np.mean([s[f'dice_{r}_certain'] for s in scores]):.3f}" for r in REGIONS]
            print(f"| {text} | {len(scores)} | " + " | ".join(cells) + " |")


def brain_of(case: Case) -> np.ndarray:
    """Where any modality is non-zero: the brain, as the trainer finds it."""
    import nibabel as nib

    return np.logical_or.reduce([np.asanyarray(nib.load(case.files[m]).dataobj) > 0
                                 for m in ("t1n", "t1c", "t2w", "t2f")])


if __name__ == "__main__":
    main()

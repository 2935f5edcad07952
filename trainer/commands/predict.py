"""Segment new cases: every brain slice of each volume through a trained 2D model (or an ensemble), written as a
label NIfTI in the case's own space; cases with a seg are also scored as the BraTS 2023 challenge scores them.

Outputs in ``--out``: ``<case-id>.nii.gz`` (the name challenge submissions use, never a ground truth's
``-seg``/``_seg`` name), enhancing tumour written as the input naming's convention expects (4 in 2018-2021 namings,
3 in the 2023 family) unless asked otherwise, and with ``--save-probabilities`` ``<case-id>.npz`` (see
``PROBABILITY_LAYOUT``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from builder.layout import Case, find_cases
from trainer.errors import CaseError, CommandError
from trainer.inference.cases import CaseVolumes, score, write_labels
from trainer.inference.ensemble import Segmenter, runs_in
from trainer.inference.options import VolumeOptions
from trainer.outputs import atomic_output, write_csv
from trainer.tasks import REGION_LABELS

#: What ``<case-id>.npz`` holds.
PROBABILITY_LAYOUT = (
    "probabilities: float16 (outputs, X, Y, Z) in the input's own voxel order, the mean over the ensemble (and "
    "mirrored copies) of each output's probability: multiclass background/NCR/ED/ET (softmax), binary "
    "background/tumour, regions WT/TC/ET (sigmoids); outputs: their names; affine: the input's 4x4 affine"
)


def et_label(convention: str, case: CaseVolumes) -> int:
    """The value enhancing tumour is written as for ``case``."""
    if convention == "auto":
        return 4 if case.legacy_naming else 3
    return 4 if convention == "brats2021" else 3


def output_names(task: str) -> list[str]:
    return {"multiclass": ["background", "NCR", "ED", "ET"], "binary": ["background", "tumour"],
            "regions": [name for name, _ in REGION_LABELS]}[task]


def find_inputs(inputs: list[Path]) -> list[Case]:
    """Every case under each input (a case folder, or a folder of case folders, found as `build` finds them)."""
    cases: list[Case] = []
    for path in inputs:
        if not path.is_dir():
            raise CommandError(f"{path}: no such folder (give case folders, or folders holding them)")
        try:
            found = find_cases(path)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if not found:
            raise CommandError(f"{path}: holds no BraTS case folder (expected folders like BraTS-GLI-00000-000/ with "
                           "<case>-t1n.nii.gz ... files, or BraTS2021_00000/ with _t1 ... _flair files)")
        cases.extend(found)
    ids = [case.case_id for case in cases]
    repeated = sorted({i for i in ids if ids.count(i) > 1})
    if repeated:
        raise CommandError(f"case {repeated[0]} is given more than once; each case's output would overwrite the other's")
    return cases


def predict_cases(run_dir: Path, inputs: list[Path], out: Path, options: VolumeOptions = VolumeOptions(),
                  progress: bool = True, ensemble: tuple[Path, ...] = (), labels: str = "auto",
                  save_probabilities: bool = False, overwrite: bool = False
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]], Segmenter]:
    """Write ``<case-id>.nii.gz`` for each case found under ``inputs`` in ``out`` (skipping cases already written
    unless ``overwrite``), segmented as ``options`` say; returns a report per written case (with the whole-volume scores when the case has a seg,
    also written to ``predict_scores.csv``), a line per case skipped, and the segmenter used."""
    segmenter = Segmenter.load(runs_in([run_dir, *ensemble], options.checkpoint), options)
    cases = find_inputs(inputs)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"{out}: cannot create the output folder ({error.strerror})") from None
    reports, skipped = [], []
    for case in cases:
        target = out / f"{case.case_id}.nii.gz"
        if target.exists() and not overwrite:
            skipped.append({"case_id": case.case_id, "reason": f"{target} exists (--overwrite to predict it again)",
                            "kind": "done"})
            continue
        try:
            volumes = segmenter.read(case)
        except CaseError as error:
            skipped.append({"case_id": case.case_id, "reason": str(error), "kind": "error"})
            continue
        done = segmenter.segment(volumes, progress)
        if save_probabilities:
            _save_probabilities(out / f"{case.case_id}.npz", done.result.probabilities, volumes,
                                segmenter.config.task)
        write_labels(done.labels, volumes, target, et_label(labels, volumes))
        report: dict[str, Any] = {"case_id": case.case_id, "output": str(target),
                                  "brain_slices": done.result.brain_slices,
                                  "predict_seconds": round(done.result.seconds, 3),
                                  "slices_per_second": round(done.result.slices_per_second, 1)}
        if volumes.truth is not None:
            report |= score(done.labels, volumes, segmenter.config.task)
        reports.append(report)
    scored = [r for r in reports if "score_seconds" in r]
    if scored:
        write_csv(out / "predict_scores.csv", scored)
    return reports, skipped, segmenter


def _save_probabilities(path: Path, probabilities: np.ndarray, case: CaseVolumes, task: str) -> None:
    """``PROBABILITY_LAYOUT``, written whole or not at all."""
    in_input = np.stack([case.in_input_space(p) for p in probabilities])
    with atomic_output(path, suffix=".npz") as partial:
        np.savez_compressed(partial, probabilities=in_input.astype(np.float16), outputs=np.array(output_names(task)),
                            affine=case.reference.affine)

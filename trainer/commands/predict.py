"""Segment new cases: every brain slice of each volume through a trained 2D model (or an ensemble), written as a
label NIfTI in the case's own space; cases with a seg are also scored as the BraTS 2023 challenge scores them.

Outputs in ``--out``: ``<case-id>.nii.gz`` (the name challenge submissions use, never a ground truth's
``-seg``/``_seg`` name), enhancing tumour written as the input naming's convention expects (4 in 2018-2021 namings,
3 in the 2023 family) unless asked otherwise, and with ``--save-probabilities`` ``<case-id>.npz`` (see
``PROBABILITY_LAYOUT``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import numpy as np

from builder import __version__
from builder.format import SEG, file_sha256
from builder.layout import Case, find_cases, safe_id
from trainer.errors import CaseError, CommandError
from trainer.inference.cases import CaseVolumes, nibabel, score, score_in_input_space, write_labels, write_map
from trainer.inference.ensemble import Segmenter, runs_in
from trainer.inference.options import VolumeOptions
from trainer.outputs import atomic_output, write_csv
from trainer.scoring.brats import region_names
from trainer.scoring.uncertainty import dice_by_uncertainty
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


def find_inputs(inputs: list[Path], unreadable: list[tuple[Path, str]]) -> list[Case]:
    """Every case under each input (a case folder, or a folder of case folders, found as `build` finds them);
    folders that cannot be read (permissions, a path over the system's limit) go in ``unreadable``."""
    cases: list[Case] = []
    for path in inputs:
        if not path.is_dir():
            raise CommandError(f"{path}: no such folder (give case folders, or folders holding them)")
        try:
            found = find_cases(path, unreadable)
        except ValueError as error:
            raise CommandError(str(error)) from None
        if not found and not unreadable:
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
                  save_probabilities: bool = False, overwrite: bool = False, save_uncertainty: bool = False
                  ) -> tuple[list[dict[str, Any]], list[dict[str, str]], Segmenter]:
    """Write ``<case-id>.nii.gz`` for each case found under ``inputs`` in ``out``, segmented as ``options`` say;
    returns a report per case (with the whole-volume scores when the case has a seg, also written to
    ``predict_scores.csv``), a line per case skipped, and the segmenter used.

    A mask already in ``out`` is kept unless ``overwrite``: when its header's stamp says these models, options and
    inputs made it (a rerun after a kill), it is read back and scored with the others, so the table holds every
    case; else the case is refused in one line."""
    segmenter = Segmenter.load(runs_in([run_dir, *ensemble], options.checkpoint), options)
    unreadable: list[tuple[Path, str]] = []
    cases = find_inputs(inputs, unreadable)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise CommandError(f"{out}: cannot create the output folder ({error.strerror})") from None
    made_by = models_stamp(segmenter, options, labels)
    reports: list[dict[str, Any]] = []
    skipped = [{"case_id": safe_id(str(folder)), "reason": reason, "kind": "error"} for folder, reason in unreadable]
    for case in cases:
        target = out / f"{case.case_id}.nii.gz"
        stamp = case_stamp(made_by, case)
        if target.exists() and not overwrite:
            try:
                reports.extend(_written_before(segmenter, case, target, stamp))
            except CaseError as error:
                skipped.append({"case_id": case.case_id, "reason": str(error), "kind": "error"})
            continue
        try:
            volumes = segmenter.read(case)
        except CaseError as error:
            skipped.append({"case_id": case.case_id, "reason": str(error), "kind": "error"})
            continue
        done = segmenter.segment(volumes, progress, with_uncertainty=save_uncertainty)
        if done.uncertainty is not None:
            write_map(done.uncertainty, volumes, out / f"{case.case_id}_uncertainty.nii.gz",
                      "brats2d normalised entropy, 0-1")
        if done.disagreement is not None:
            write_map(done.disagreement, volumes, out / f"{case.case_id}_disagreement.nii.gz",
                      "brats2d members' mutual information, 0-1")
        if save_probabilities:
            _save_probabilities(out / f"{case.case_id}.npz", done.result.probabilities, volumes,
                                segmenter.config.task)
        write_labels(done.labels, volumes, target, et_label(labels, volumes), stamp)
        report: dict[str, Any] = {"case_id": case.case_id, "output": str(target), "written": "now",
                                  "brain_slices": done.result.brain_slices,
                                  "predict_seconds": round(done.result.seconds, 3),
                                  "slices_per_second": round(done.result.slices_per_second, 1)}
        if volumes.truth is not None:
            report |= score(done.labels, volumes, segmenter.config.task)
            if done.uncertainty is not None:
                report |= dice_by_uncertainty(done.labels, volumes.truth, done.uncertainty,
                                              region_names(segmenter.config.task))
        reports.append(report)
    scored = [r for r in reports if "score_seconds" in r]
    if scored:
        write_csv(out / "predict_scores.csv", scored)
    return reports, skipped, segmenter


def models_stamp(segmenter: Segmenter, options: VolumeOptions, convention: str) -> str:
    """What a mask depends on besides its case: the members' checkpoints (their bytes), mirroring, the clean-up, the
    label convention and brats2d's version."""
    digest = hashlib.sha256(f"{__version__}|{options.tta}|{segmenter.rule_note}|{convention}".encode())
    for member in segmenter.members:
        digest.update(file_sha256(member.run_dir / options.checkpoint).encode())
    return digest.hexdigest()


def case_stamp(made_by: str, case: Case) -> str:
    """The stamp a case's mask carries in its header: ``made_by`` and the case's input files (name, size, time of
    change; the seg is left out: scores are always of the current one)."""
    digest = hashlib.sha256(made_by.encode())
    for name, path in sorted(case.files.items()):
        if name != SEG and path.is_file():
            info = path.stat()
            digest.update(os.fsencode(path.name) + f":{name}:{info.st_size}:{info.st_mtime_ns}".encode())
    return f"brats2d {digest.hexdigest()[:32]}"


def _written_before(segmenter: Segmenter, case: Case, target: Path, stamp: str) -> list[dict[str, Any]]:
    """The report of a mask an earlier run wrote (scored again when the case has a seg), if these models, options
    and inputs made it; CaseError if not."""
    try:
        mask = nibabel().load(target)
        found = bytes(mask.header["descrip"].item()).split(b"\0")[0].decode("ascii", "replace")
    except Exception as error:  # nibabel raises several types for unreadable files
        raise CaseError(f"{target}: exists but cannot be read ({error}); delete it or use --overwrite") from None
    if found != stamp:
        raise CaseError(f"{target}: exists, written by other models, options or inputs (or an earlier brats2d); "
                        "--overwrite predicts it again, or give another --out")
    report: dict[str, Any] = {"case_id": case.case_id, "output": str(target), "written": "before"}
    if case.files[SEG].is_file():
        volumes = segmenter.read(case)
        try:
            labels = np.asanyarray(mask.dataobj)
        except (OSError, EOFError, ValueError) as error:
            raise CaseError(f"{target}: exists but cannot be read ({error}); delete it or use --overwrite") from None
        report |= score_in_input_space(labels, volumes, segmenter.config.task)
    return [report]


def _save_probabilities(path: Path, probabilities: np.ndarray, case: CaseVolumes, task: str) -> None:
    """``PROBABILITY_LAYOUT``, written whole or not at all."""
    in_input = np.stack([case.in_input_space(p) for p in probabilities])
    with atomic_output(path, suffix=".npz") as partial:
        np.savez_compressed(partial, probabilities=in_input.astype(np.float16), outputs=np.array(output_names(task)),
                            affine=case.reference.affine)

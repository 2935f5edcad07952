"""Segment new cases: every brain slice of each volume through a trained 2D model, written as a BraTS seg NIfTI in
the case's own space; cases with a seg are also scored as the BraTS 2023 challenge scores them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from builder.layout import find_cases
from trainer.cleanup import DEFAULT_CLEAN_UP, CleanUp
from trainer.config import FitConfig, FitError, resolve_device
from trainer.model import load_model
from trainer.reports import write_csv
from trainer.volumes import CaseError, Geometry, read_case, score, segment_case, write_labels


def predict_cases(run_dir: Path, case_dirs: list[Path], out: Path, device_name: str = "auto",
                  checkpoint: str = "best.pt", rule: CleanUp | None = DEFAULT_CLEAN_UP,
                  progress: bool = True) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Write ``<case>-seg.nii.gz`` for each case in ``out``; returns a report per written case (with the whole-volume
    scores when the case has a seg, also written to ``predict_scores.csv``) and a line per case skipped."""
    device = resolve_device(device_name)
    model, saved = load_model(run_dir / checkpoint, device)
    config = FitConfig.from_dict({**saved, "device": str(device)})
    geometry = Geometry.of(config)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FitError(f"{out}: cannot create the output folder ({error.strerror})") from None
    reports, skipped = [], []
    for case_dir in case_dirs:
        found = find_cases(case_dir) if case_dir.is_dir() else []
        if len(found) != 1:
            skipped.append({"case_id": case_dir.name,
                            "reason": f"{case_dir}: not one BraTS case folder (expected files like <case>-t1c.nii.gz)"})
            continue
        try:
            case = read_case(found[0], config.channels, geometry)
        except CaseError as error:
            skipped.append({"case_id": found[0].case_id, "reason": str(error)})
            continue
        labels, run = segment_case(model, config, case, device, rule, progress)
        target = out / f"{case.case_id}-seg.nii.gz"
        write_labels(labels, case, target)
        report: dict[str, Any] = {"case_id": case.case_id, "output": str(target), "brain_slices": run.brain_slices,
                                  "predict_seconds": round(run.seconds, 3),
                                  "slices_per_second": round(run.slices_per_second, 1)}
        if case.truth is not None:
            report |= score(labels, case, config.task)
        reports.append(report)
    scored = [r for r in reports if "score_seconds" in r]
    if scored:
        write_csv(out / "predict_scores.csv", scored)
    return reports, skipped

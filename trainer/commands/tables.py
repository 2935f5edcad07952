"""What the whole-volume and per-slice commands share: the cases of a split found on disk and read for scoring, and
the per-case tables their scores go into, with the definition they follow."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from builder.format import SEG
from builder.layout import Case, find_cases
from builder.progress import Progress
from trainer.data.artifact import Artifact
from trainer.errors import CaseError, CommandError
from trainer.inference.cases import CaseVolumes
from trainer.scoring.statistics import summarise

#: How the whole-volume scores are defined, written beside them.
VOLUME_DEFINITION = (
    "whole-volume scores per patient as BraTS 2023 computes them (rachitsaluja/BraTS-2023-Metrics, BraTS-GLI: "
    "lesion-wise Dice and HD95 with 3-voxel dilation, lesions of 50 mm^3 or less left out, missed and false-positive "
    "lesions scoring 0 and 374 mm; legacy Dice, HD95, sensitivity, specificity); HD95 on area-weighted surface "
    "elements (DeepMind's surface-distance, as the challenge's code); means over patients with 95% bootstrap "
    "intervals"
)
_SCORE_PREFIXES = ("dice", "hd95", "sensitivity", "specificity", "lesion")


@dataclass
class VolumeResults:
    """Per-case whole-volume scores of one approach, and the cases that could not be scored."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        ids = [row["case_id"] for row in self.rows]
        keys = [k for k in (self.rows[0] if self.rows else {}) if k.split("_")[0] in _SCORE_PREFIXES]
        return {key: summarise(ids, [row[key] for row in self.rows]) for key in keys}


def per_case(records: list[dict[str, float]], artifact: Artifact) -> list[dict[str, Any]]:
    """Average the per-slice records of each case (a case has several rows with --slices-per-case > 1)."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for record in records:
        groups[str(artifact.case_ids[int(record["row"])])].append(record)
    out = []
    for case, rows in sorted(groups.items()):
        keys = [k for k in rows[0] if k != "row"]
        out.append({"case_id": case, "slices": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return out


def cases_for(volumes_dir: Path, case_ids: list[str]) -> tuple[dict[str, Case], list[dict[str, str]]]:
    """The case folders under ``volumes_dir`` for ``case_ids``, and a line for each one that is not there."""
    if not volumes_dir.is_dir():
        raise CommandError(f"{volumes_dir}: no such folder (--volumes takes the BraTS folder the artifact was built "
                           "from)")
    try:
        found = {case.case_id: case for case in find_cases(volumes_dir)}
    except ValueError as error:
        raise CommandError(str(error)) from None
    missing = [{"case_id": c, "reason": f"not found under {volumes_dir}"} for c in case_ids if c not in found]
    return {c: found[c] for c in case_ids if c in found}, missing


def scorable(cases: dict[str, Case], read: Callable[[Case], CaseVolumes], skipped: list[dict[str, str]],
             desc: str) -> Iterator[CaseVolumes]:
    """Each case read (by ``read``) for scoring, with a progress bar; one without a seg, or that cannot be read or
    matched to the models' geometry, becomes a line in ``skipped`` instead."""
    for case_id, case in Progress(cases.items(), desc, len(cases), "case"):
        if not case.files[SEG].is_file():
            skipped.append({"case_id": case_id, "reason": f"no {case.files[SEG].name} to score against"})
            continue
        try:
            volumes = read(case)
        except CaseError as error:
            skipped.append({"case_id": case_id, "reason": str(error)})
            continue
        yield volumes

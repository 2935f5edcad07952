"""Evaluate a finished run on a split: per-slice metrics over the artifact's rows, or (``--volumes``) every case of
the split segmented over its whole volume and scored as the BraTS 2023 challenge scores it."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder.format import SEG
from builder.layout import Case, find_cases
from builder.progress import Progress
from trainer.cleanup import CleanUpTrial, clean_up, save_choice
from trainer.config import FitConfig, FitError, resolve_device
from trainer.data import Artifact, ArtifactError, make_loader
from trainer.ensemble import Segmenter, runs_in
from trainer.metrics import SegmentationMetrics, region_names
from trainer.model import load_model
from trainer.pipeline import Batches, autocast_dtype, dataset_for, open_artifact
from trainer.reports import write_csv, write_json
from trainer.statistics import summarise
from trainer.step import evaluate
from trainer.volumes import CaseError, CaseVolumes, score


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


def open_run(run_dir: Path, checkpoint: str, data: Path | None, device_name: str, other_data: bool
             ) -> tuple[torch.nn.Module, FitConfig, Artifact, str, torch.device]:
    """The run's model and configuration and its artifact (``data`` if given) as the run sees it (a fold run: its
    fold as the val split), held to the file the run trained on; returns them with how the file relates to the run
    (``Artifact.check_identity``) and the device."""
    device = resolve_device(device_name)
    model, saved = load_model(run_dir / checkpoint, device)
    config, artifact, data_check = on_data(FitConfig.from_dict({**saved, "device": str(device)}), data, other_data)
    return model, config, artifact, data_check, device


def on_data(config: FitConfig, data: Path | None, other_data: bool) -> tuple[FitConfig, Artifact, str]:
    """A run's configuration on its artifact (``data`` if given: a moved file), the artifact as the run sees it,
    and how it relates to the run (``Artifact.check_identity``: another file is refused unless ``other_data``)."""
    config = replace(config, data=str(data or config.data))
    artifact = open_artifact(config)
    return config, artifact, artifact.check_identity(config.data_id, config.data_sha256, other_data)


def evaluate_run(run_dir: Path, split: str = "test", data: Path | None = None, device_name: str = "auto",
                 checkpoint: str = "best.pt", workers: int = 0, other_data: bool = False) -> dict[str, Any]:
    """Write ``<split>_metrics.json`` and ``<split>_cases.csv`` in ``run_dir``; return the metrics."""
    model, config, artifact, data_check, device = open_run(run_dir, checkpoint, data, device_name, other_data)
    metrics = evaluate_rows(model, config, artifact, artifact.rows_of(split), device, workers)
    result = {"split": split, "checkpoint": checkpoint, "data": str(artifact.path), "data_check": data_check,
              "slices": len(artifact.splits[split]), **metrics.compute(),
              "note": "per-slice 2D metrics; not comparable to BraTS 2023 lesion-wise 3D leaderboard scores"}
    write_json(run_dir / f"{split}_metrics.json", result)
    write_csv(run_dir / f"{split}_cases.csv", per_case(metrics.per_slice or [], artifact))
    return result


def evaluate_rows(model: torch.nn.Module, config: FitConfig, artifact: Artifact, rows: np.ndarray,
                  device: torch.device, workers: int = 0,
                  probabilities: list[torch.Tensor] | None = None) -> SegmentationMetrics:
    """Per-slice-keeping metrics of ``model`` on the given rows, in one process (and its softmax maps if asked)."""
    loader = make_loader(dataset_for(config, artifact, rows), config.batch_size, False, workers, config.seed,
                         pin_memory=device.type == "cuda")
    batches = Batches(config, artifact.slice_shape, device)
    return evaluate(model, loader, batches, autocast_dtype(device, config.amp), True, probabilities)


#: How the whole-volume scores are defined, written beside them.
VOLUME_DEFINITION = (
    "whole-volume scores per patient as BraTS 2023 computes them (rachitsaluja/BraTS-2023-Metrics, BraTS-GLI: "
    "lesion-wise Dice and HD95 with 3-voxel dilation, lesions of 50 mm^3 or less left out, missed and false-positive "
    "lesions scoring 0 and 374 mm; legacy Dice, HD95, sensitivity, specificity); HD95 on area-weighted surface "
    "elements (DeepMind's surface-distance, as the challenge's code); means over patients with 95% bootstrap "
    "intervals"
)


@dataclass
class VolumeResults:
    """Per-case whole-volume scores of one approach, and the cases that could not be scored."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, dict[str, float]]:
        ids = [row["case_id"] for row in self.rows]
        keys = [k for k in (self.rows[0] if self.rows else {}) if k.split("_")[0] in _SCORE_PREFIXES]
        return {key: summarise(ids, [row[key] for row in self.rows]) for key in keys}


_SCORE_PREFIXES = ("dice", "hd95", "sensitivity", "specificity", "lesion")


def cases_for(volumes_dir: Path, case_ids: list[str]) -> tuple[dict[str, Case], list[dict[str, str]]]:
    """The case folders under ``volumes_dir`` for ``case_ids``, and a line for each one that is not there."""
    if not volumes_dir.is_dir():
        raise FitError(f"{volumes_dir}: no such folder (--volumes takes the BraTS folder the artifact was built from)")
    try:
        found = {case.case_id: case for case in find_cases(volumes_dir)}
    except ValueError as error:
        raise FitError(str(error)) from None
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


def check_unseen(segmenter: Segmenter, cases: list[str], split: str) -> None:
    """Refuse to score ``cases`` with an ensemble member that trained on one of them (another fold, or a run on
    another file): its scores would not be about unseen patients. The lead run is held to its own split."""
    if split == "train":
        return
    for member in segmenter.members[1:]:
        config = member.config
        try:
            artifact = open_artifact(config)
        except ArtifactError as error:
            raise FitError(f"{member.run_dir}: cannot check that it never trained on these {split} cases ({error})"
                           ) from None
        artifact.check_identity(config.data_id, config.data_sha256)
        seen = sorted(set(cases) & set(artifact.cases_of("train")))
        if seen:
            raise FitError(f"{member.run_dir}: trained on {seen[0]} (and {len(seen) - 1} more) of the {split} cases "
                           f"scored here; an ensemble scored on {split} must not have seen them (fold runs: score on "
                           "--split test, or each fold on its own val split)")


def volume_outputs(split: str, members: int, tta: bool) -> str:
    """The stem of a whole-volume report: ``<split>_volumes``, marked when it is of an ensemble or mirrored."""
    return f"{split}_volumes{'_ensemble' if members > 1 else ''}{'_tta' if tta else ''}"


def evaluate_volumes(run_dir: Path, volumes_dir: Path, split: str = "test", data: Path | None = None,
                     device_name: str = "auto", checkpoint: str = "best.pt", clean: bool = True,
                     limit: int | None = None, other_data: bool = False, ensemble: Sequence[Path] = (),
                     tta: bool = False, choose: bool = False) -> dict[str, Any]:
    """Segment every case of ``split`` over its whole volume (with the runs of ``ensemble`` averaged in, mirrored
    if ``tta``) and score it; writes ``<stem>.csv`` (a row per case) and ``<stem>.json`` (means over patients with
    95% bootstrap intervals) in the lead run (``run_dir``, or the first run in it). With ``choose``, the clean-up is
    chosen on these cases first (``trainer.cleanup.FAMILY``), stored in the lead run, and the scores are of the
    chosen rule."""
    if choose and split == "test":
        raise FitError("--choose-clean-up on the test split would tune on the patients being reported; choose on "
                       "--split val (or on out-of-fold predictions with `brats-train cross-validate`)")
    if choose and not clean:
        raise FitError("--choose-clean-up and --no-clean-up contradict each other; drop one")
    device = resolve_device(device_name)
    segmenter = Segmenter.load(runs_in([run_dir, *ensemble], checkpoint), checkpoint, device, tta, clean)
    config, artifact, data_check = on_data(segmenter.config, data, other_data)
    lead = segmenter.lead.run_dir  # RUN_DIR itself, or the first run in it when it is a folder of runs
    wanted = artifact.cases_of(split)
    chosen = wanted[:limit] if limit else wanted
    check_unseen(segmenter, chosen, split)
    cases, skipped = cases_for(volumes_dir, chosen)
    results = VolumeResults(skipped=skipped)
    trial = CleanUpTrial(region_names(config.task)) if choose else None
    kept: list[tuple[np.ndarray, CaseVolumes, dict[str, Any]]] = []
    for volumes in scorable(cases, segmenter.read, results.skipped, f"{split} volumes"):
        raw, labels, run = segmenter.segment(volumes, device, progress=False)
        about = {"case_id": volumes.case_id, "brain_slices": run.brain_slices, "predict_seconds": round(run.seconds, 3),
                 "slices_per_second": round(run.slices_per_second, 1)}
        if trial is not None:
            assert volumes.truth is not None
            trial.add(volumes.case_id, volumes.in_input_space(raw), volumes.in_input_space(volumes.truth),
                      volumes.input_spacing)
            kept.append((raw, replace(volumes, images=volumes.images[:0]), about))
        else:
            results.rows.append({**about, **score(labels, volumes, config.task)})
    if trial is not None and kept:
        rule = save_choice(lead, trial, f"the {split} split: {len(kept)} patients",
                           members=[str(m.run_dir) for m in segmenter.members], tta=tta)
        segmenter.rule, segmenter.rule_note = rule, f"the clean-up just chosen on these {split} cases: {rule.describe()}"
        results.rows = [{**about, **score(clean_up(raw, rule), volumes, config.task)} for raw, volumes, about in kept]
    if not results.rows:
        raise FitError(f"{volumes_dir}: no {split} case could be scored (first problem: "
                       f"{results.skipped[0]['reason'] if results.skipped else 'the split is empty'})")
    report = {
        "split": split, "checkpoint": checkpoint, "data": str(artifact.path), "data_sha256": config.data_sha256,
        "data_check": data_check, "volumes": str(volumes_dir), "models": segmenter.describe(),
        "cases_in_split": len(wanted), "cases_scored": len(results.rows),
        "subset": f"the first {limit} of {len(wanted)} cases (--limit)" if limit and limit < len(wanted) else None,
        "clean_up": asdict(segmenter.rule) if segmenter.rule is not None else None, "clean_up_note": segmenter.rule_note,
        "definition": VOLUME_DEFINITION, "metrics": results.summary(), "skipped": results.skipped,
    }
    stem = volume_outputs(split, len(segmenter.members), tta)
    write_csv(lead / f"{stem}.csv", results.rows)
    write_json(lead / f"{stem}.json", report)
    return {**report, "outputs": [str(lead / f"{stem}.csv"), str(lead / f"{stem}.json")]}

"""Evaluate a finished run on a split: per-slice metrics over the artifact's rows, or (``--volumes``) every case of
the split segmented over its whole volume and scored as the BraTS 2023 challenge scores it."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from builder import __version__
from builder.remote import run_data
from trainer.commands.report import REPORT_MODALITY, CaseViews, reliability_png, volumes_ml, write_report
from trainer.commands.tables import VOLUME_DEFINITION, VolumeResults, cases_for, per_case, scorable
from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.data.inputs import NetworkInputs, dataset_for, open_artifact
from trainer.data.loading import make_loader
from trainer.device import autocast_dtype, resolve_device
from trainer.errors import ArtifactError, CommandError
from trainer.inference.cases import CaseVolumes, Geometry, score
from trainer.inference.ensemble import Member, Segmenter, runs_in
from trainer.inference.options import VolumeOptions
from trainer.outputs import atomic_output, write_csv, write_json
from trainer.scoring.brats import region_names
from trainer.scoring.calibration import CALIBRATION_FILE, DIAGRAM_FILE, VoxelSample, save_calibration
from trainer.scoring.cleanup import CleanUpTrial, clean_up, save_choice
from trainer.scoring.uncertainty import dice_by_uncertainty
from trainer.training.metrics import SegmentationMetrics
from trainer.training.step import evaluation_pass


def on_data(config: FitConfig, data: Path | None, other_data: bool) -> tuple[FitConfig, Artifact, str]:
    """A run's configuration on its artifact (``data`` if given: a moved file), the artifact as the run sees it,
    and how it relates to the run (``Artifact.check_identity``: another file is refused unless ``other_data``)."""
    config = replace(config, data=str(data or run_data(config.data, config.data_url)))
    artifact = open_artifact(config)
    return config, artifact, artifact.check_identity(config.data_id, config.data_sha256, other_data)


def evaluate_run(run_dir: Path, split: str = "test", data: Path | None = None,
                 options: VolumeOptions = VolumeOptions(), workers: int = 0, other_data: bool = False) -> dict[str, Any]:
    """Per-slice metrics of the run's ``options.checkpoint`` on its artifact's ``split`` (``data`` if the file moved):
    write ``<split>_metrics.json`` and ``<split>_cases.csv`` in ``run_dir``; return the metrics."""
    member = Member.load(run_dir, options.checkpoint, resolve_device(options.device))
    config, artifact, data_check = on_data(member.config, data, other_data)
    metrics = evaluate_rows(member.model, config, artifact, artifact.rows_of(split), workers)
    result = {"split": split, "checkpoint": options.checkpoint, "data": str(artifact.path), "data_check": data_check,
              "slices": len(artifact.splits[split]), **metrics.compute(),
              "note": "per-slice 2D metrics; not comparable to BraTS 2023 lesion-wise 3D leaderboard scores"}
    write_json(run_dir / f"{split}_metrics.json", result)
    write_csv(run_dir / f"{split}_cases.csv", per_case(metrics.per_slice or [], artifact))
    return result


def evaluate_rows(model: torch.nn.Module, config: FitConfig, artifact: Artifact, rows: np.ndarray, workers: int = 0,
                  probabilities: list[torch.Tensor] | None = None) -> SegmentationMetrics:
    """Per-slice-keeping metrics of ``model`` (on ``config.device``) on the given rows, in one process (and its
    softmax maps if asked)."""
    device = resolve_device(config.device)
    loader = make_loader(dataset_for(config, artifact, rows), config.batch_size, False, workers, config.seed,
                         pin_memory=device.type == "cuda")
    return evaluation_pass(model, loader, NetworkInputs(config, device), autocast_dtype(device, config.amp), True,
                           probabilities)


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
            raise CommandError(f"{member.run_dir}: cannot check that it never trained on these {split} cases ({error})"
                           ) from None
        artifact.check_identity(config.data_id, config.data_sha256)
        seen = sorted(set(cases) & set(artifact.cases_of("train")))
        if seen:
            raise CommandError(f"{member.run_dir}: trained on {seen[0]} (and {len(seen) - 1} more) of the {split} cases "
                           f"scored here; an ensemble scored on {split} must not have seen them (fold runs: score on "
                           "--split test, or each fold on its own val split)")


def volume_outputs(split: str, members: int, tta: bool) -> str:
    """The stem of a whole-volume report: ``<split>_volumes``, marked when it is of an ensemble or mirrored."""
    return f"{split}_volumes{'_ensemble' if members > 1 else ''}{'_tta' if tta else ''}"


def evaluate_volumes(run_dir: Path, volumes_dir: Path, split: str = "test", data: Path | None = None,
                     options: VolumeOptions = VolumeOptions(), limit: int | None = None, other_data: bool = False,
                     ensemble: Sequence[Path] = (), choose: bool = False, with_report: bool = False,
                     calibrate: bool = False) -> dict[str, Any]:
    """Segment every case of ``split`` over its whole volume (with the runs of ``ensemble`` averaged in, as
    ``options`` say: mirrored, cleaned up) and score it; writes ``<stem>.csv`` (a row per case) and ``<stem>.json`` (means over patients with
    95% bootstrap intervals) in the lead run (``run_dir``, or the first run in it). With ``choose``, the clean-up is
    chosen on these cases first (``trainer.scoring.cleanup.REGION_FAMILY``), stored in the lead run, and the scores are of the
    chosen rule. With ``with_report``, also ``<stem>.html`` (trainer.commands.report), its cost in the JSON. With
    ``calibrate`` (val only), the temperatures are fitted on these cases' voxels inside the brain and stored in the
    lead run (calibration.json, calibration.png), where later evaluate, predict and ensembles of these members find
    them."""
    if calibrate and split != "val":
        raise CommandError(f"--calibrate fits on the patients it is given: on the {split} split it would tune on the "
                           "patients being reported; use --split val")
    if choose and with_report:
        raise CommandError("--report shows the masks of one clean-up: choose it first (--choose-clean-up on the val "
                           "split), then evaluate with --report")
    if choose and split == "test":
        raise CommandError("--choose-clean-up on the test split would tune on the patients being reported; choose on "
                       "--split val (or on out-of-fold predictions with `brats-train cross-validate`)")
    if choose and not options.clean:
        raise CommandError("--choose-clean-up and --no-clean-up contradict each other; drop one")
    segmenter = Segmenter.load(runs_in([run_dir, *ensemble], options.checkpoint), options)
    if calibrate:
        segmenter.calibration = None  # fitted on the network's own probabilities
    config, artifact, data_check = on_data(segmenter.config, data, other_data)
    lead = segmenter.lead.run_dir  # RUN_DIR itself, or the first run in it when it is a folder of runs
    wanted = artifact.cases_of(split)
    chosen = wanted[:limit] if limit else wanted
    check_unseen(segmenter, chosen, split)
    cases, skipped = cases_for(volumes_dir, chosen)
    results = VolumeResults(skipped=skipped)
    trial = CleanUpTrial(region_names(config.task)) if choose else None
    kept: list[tuple[np.ndarray, np.ndarray, CaseVolumes, dict[str, Any]]] = []  # raw labels, confidence, ...
    views: dict[str, CaseViews] = {}
    voxels = VoxelSample(config.task)
    started, reporting = time.perf_counter(), 0.0
    for volumes in scorable(cases, segmenter.read, results.skipped, f"{split} volumes"):
        done = segmenter.segment(volumes, progress=False, with_uncertainty=with_report)
        if calibrate:
            assert volumes.truth is not None
            voxels.add(done.result.probabilities, volumes.truth, volumes.images.any(0))
        about = {"case_id": volumes.case_id, "brain_slices": done.result.brain_slices,
                 "predict_seconds": round(done.result.seconds, 3),
                 "slices_per_second": round(done.result.slices_per_second, 1)}
        if trial is not None:
            assert volumes.truth is not None
            trial.add(volumes.case_id, volumes.in_input_space(done.raw), volumes.in_input_space(volumes.truth),
                      volumes.input_spacing, np.stack([volumes.in_input_space(p) for p in done.confidence]))
            kept.append((done.raw, done.confidence, replace(volumes, images=volumes.images[:0]), about))
        else:
            results.rows.append({**about, **score(done.labels, volumes, config.task)})
        if with_report:
            begun = time.perf_counter()
            assert volumes.truth is not None
            shown = volumes.channels.index(REPORT_MODALITY) if REPORT_MODALITY in volumes.channels else 0
            views[volumes.case_id] = CaseViews.of(volumes.case_id, volumes.images[shown], volumes.truth, done.labels,
                                                  done.uncertainty, Geometry.of(config).axis_codes)
            results.rows[-1] |= volumes_ml(volumes.truth, done.labels, volumes.spacing)
            assert done.uncertainty is not None
            results.rows[-1] |= dice_by_uncertainty(done.labels, volumes.truth, done.uncertainty,
                                                    region_names(config.task))
            reporting += time.perf_counter() - begun
    if trial is not None and kept:
        rule = save_choice(lead, trial, f"the {split} split: {len(kept)} patients",
                           members=[str(m.run_dir) for m in segmenter.members], tta=options.tta)
        segmenter.rule, segmenter.rule_note = rule, f"the clean-up just chosen on these {split} cases: {rule.describe()}"
        results.rows = [{**about, **score(clean_up(raw, rule, confidence), volumes, config.task)}
                        for raw, confidence, volumes, about in kept]
    if not results.rows:
        raise CommandError(f"{volumes_dir}: no {split} case could be scored (first problem: "
                       f"{results.skipped[0]['reason'] if results.skipped else 'the split is empty'})")
    report = {
        "split": split, "checkpoint": options.checkpoint, "data": str(artifact.path), "data_sha256": config.data_sha256,
        "data_check": data_check, "volumes": str(volumes_dir), "models": segmenter.describe(),
        "cases_in_split": len(wanted), "cases_scored": len(results.rows),
        "subset": f"the first {limit} of {len(wanted)} cases (--limit)" if limit and limit < len(wanted) else None,
        "clean_up": asdict(segmenter.rule) if segmenter.rule is not None else None, "clean_up_note": segmenter.rule_note,
        "definition": VOLUME_DEFINITION, "metrics": results.summary(), "skipped": results.skipped,
    }
    stem = volume_outputs(split, len(segmenter.members), options.tta)
    outputs = [lead / f"{stem}.csv", lead / f"{stem}.json"]
    if calibrate:
        try:
            calibration, curves = voxels.calibrate(f"the {split} split: {len(results.rows)} patients")
        except ValueError as error:
            raise CommandError(f"{lead}: {error} on these {len(results.rows)} patients; calibrate on more validation "
                               "patients, or leave the probabilities as they are") from None
        members = [str(m.run_dir) for m in segmenter.members]
        save_calibration(lead, calibration, curves, members=members, tta=options.tta)
        with atomic_output(lead / DIAGRAM_FILE, suffix=".png") as partial:
            partial.write_bytes(reliability_png(curves))
        segmenter.calibration = calibration
        report["calibration"] = calibration.describe()
        outputs += [lead / CALIBRATION_FILE, lead / DIAGRAM_FILE]
    if with_report:
        begun = time.perf_counter()
        settings = {"run": lead, "models": report["models"], "checkpoint": options.checkpoint, "split": split,
                    "data": report["data"], "data SHA-256": config.data_sha256, "data identity": data_check,
                    "build id": config.data_id, "volumes": volumes_dir, "mirroring": options.tta,
                    "clean-up": segmenter.rule_note, "brats2d": __version__}
        if segmenter.calibration is not None:
            settings["calibration"] = segmenter.calibration.describe()
        diagram = lead / DIAGRAM_FILE  # this call's fit, or the one the segmenter loaded
        diagram_png = diagram.read_bytes() if segmenter.calibration is not None and diagram.is_file() else None
        write_report(lead / f"{stem}.html", f"{lead.name}: {len(results.rows)} whole {split} volumes", settings,
                     results.rows, views, VOLUME_DEFINITION, diagram_png)
        reporting += time.perf_counter() - begun
        report["report_seconds"] = round(reporting, 2)
        report["evaluation_seconds"] = round(time.perf_counter() - started - reporting, 2)
        outputs.append(lead / f"{stem}.html")
    write_csv(lead / f"{stem}.csv", results.rows)
    write_json(lead / f"{stem}.json", report)
    return {**report, "outputs": [str(p) for p in outputs]}

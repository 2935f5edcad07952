"""Cross-validation, as nnU-Net users know it: K fold runs over the train and val patients (the test patients never
enter), their out-of-fold predictions on whole volumes, one table of out-of-fold scores, and the clean-up chosen on
out-of-fold predictions. The fold runs form an ensemble for test patients and new cases (``predict OUT ...`` or
``evaluate OUT/fold-0 --ensemble OUT``).

    OUT/fold-<k>/            each fold's run (val split = the fold's held-out patients)
    OUT/oof/<case-id>.npz    each patient's raw out-of-fold labels, as predicted by the run that never saw it
    OUT/oof_volumes.csv      a row per patient: its scores, its fold, the clean-up it was scored with
    OUT/oof_volumes.json     means over patients with 95% intervals, and what was chosen
    OUT/oof.md               the table
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from builder import __version__
from builder.layout import Case
from builder.progress import Progress
from trainer.commands.report import REPORT_MODALITY, CaseViews, volumes_ml, write_report
from trainer.commands.tables import VOLUME_DEFINITION, VolumeResults, cases_for, scorable
from trainer.config import FitConfig
from trainer.data.inputs import open_artifact
from trainer.errors import CommandError
from trainer.inference.cases import nibabel
from trainer.inference.ensemble import Segmenter
from trainer.inference.options import VolumeOptions
from trainer.outputs import atomic_output, write_csv, write_json, write_text
from trainer.scoring.brats import region_names, score_case
from trainer.scoring.cleanup import DEFAULT_CLEAN_UP, CleanUp, CleanUpTrial, clean_up, rule_for, save_choice
from trainer.scoring.statistics import INTERVAL, MIN_PATIENTS
from trainer.training.loop import fit_each


def cross_validate(base: FitConfig, folds: int, out: Path, reuse: bool = False, volumes_dir: Path | None = None,
                   options: VolumeOptions = VolumeOptions(), choose: bool = False, with_report: bool = False
                   ) -> dict[str, Any]:
    """Train (or keep, with ``reuse``) the ``folds`` fold runs of ``base`` in ``out``; with ``volumes_dir``, segment
    every patient with the run that held it out, score the out-of-fold predictions and (``choose``) choose the
    clean-up on them: each fold is scored with the rule chosen on the other folds' patients, and every fold run
    stores the rule chosen on all of them (for test patients and new cases). Volumes are segmented as ``options``
    say (mirrored or not, cleaned up or not), on ``base.device`` where the runs trained. With ``with_report``, also
    oof_volumes.html (trainer.commands.report; each patient's views drawn from its FLAIR as given)."""
    if choose and volumes_dir is None:
        raise CommandError("--choose-clean-up chooses on out-of-fold predictions of whole volumes: give --volumes DIR")
    if with_report and volumes_dir is None:
        raise CommandError("--report shows out-of-fold predictions of whole volumes: give --volumes DIR")
    configs = {f"fold-{k}": replace(base, folds=folds, fold=k, name=f"fold-{k}") for k in range(folds)}
    artifact = open_artifact(configs["fold-0"])  # checks the folds: none may be empty
    for config in list(configs.values())[1:]:
        open_artifact(config)
    runs = fit_each(configs, artifact, out, reuse)
    if volumes_dir is None:
        return {"runs": [str(run) for run in runs.values()]}
    raw_labels = VolumeOptions(options.tta, clean=False, device=base.device)  # each rule is applied when scoring
    regions = region_names(base.task)
    trial = CleanUpTrial(regions) if choose else None
    predicted: list[dict[str, Any]] = []  # per patient: fold, case, where its raw labels are
    skipped: list[dict[str, str]] = []
    sources: dict[str, Case] = {}
    for k, run_dir in enumerate(runs.values()):
        segmenter = Segmenter.load([run_dir], raw_labels)
        held_out = open_artifact(segmenter.config).cases_of("val")
        cases, missing = cases_for(volumes_dir, held_out)
        sources |= cases
        skipped += missing
        for volumes in scorable(cases, segmenter.read, skipped, f"fold {k} held-out volumes"):
            done = segmenter.segment(volumes, progress=False)
            labels, truth = volumes.in_input_space(done.raw), volumes.in_input_space(volumes.truth)
            confidence = np.stack([volumes.in_input_space(p) for p in done.confidence])
            path = out / "oof" / f"{volumes.case_id}.npz"
            path.parent.mkdir(exist_ok=True)
            with atomic_output(path, suffix=".npz") as partial:
                np.savez_compressed(partial, labels=labels, truth=truth, spacing=volumes.input_spacing,
                                    confidence=confidence)
            if trial is not None:
                trial.add(volumes.case_id, labels, truth, volumes.input_spacing, confidence)
            predicted.append({"fold": k, "case_id": volumes.case_id, "path": path, "seconds": done.result.seconds})
    if not predicted:
        raise CommandError(f"{volumes_dir}: no held-out patient could be segmented (first problem: "
                       f"{skipped[0]['reason'] if skipped else 'none found'})")
    rules = _rules(trial, predicted, folds, options.clean)
    results = VolumeResults(skipped=skipped)
    views: dict[str, CaseViews] = {}
    for item in Progress(predicted, "scoring out-of-fold volumes", unit="case"):
        saved = np.load(item["path"])
        rule = rules[item["fold"]]
        labels = saved["labels"] if rule is None else clean_up(saved["labels"], rule, saved["confidence"])
        scores = score_case(labels, saved["truth"], tuple(saved["spacing"]), regions)
        results.rows.append({"case_id": item["case_id"], "fold": item["fold"],
                             "clean_up": "none" if rule is None else rule.describe(),
                             "predict_seconds": round(item["seconds"], 3), **scores})
        if with_report:
            case = sources[item["case_id"]]
            image = nibabel().load(case.files[REPORT_MODALITY])  # as given: the space the saved labels are in
            views[item["case_id"]] = CaseViews.of(item["case_id"], np.asanyarray(image.dataobj), saved["truth"],
                                                  labels, None, nibabel().aff2axcodes(image.affine))
            results.rows[-1] |= volumes_ml(saved["truth"], labels, tuple(saved["spacing"]))
    stored = None
    if trial is not None:
        for run_dir in runs.values():
            stored = save_choice(run_dir, trial, f"the out-of-fold predictions of {folds} folds: "
                                 f"{len(trial.scores)} patients", members=[str(run_dir)], tta=options.tta)
    report = {"folds": folds, "runs": [str(run) for run in runs.values()], "volumes": str(volumes_dir),
              "patients_scored": len(results.rows), "test_time_mirroring": options.tta,
              "clean_up": ("chosen per fold on the other folds' out-of-fold predictions" if trial is not None
                           else _unchosen(options.clean)),
              "clean_up_stored": stored.describe() if stored is not None else None,
              "definition": VOLUME_DEFINITION, "metrics": results.summary(), "skipped": skipped}
    write_csv(out / "oof_volumes.csv", results.rows)
    write_json(out / "oof_volumes.json", report)
    write_text(out / "oof.md", _table(report, regions))
    if with_report:
        settings = {"fold runs": ", ".join(report["runs"]), "volumes": volumes_dir, "mirroring": options.tta,
                    "clean-up": report["clean_up"], "data": base.data, "brats2d": __version__}
        write_report(out / "oof_volumes.html", f"{out.name}: {len(results.rows)} out-of-fold patients, {folds} folds",
                     settings, results.rows, views, VOLUME_DEFINITION)
    return report


def _rules(trial: CleanUpTrial | None, predicted: list[dict[str, Any]], folds: int, clean: bool
           ) -> dict[int, CleanUp | None]:
    """The clean-up each fold is scored with: chosen on the other folds' patients (never on its own), else the
    default (or none)."""
    if trial is None:
        return {k: rule_for(clean)[0] for k in range(folds)}
    chosen = {}
    for k in range(folds):
        others = CleanUpTrial(trial.regions, trial.rules, trial.et_counts,
                              {p["case_id"]: trial.scores[p["case_id"]] for p in predicted if p["fold"] != k})
        chosen[k] = others.best()[0] if others.scores else DEFAULT_CLEAN_UP
    return chosen


def _unchosen(clean: bool) -> str:
    """The report's words for the rule every fold was scored with when none was chosen."""
    rule, _ = rule_for(clean)
    return "none" if rule is None else f"the default: {rule.describe()}"


def _table(report: dict[str, Any], regions: tuple[str, ...]) -> str:
    metrics = report["metrics"]

    def cell(key: str, digits: int = 3) -> str:
        m = metrics[key]
        interval = "" if m["ci_low"] is None else f" [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"
        return f"{m['mean']:.{digits}f}{interval}"

    lines = [f"# Out-of-fold whole-volume scores ({report['folds']} folds, {report['patients_scored']} patients)", "",
             "| region | lesion-wise Dice | lesion-wise HD95 (mm) | Dice | HD95 (mm) | false lesions per case |",
             "|---|---|---|---|---|---|"]
    for region in regions:
        lines.append(f"| {region} | {cell(f'lesion_dice_{region}')} | {cell(f'lesion_hd95_{region}', 1)} | "
                     f"{cell(f'dice_{region}')} | {cell(f'hd95_{region}', 1)} | "
                     f"{metrics[f'lesion_fp_{region}']['mean']:.2f} |")
    lines += ["", f"Each patient segmented by the fold run that never saw it; clean-up: {report['clean_up']}. "
              f"Intervals: {INTERVAL} (none below {MIN_PATIENTS} patients). {VOLUME_DEFINITION}."]
    if report["clean_up_stored"]:
        lines.append(f"Stored in every fold run for new cases: {report['clean_up_stored']}.")
    lines += [f"Skipped {s['case_id']}: {s['reason']}" for s in report["skipped"]]
    return "\n".join(lines) + "\n"

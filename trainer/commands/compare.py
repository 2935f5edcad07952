"""Which modality segments best? Train the five approaches alike, fuse the four single-modality models, and
score all seven on the test split with per-case bootstrap intervals: per slice on the artifact's rows and, with
``--volumes``, per patient on whole volumes as BraTS 2023 scores them, with paired differences from the best."""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from builder import __version__
from builder.format import MODALITIES
from builder.remote import open_h5
from trainer.commands.evaluate import evaluate_rows
from trainer.commands.report import REPORT_MODALITY, CaseViews, volumes_ml, write_report
from trainer.commands.tables import VOLUME_DEFINITION, VolumeResults, cases_for, per_case, scorable
from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.device import resolve_device
from trainer.errors import CommandError
from trainer.inference.cases import CaseVolumes, Geometry, labels_of, read_case, score
from trainer.inference.ensemble import Member, Segmenter
from trainer.inference.fusion import mean_probabilities, vote
from trainer.inference.options import VolumeOptions
from trainer.outputs import write_csv, write_json, write_text
from trainer.scoring.cleanup import CleanUp, clean_up, rule_for
from trainer.scoring.statistics import INTERVAL, MIN_PATIENTS, NO_INTERVAL, bootstrap_interval, paired_difference
from trainer.tasks import classes, encode, label_classes
from trainer.training.loop import fit_each
from trainer.training.metrics import SegmentationMetrics

APPROACHES = (*MODALITIES, "all")
LABELS = {"t1n": "T1 native", "t1c": "T1 contrast", "t2w": "T2", "t2f": "FLAIR", "all": "early fusion (4 channels)",
          "vote": "late fusion, vote", "mean": "late fusion, mean softmax"}
#: The whole-volume score that ranks the approaches: BraTS 2023 lesion-wise Dice, averaged over the regions.
RANKING = "lesion_dice"
RANKED_BY = ("Approaches are ranked by lesion-wise Dice averaged over the regions; the difference from the best is "
             "paired, over the same patients.")


@dataclass
class Outcome:
    """One approach's test predictions and scores."""

    name: str
    probabilities: torch.Tensor  # (N, outputs, H, W) float16 on the CPU (``trainer.tasks``)
    metrics: dict[str, float]
    cases: list[dict]
    parameters: int | None = None
    train_seconds: float | None = None
    best_val_dice: float | None = None


def _predict(member: Member, artifact: Artifact, rows: np.ndarray, workers: int) -> tuple:
    """Test-split softmax maps (float16, CPU) and per-slice metrics of one approach's model."""
    chunks: list[torch.Tensor] = []
    metrics = evaluate_rows(member.model, replace(member.config, data=str(artifact.path)), artifact, rows, workers,
                            chunks)
    return torch.cat(chunks), metrics


def _score_fused(name: str, probabilities: torch.Tensor, targets: torch.Tensor, rows: np.ndarray,
                 config: FitConfig, artifact: Artifact) -> Outcome:
    metrics = SegmentationMetrics(config.task, torch.device("cpu"), keep_per_slice=True)
    for start in range(0, len(rows), 16):
        stop = start + 16
        metrics.update_probabilities(probabilities[start:stop], targets[start:stop], None,
                                     torch.from_numpy(rows[start:stop]))
    result = metrics.compute()
    result["loss"] = float("nan")  # a vote has no loss; the soft mean is not what any model minimised
    return Outcome(name, probabilities, result, per_case(metrics.per_slice or [], artifact))


def _run_summary(run_dir: Path) -> tuple[float, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return sum(float(r["seconds"]) for r in rows), max(float(r["val_dice_mean"]) for r in rows)


def compare(base: FitConfig, out: Path, reuse: bool = False, workers: int = 0, volumes_dir: Path | None = None,
            volume_cases: int | None = None, options: VolumeOptions = VolumeOptions(), with_report: bool = False
            ) -> Path:
    """Train, fuse, score; writes comparison.{csv,md,png,gif} and comparison_cases.csv in ``out`` (and, with
    ``volumes_dir``, comparison_volumes.{csv,json} with a whole-volume table in comparison.md, mirrored and cleaned
    up as ``options`` say, on ``base.device`` where the runs trained; with ``with_report`` also
    comparison_volumes.html: trainer.commands.report, every approach's masks side by side)."""
    if with_report and volumes_dir is None:
        raise CommandError("--report shows the approaches' masks of whole volumes: give --volumes DIR")
    out.mkdir(parents=True, exist_ok=True)
    artifact = Artifact.open(base.data)
    artifact.require(MODALITIES)
    artifact.rows_of("val")
    rows = artifact.rows_of("test")
    started = time.perf_counter()
    runs = fit_each({approach: replace(base, modality=approach, name=approach) for approach in APPROACHES}, artifact,
                    out, reuse)
    device = resolve_device(base.device)
    with open_h5(artifact.path) as f:
        seg = np.stack([f["seg"][int(r)] for r in rows])
    members = {approach: Member.load(run_dir, "best.pt", device) for approach, run_dir in runs.items()}  # once each
    outcomes: dict[str, Outcome] = {}
    for approach, member in members.items():
        probabilities, metrics = _predict(member, artifact, rows, workers)
        seconds, best_val = _run_summary(member.run_dir)
        outcomes[approach] = Outcome(approach, probabilities, metrics.compute(), per_case(metrics.per_slice or [], artifact),
                                     sum(p.numel() for p in member.model.parameters()), seconds, best_val)
    config = members["all"].config
    targets = torch.from_numpy(seg > 0 if config.task == "binary" else seg).long()
    singles = [outcomes[m] for m in MODALITIES]
    best = int(np.argmax([o.best_val_dice for o in singles]))
    labels = [classes(o.probabilities.float(), config.task) for o in singles]
    voted = encode(vote(labels, best, label_classes(config.task)), config.task)
    outcomes["vote"] = _score_fused("vote", voted, targets, rows, config, artifact)
    outcomes["mean"] = _score_fused("mean", mean_probabilities([o.probabilities for o in singles]), targets, rows,
                                    config, artifact)
    table = _write_tables(outcomes, out, MODALITIES[best], len(rows))
    if volumes_dir is not None:
        table += "\n" + compare_volumes(members, artifact, volumes_dir, best, out, volume_cases, options, with_report)
    write_text(out / "comparison.md", table)
    from trainer.training.plots import plot_comparison

    plot_comparison(artifact, rows, seg, {k: o.probabilities for k, o in outcomes.items()}, config.task, out, LABELS)
    print(table)
    print(f"compared {len(outcomes)} approaches in {time.perf_counter() - started:.0f} s: {out / 'comparison.md'}")
    return out / "comparison.md"


def _write_tables(outcomes: dict[str, Outcome], out: Path, best_single: str, slices: int) -> str:
    columns = ("loss", "pixel_accuracy", "mean_iou", "mse", "dice_WT", "dice_TC", "dice_ET", "dice_mean")
    records = []
    for name, o in outcomes.items():
        case_means = np.array([np.mean([c[k] for k in c if k.startswith("dice_")]) for c in o.cases])
        low, high = bootstrap_interval(case_means)
        fused = name in ("vote", "mean")
        records.append({"approach": name, "description": LABELS[name],
                        **{c: (None if fused and c == "loss" else o.metrics.get(c)) for c in columns},
                        **({"loss_note": "a vote has no loss; the mean of softmax maps minimised none"} if fused else {}),
                        "dice_mean_ci_low": low, "dice_mean_ci_high": high,
                        "dice_mean_interval": INTERVAL if low is not None else NO_INTERVAL,
                        "parameters": o.parameters or "",
                        "train_seconds": round(o.train_seconds, 1) if o.train_seconds is not None else ""})
    write_csv(out / "comparison.csv", records)
    write_csv(out / "comparison_cases.csv", [{"approach": name, **case} for name, o in outcomes.items() for case in o.cases])
    lines = [
        f"# Which modality segments best? ({slices} test slices)",
        "",
        "| approach | loss | pixel acc. | mIoU | MSE | Dice WT | Dice TC | Dice ET | Dice mean [95% CI] | params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        loss = "" if r["loss"] is None else f"{r['loss']:.3f}"
        dice = {k: ("" if r.get(k) is None else f"{r[k]:.3f}") for k in ("dice_WT", "dice_TC", "dice_ET")}
        params = f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else ""
        interval = ("" if r["dice_mean_ci_low"] is None
                    else f" [{r['dice_mean_ci_low']:.3f}, {r['dice_mean_ci_high']:.3f}]")
        lines.append(
            f"| {r['description']} | {loss} | {r['pixel_accuracy']:.4f} | {r['mean_iou']:.3f} | {r['mse']:.4f} | "
            f"{dice['dice_WT']} | {dice['dice_TC']} | {dice['dice_ET']} | "
            f"{r['dice_mean']:.3f}{interval} | {params} | {r['train_seconds']} |"
        )
    lines += [
        "",
        f"Late fusion by vote: the four single-modality models vote per pixel; {LABELS[best_single]} (best validation "
        "mean Dice) counts twice and wins ties. Late fusion by mean: argmax of the mean of the four softmax maps.",
        "Dice is per slice, averaged over slices (a region absent from both prediction and truth scores 1); the "
        f"interval is a {INTERVAL.replace('patients', 'test cases')} (none below {MIN_PATIENTS} cases). These 2D "
        "per-slice scores are not comparable to the BraTS 2023 leaderboard's lesion-wise 3D Dice.",
    ]
    write_json(out / "comparison.json", records)
    return "\n".join(lines) + "\n"


def _approach_volumes(segmenters: dict[str, Segmenter], volumes: CaseVolumes, best: int, task: str
                      ) -> dict[str, np.ndarray]:
    """Labels of all seven approaches for one case: five models (each fed its own channels), then vote and mean
    fused voxel by voxel."""
    probabilities = {name: s.probabilities(volumes, progress=False).probabilities for name, s in segmenters.items()}
    labels = {name: labels_of(p, task) for name, p in probabilities.items()}
    singles = [classes(torch.from_numpy(probabilities[m])[None], task)[0] for m in MODALITIES]
    voted = vote(singles, best, label_classes(task))
    labels["vote"] = labels_of(encode(voted[None], task)[0].numpy(), task)
    mean = mean_probabilities([torch.from_numpy(probabilities[m]) for m in MODALITIES])
    labels["mean"] = labels_of(mean.numpy(), task)
    return labels


def compare_volumes(members: dict[str, Member], artifact: Artifact, volumes_dir: Path, best: int, out: Path,
                    limit: int | None, options: VolumeOptions, with_report: bool = False) -> str:
    """Score every approach on whole test volumes (each case's four modalities read once, the fused approaches
    cleaned up like the others); write comparison_volumes.{csv,json} (and, ``with_report``, .html); return a
    Markdown table."""
    config = members["all"].config
    device = resolve_device(config.device)
    segmenters = {name: Segmenter.of([member], device, options.tta, clean=False) for name, member in members.items()}
    rule, _ = rule_for(options.clean)
    wanted = artifact.cases_of("test")
    chosen = wanted[:limit] if limit else wanted
    cases, skipped = cases_for(volumes_dir, chosen)
    results = {name: VolumeResults() for name in LABELS}
    geometry = Geometry.of(config)
    views: dict[str, CaseViews] = {}
    started, reporting = time.perf_counter(), 0.0
    for volumes in scorable(cases, lambda case: read_case(case, MODALITIES, geometry), skipped, "test volumes"):
        masks = {name: labels if rule is None else clean_up(labels, rule)
                 for name, labels in _approach_volumes(segmenters, volumes, best, config.task).items()}
        for name, labels in masks.items():
            results[name].rows.append({"case_id": volumes.case_id, **score(labels, volumes, config.task)})
        if with_report:
            begun = time.perf_counter()
            assert volumes.truth is not None
            for name, labels in masks.items():
                results[name].rows[-1] |= volumes_ml(volumes.truth, labels, volumes.spacing)
            views[volumes.case_id] = CaseViews.compared(volumes.case_id,
                                                        volumes.images[MODALITIES.index(REPORT_MODALITY)],
                                                        volumes.truth, masks, geometry.axis_codes)
            reporting += time.perf_counter() - begun
    if not any(r.rows for r in results.values()):
        raise CommandError(f"{volumes_dir}: no test case could be scored (first problem: "
                       f"{skipped[0]['reason'] if skipped else 'the test split is empty'})")
    regions = [k.split("_")[-1] for k in results["all"].rows[0] if k.startswith("dice_")]
    ranking = {name: np.mean([[row[f"{RANKING}_{r}"] for r in regions] for row in res.rows], axis=1)
               for name, res in results.items()}
    leader = max(ranking, key=lambda name: ranking[name].mean())
    ids = [row["case_id"] for row in results[leader].rows]
    summary = {name: {"metrics": res.summary(), f"{RANKING}_mean_minus_{leader}": paired_difference(ids, ranking[name], ranking[leader])}
               for name, res in results.items()}
    rows = [{"approach": name, **row} for name, res in results.items() for row in res.rows]
    subset = f"the first {len(chosen)} of {len(wanted)} test cases" if len(chosen) < len(wanted) else f"all {len(wanted)} test cases"
    report = {"cases": subset, "cases_scored": len(ids), "skipped": skipped,
              "clean_up": None if rule is None else rule.describe(), "test_time_mirroring": options.tta,
              "definition": VOLUME_DEFINITION, "best": leader, "approaches": summary}
    table = _volume_table(summary, regions, leader, subset, len(ids), skipped, rule)
    if with_report:
        begun = time.perf_counter()
        settings = {"runs": out, "approaches": ", ".join(f"{name}: {LABELS[name]}" for name in results),
                    "data": artifact.path, "data SHA-256": config.data_sha256, "build id": config.data_id,
                    "volumes": volumes_dir, "cases": subset, "mirroring": options.tta,
                    "clean-up": report["clean_up"] or "off", "best": LABELS[leader], "brats2d": __version__}
        write_report(out / "comparison_volumes.html", f"{out.name}: {len(ids)} whole test volumes, seven approaches",
                     settings, rows, views, f"{VOLUME_DEFINITION}. {RANKED_BY}", overview=_overview(summary, regions,
                                                                                                   leader))
        reporting += time.perf_counter() - begun
        report["report_seconds"] = round(reporting, 2)
        report["evaluation_seconds"] = round(time.perf_counter() - started - reporting, 2)
    write_csv(out / "comparison_volumes.csv", rows)
    write_json(out / "comparison_volumes.json", report)
    return table


def _overview(summary: dict, regions: list[str], leader: str) -> list[dict[str, str]]:
    """The report's table of approaches: mean scores over patients and the paired difference from the best."""
    lines = []
    for name, s in summary.items():
        m, diff = s["metrics"], s[f"{RANKING}_mean_minus_{leader}"]
        lines.append({"approach": LABELS[name],
                      **{f"lesion-wise Dice {r}": f"{m[f'lesion_dice_{r}']['mean']:.3f}" for r in regions},
                      **{f"Dice {r}": f"{m[f'dice_{r}']['mean']:.3f}" for r in regions},
                      "false lesions per case and region": f"{np.mean([m[f'lesion_fp_{r}']['mean'] for r in regions]):.2f}",
                      "vs the best": "best" if name == leader else f"{diff['mean']:+.3f}"})
    return lines


def _volume_table(summary: dict, regions: list[str], leader: str, subset: str, scored: int, skipped: list,
                  rule: CleanUp | None) -> str:
    def cell(metrics: dict, key: str, digits: int) -> str:
        m = metrics[key]
        if m["ci_low"] is None:
            return f"{m['mean']:.{digits}f}"
        return f"{m['mean']:.{digits}f} [{m['ci_low']:.{digits}f}, {m['ci_high']:.{digits}f}]"

    header = " | ".join([*(f"lesion-wise Dice {r}" for r in regions), *(f"lesion-wise HD95 {r}" for r in regions),
                         *(f"Dice {r}" for r in regions), "false lesions per case and region",
                         f"lesion-wise Dice vs {LABELS[leader]}"])
    lines = [f"# Whole volumes, per patient ({scored} patients: {subset})", "",
             f"| approach | {header} |", "|---|" + "---|" * (3 * len(regions) + 2)]
    for name, s in summary.items():
        m = s["metrics"]
        false = np.mean([m[f"lesion_fp_{r}"]["mean"] for r in regions])
        diff = s[f"{RANKING}_mean_minus_{leader}"]
        interval = "" if diff["ci_low"] is None else f" [{diff['ci_low']:+.3f}, {diff['ci_high']:+.3f}]"
        versus = "best" if name == leader else f"{diff['mean']:+.3f}{interval}"
        cells = [*(cell(m, f"lesion_dice_{r}", 3) for r in regions), *(cell(m, f"lesion_hd95_{r}", 1) for r in regions),
                 *(cell(m, f"dice_{r}", 3) for r in regions), f"{false:.1f}", versus]
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + " |")
    lines += ["", f"Intervals: {INTERVAL}, none below {MIN_PATIENTS} patients ({scored} here)." if scored < MIN_PATIENTS
              else "", f"BraTS 2023 scores on whole volumes ({VOLUME_DEFINITION}). Clean-up: "
              f"{'off' if rule is None else rule.describe()}. The last column is the paired difference in mean lesion-wise "
              "Dice (over regions) from the best approach, over the same patients, with a 95% paired-bootstrap interval."]
    lines += [f"Skipped {s['case_id']}: {s['reason']}" for s in skipped]
    return "\n".join(lines) + "\n"

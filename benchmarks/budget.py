"""What a training budget buys: the budget curve, cross-validated over the 26 real BraTS 2018 patients in
../shared/real-brats18.

Four folds by patient (sorted ids, every fourth patient in a fold: 7, 7, 6 and 6 held out). For each fold,
artifacts of its training patients (every tumour slice and 4 tumour-free slices per case, two neighbouring slices
on each side, in each plane a recipe needs; a tenth of the patients validates) and early-fusion region models
(Unet/resnet18 from scratch, batch 16, 128x128 patches, constant learning rate 1e-3, 2 CPU threads) trained with
`fit`'s own function. A model's budget points are snapshots of one constant-rate run: trained to the first
budget, its best.pt copied aside, resumed to the next (`fit --resume RUN --max-steps N` does the same). Training
minutes are the run's own metrics.csv up to the snapshot, at its median seconds per step and per validation.

The held-out patients (and, to choose the clean-up on, each fold's validation patients) are segmented whole by
the product's `Segmenter`; raw labels and region probabilities are cached per fold, row and patient, so the table
builds across sessions (`--table` prints it from what is cached). Each fold's clean-up is chosen
(`trainer.scoring.cleanup.CleanUpTrial`) on every cached prediction of the row's patients that are not the fold's
held-out ones (other folds' held-out and validation patients, this fold's validation patients): no choice sees the
patients it is scored on.

    python benchmarks/budget.py [--folds 0,1] [--rows axial@250,planes@500,axial@500/p6,...]
    python benchmarks/budget.py --table

A row is RECIPE@STEPS (optimiser steps per model, constant rate) or RECIPE@MINUTESmin (`fit --time-limit`, the
minutes shared by the recipe's models, poly schedule over them: what `make recipe` does), either with /pN (N of the
fold's training patients, a fixed draw per fold). Prints one table (means over held-out patients, 95% BCa intervals over patients from 5 on) and
writes benchmarks/.cache/budget/results.json. Never run it beside the test suite or another timing.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from builder.layout import find_cases  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact  # noqa: E402
from trainer.inference.cases import labels_of  # noqa: E402
from trainer.inference.ensemble import Member, Segmenter  # noqa: E402
from trainer.scoring.brats import score_case  # noqa: E402
from trainer.scoring.cleanup import CleanUpTrial, clean_up  # noqa: E402
from trainer.scoring.statistics import summarise  # noqa: E402
from trainer.tasks import region_confidence  # noqa: E402
from trainer.training.history import History  # noqa: E402
from trainer.training.loop import fit  # noqa: E402
from trainer.training.runs import resume_point  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"
CACHE = Path(__file__).resolve().parent / ".cache" / "budget"
FOLDS = 4
CONTEXT = 2
REGIONS = ("WT", "TC", "ET")
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Recipe:
    label: str
    planes: tuple[str, ...]
    decoder_channels: int | None = None  # None: smp's 256


RECIPES = {
    "axial": Recipe("axial", ("axial",)),
    "planes": Recipe("three planes", PLANES),
    "axial-light": Recipe("axial, half-width decoder", ("axial",), 128),
    "planes-light": Recipe("three planes, half-width decoder", PLANES, 128),
}
#: In the order they run: each fold's rows come before the next fold's.
DEFAULT_ROWS = ("axial@250,axial@500,axial@1000,planes@250,planes@500,planes-light@500,axial-light@1000,"
                "axial@500/p6,axial@500/p12")


@dataclass(frozen=True)
class Row:
    recipe: str
    steps: int  # per model, at a constant rate (0 with ``minutes``)
    patients: int | None = None  # training patients; None: all of the fold's
    minutes: int | None = None  # instead of steps: `fit --time-limit` (shared by the models) and --schedule poly

    @classmethod
    def parse(cls, text: str) -> Row:
        recipe, _, rest = text.partition("@")
        budget, _, patients = rest.partition("/p")
        minutes = budget.removesuffix("min")
        if recipe not in RECIPES or not minutes.isdigit() or (patients and not patients.isdigit()):
            sys.exit(f"--rows {text}: use RECIPE@STEPS, RECIPE@MINUTESmin, either with /pN; RECIPE one of "
                     f"{', '.join(RECIPES)}")
        timed = budget.endswith("min")
        return cls(recipe, 0 if timed else int(minutes), int(patients) if patients else None,
                   int(minutes) if timed else None)

    @property
    def key(self) -> str:
        budget = f"{self.minutes}min" if self.minutes else str(self.steps)
        return f"{self.recipe}@{budget}" + (f"/p{self.patients}" if self.patients else "")

    @property
    def label(self) -> str:
        patients = f", {self.patients} training patients" if self.patients else ""
        if self.minutes:
            share = f" ({self.minutes / len(RECIPES[self.recipe].planes):g} per model)" if len(
                RECIPES[self.recipe].planes) > 1 else ""
            return f"{RECIPES[self.recipe].label}, poly over a {self.minutes}-minute limit{share}{patients}"
        return f"{RECIPES[self.recipe].label}, {self.steps} steps per model{patients}"


@dataclass(frozen=True)
class Machine:
    """What the models train and predict on: the README's CPU rows by default, a GPU's user budget in
    gpu_suite.py (whole slices, larger batches)."""

    device: str = "cpu"
    batch_size: int = 16
    crop: int | None = 128
    workers: int = 0
    build_jobs: int = 2


CPU = Machine()


@dataclass(frozen=True)
class Fold:
    root: Path
    index: int
    held_out: tuple[str, ...]
    training: tuple[str, ...]  # in a fixed random order: the first N are the row's N patients
    source: Path = REAL  # the folder of patient folders
    machine: Machine = CPU

    @classmethod
    def of(cls, root: Path, patients: list[str], index: int, source: Path = REAL, machine: Machine = CPU) -> Fold:
        held_out = tuple(patients[index::FOLDS])
        rest = [p for p in patients if p not in held_out]
        order = np.random.default_rng(index).permutation(len(rest))
        return cls(root, index, held_out, tuple(rest[i] for i in order), source, machine)

    def patients_of(self, row: Row) -> tuple[str, ...]:
        return self.training[: row.patients] if row.patients else self.training

    @property
    def folder(self) -> Path:
        """Named by its patients, so that a cache of other patients is never taken for this fold's."""
        digest = hashlib.sha256(",".join(self.held_out + self.training).encode()).hexdigest()[:8]
        return self.root / f"fold{self.index}-{digest}"


def artifact(fold: Fold, plane: str, patients: tuple[str, ...]) -> Path:
    """The artifact of ``patients`` in ``plane`` (built once)."""
    out = fold.folder / f"{plane}-c{CONTEXT}-p{len(patients)}.h5"
    if out.is_file():
        return out
    source = fold.folder / f"source-p{len(patients)}"
    source.mkdir(parents=True, exist_ok=True)
    for patient in patients:
        if not (source / patient).exists():
            os.symlink((fold.source / patient).resolve(), source / patient)
    build(source, out, BuildOptions(jobs=fold.machine.build_jobs, val_fraction=0.1, test_fraction=0, progress=False,
                                    rule=SliceRule(per_case=None, background=4, plane=plane, context=CONTEXT)))
    return out


def snapshot(fold: Fold, row: Row, plane: str) -> Path:
    """The run of ``plane``'s model as it was after ``row.steps`` steps (best.pt, config.json, metrics.csv).

    One run per model and patients, extended from budget to budget: budgets are reached in increasing order."""
    recipe = RECIPES[row.recipe]
    name = f"{plane}-d{recipe.decoder_channels or 256}-p{len(fold.patients_of(row))}"
    if row.minutes:  # named by the model's own share: three planes' 10 minutes each are not axial's 30
        share = row.minutes / len(recipe.planes)
        return timed_run(fold, row, plane, fold.folder / f"run-{name}-{share:g}min")
    out = fold.folder / f"snap-{name}-{row.steps}"
    if (out / "best.pt").is_file():
        return out
    run = fold.folder / f"run-{name}"
    if (run / "last.pt").is_file():
        saved, _ = resume_point(run)
        fit(FitConfig.from_dict({**saved, "max_steps": row.steps}), resume=run)
    else:
        shutil.rmtree(run, ignore_errors=True)  # a run killed before its first checkpoint starts again
        fit(model_config(fold, row, plane, max_steps=row.steps, keep_last=True), run_dir=run)
    steps = int(History(run / "metrics.csv").rows[-1]["step"])
    if steps != row.steps:
        sys.exit(f"{run}: trained {steps} steps, past the {row.steps} asked: ask for budgets in increasing order, or "
                 "delete the run")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    for file in ("best.pt", "config.json", "metrics.csv"):
        shutil.copy2(run / file, partial / file)
    partial.rename(out)
    return out


def timed_run(fold: Fold, row: Row, plane: str, run: Path) -> Path:
    """``plane``'s model of a time-limited row: `fit --time-limit` (its share of the row's minutes) with the poly
    schedule over the budget, as `make recipe` trains; resumed if it was killed."""
    if (run / "best.pt").is_file() and not (run / "last.pt").is_file():
        return run
    if (run / "last.pt").is_file():
        saved, _ = resume_point(run)
        fit(FitConfig.from_dict(saved), resume=run)
        return run
    share = row.minutes / len(RECIPES[row.recipe].planes)  # type: ignore[operator]
    shutil.rmtree(run, ignore_errors=True)  # a run killed before its first checkpoint starts again
    fit(model_config(fold, row, plane, time_limit=share, schedule="poly"), run_dir=run)
    return run


def model_config(fold: Fold, row: Row, plane: str, **budget: object) -> FitConfig:
    """Every model's settings (early fusion, region outputs, Unet/resnet18 from scratch, no early stop; on the CPU
    batch 16 of 128x128 patches), with the row's ``budget``: max_steps, or a time limit and schedule."""
    machine = fold.machine
    return FitConfig(data=str(artifact(fold, plane, fold.patients_of(row))), modality="all", encoder="resnet18",
                     encoder_weights=None, batch_size=machine.batch_size, crop=machine.crop, epochs=10_000,
                     patience=10_000, workers=machine.workers, device=machine.device, context=CONTEXT, task="regions",
                     decoder_channels=RECIPES[row.recipe].decoder_channels, quiet=True, **budget)  # type: ignore[arg-type]


def train_minutes(run: Path) -> float:
    """Minutes of training and validation as a quiet CPU spends them: the run's steps at its median seconds per
    step, and its epochs at their median seconds outside training (one slow epoch, the CPU shared a while, does not
    count)."""
    rows = History(run / "metrics.csv").rows
    steps = np.diff([0] + [int(r["step"]) for r in rows])
    per_step = np.median([float(r["train_seconds"]) / n for r, n in zip(rows, steps) if n])
    outside = np.median([float(r["seconds"]) - float(r["train_seconds"]) for r in rows])
    return float(steps.sum() * per_step + len(rows) * outside) / 60


def prediction_file(fold: Fold, row: Row, patient: str) -> Path:
    return fold.folder / "predictions" / row.key.replace("/", "-") / f"{patient}.npz"


def predict(fold: Fold, row: Row) -> None:
    """Raw labels and region probabilities (uint8, 0-255) of the fold's held-out and validation patients."""
    snapshots = [snapshot(fold, row, plane) for plane in RECIPES[row.recipe].planes]
    validation = Artifact.open(json.loads((snapshots[0] / "config.json").read_text())["data"])
    wanted = list(fold.held_out) + [p for p in validation.cases_of("val") if p not in fold.held_out]
    missing = [p for p in wanted if not prediction_file(fold, row, p).is_file()]
    if not missing:
        return
    device = torch.device(fold.machine.device)
    segmenter = Segmenter.of([Member.load(s, "best.pt", device) for s in snapshots], device, tta=False, clean=False)
    cases = {c.case_id: c for c in find_cases(fold.source)}
    for patient in missing:
        volumes = segmenter.read(cases[patient])
        result = segmenter.probabilities(volumes, progress=False)
        regions = region_confidence(result.probabilities, segmenter.config.task)
        path = prediction_file(fold, row, patient)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".partial"), "wb") as handle:
            np.savez_compressed(handle, labels=volumes.in_input_space(labels_of(result.probabilities,
                                                                               segmenter.config.task)),
                                regions=np.stack([volumes.in_input_space(p) for p in regions]),
                                seconds=result.seconds, held_out=patient in fold.held_out,
                                train_minutes=sum(train_minutes(s) for s in snapshots))
        path.with_suffix(".partial").rename(path)
        print(f"fold {fold.index}: {row.key}: {patient} segmented in {result.seconds:.0f} s", flush=True)


def truths(source: Path, patients: list[str]) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    """Each patient's label map (2023 values) and voxel size, as stored."""
    import nibabel as nib

    from builder.labels import to_brats2023

    cases = {c.case_id: c for c in find_cases(source)}
    out = {}
    for patient in patients:
        image = nib.load(cases[patient].files["seg"])
        labels = to_brats2023(np.asanyarray(image.dataobj), image.get_filename(), True)
        out[patient] = (labels, tuple(float(z) for z in image.header.get_zooms()[:3]))
    return out


def cached(folds: list[Fold], row: Row) -> Iterator[tuple[Fold, str, dict]]:
    for fold in folds:
        folder = prediction_file(fold, row, "x").parent
        for path in sorted(folder.glob("*.npz")) if folder.is_dir() else ():
            with np.load(path) as saved:
                yield fold, path.stem, {k: saved[k] for k in saved.files}


def score_row(folds: list[Fold], row: Row, truth: dict) -> dict | None:
    """Each held-out patient's scores with the clean-up chosen on the row's other patients, or None when no
    fold is complete."""
    predictions = list(cached(folds, row))
    complete = [f for f in folds if {p for g, p, s in predictions if g == f and s["held_out"]} == set(f.held_out)]
    if not complete:
        return None
    rows, rules, minutes, seconds = [], [], [], []
    for fold in complete:
        trial = CleanUpTrial(REGIONS)
        for other, patient, saved in predictions:
            if patient not in fold.held_out:
                trial.add(f"{patient}@{other.index}", saved["labels"], *truth[patient],
                          saved["regions"])
        rule = trial.best()[0]
        rules.append({"fold": fold.index, "rule": rule.describe(), "chosen_on": len(trial.scores)})
        for other, patient, saved in predictions:
            if other == fold and saved["held_out"]:
                cleaned = clean_up(saved["labels"], rule, saved["regions"])
                rows.append({"case_id": patient, "fold": fold.index, **score_case(cleaned, *truth[patient]),
                             **{f"raw_dice_{r}": score_case(saved["labels"], *truth[patient])[f"dice_{r}"]
                                for r in REGIONS}})
                seconds.append(float(saved["seconds"]))
                minutes.append(float(saved["train_minutes"]))
    keys = [k for k in rows[0] if k not in ("case_id", "fold")]
    return {"row": row.key, "label": row.label, "folds": [f.index for f in complete], "rules": rules, "rows": rows,
            "metrics": {k: summarise([r["case_id"] for r in rows], [r[k] for r in rows]) for k in keys},
            "train_minutes": float(np.mean(minutes)), "predict_seconds": float(np.median(seconds))}


def table(results: list[dict]) -> str:
    def cell(summary: dict) -> str:
        if summary.get("ci_low") is None:
            return f"{summary['mean']:.3f}"
        return f"{summary['mean']:.3f} [{summary['ci_low']:.3f}, {summary['ci_high']:.3f}]"

    lines = ["| row | folds (patients) | lesion-wise Dice WT | TC | ET | Dice WT / TC / ET | gap, lesion-wise to "
             "Dice | missed / false lesions per case (WT, TC, ET) | training min (all models) | prediction s per "
             "volume |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        m = r["metrics"]
        dice = " / ".join(f"{m[f'dice_{x}']['mean']:.3f}" for x in REGIONS)
        gap = " / ".join(f"{m[f'dice_{x}']['mean'] - m[f'lesion_dice_{x}']['mean']:+.3f}" for x in REGIONS)
        lesions = " / ".join(f"{m[f'lesion_fn_{x}']['mean']:.2f}, {m[f'lesion_fp_{x}']['mean']:.2f}" for x in REGIONS)
        lines.append(f"| {r['label']} | {len(r['folds'])} ({m['dice_WT']['patients']}) | "
                     + " | ".join(cell(m[f"lesion_dice_{x}"]) for x in REGIONS)
                     + f" | {dice} | {gap} | {lesions} | {r['train_minutes']:.1f} | {r['predict_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=DEFAULT_ROWS, help="comma-separated RECIPE@STEPS[/pN], run in this order")
    parser.add_argument("--folds", default="0,1,2,3", help="the folds to train and predict, in this order")
    parser.add_argument("--table", action="store_true", help="only print the table of what is cached")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where runs and predictions are kept")
    args = parser.parse_args()
    if not REAL.is_dir():
        sys.exit(f"{REAL}: the real cases are not here (they sit beside the repository in shared/)")
    torch.set_num_threads(2)
    patients = sorted(c.case_id for c in find_cases(REAL))
    folds = [Fold.of(args.cache, patients, index) for index in range(FOLDS)]
    rows = [Row.parse(text) for text in args.rows.split(",") if text]
    if not args.table:
        for index in (int(x) for x in args.folds.split(",")):
            for row in rows:
                predict(folds[index], row)
    truth = truths(REAL, patients)
    results = [r for r in (score_row(folds, row, truth) for row in rows) if r is not None]
    print(f"\nBudget curve: {FOLDS}-fold cross-validation over {len(patients)} real BraTS 2018 patients, 2 CPU threads, "
          "lesion-wise Dice as BraTS 2023 defines it\n")
    print(table(results))
    for r in results:
        print(f"{r['label']}: clean-up per fold: " + "; ".join(f"fold {x['fold']}: {x['rule']} (chosen on "
                                                               f"{x['chosen_on']} predictions)" for x in r["rules"]))
    args.cache.mkdir(parents=True, exist_ok=True)
    (args.cache / "results.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()

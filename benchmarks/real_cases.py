"""Recipes for whole volumes, cross-validated on the 16 real BraTS 2018 patients in ../shared/real-brats18.

Four folds of four held-out patients (sorted ids, every fourth patient in a fold). For each fold: artifacts of the
other twelve patients (every tumour slice plus 4 tumour-free slices per case, in each plane a recipe needs; one of
the twelve validates), models trained with `brats-train fit`'s own function under one budget (--steps optimiser steps
of batch 16 on 128x128 patches, Unet/resnet18 from scratch, 2 CPU threads), and the held-out patients segmented whole
with the product's `Segmenter` (ensembles averaged, mirrored when the recipe says so) and scored with the BraTS 2023
definitions (`trainer.scoring.brats`). The clean-up of each fold is chosen (`trainer.scoring.cleanup.CleanUpTrial`, the family
`evaluate --choose-clean-up` tries) on the raw predictions of the recipe's other folds only: no choice sees the
patients it is scored on. Models are shared between recipes that use the same one (baseline and mirroring).

    python benchmarks/real_cases.py [--steps 180] [--recipes today,baseline,context,...] [--folds-of all=4,...]

Prints one table (means over the held-out patients, 95% BCa bootstrap intervals over patients) and writes
benchmarks/.cache/real_cases/results-<steps>.json. Sixteen patients and a CPU budget are small: the intervals say how small.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from builder.layout import find_cases  # noqa: E402
from trainer.config import FitConfig  # noqa: E402
from trainer.inference.ensemble import Member, Segmenter  # noqa: E402
from trainer.scoring.brats import score_case  # noqa: E402
from trainer.scoring.cleanup import DEFAULT_CLEAN_UP, CleanUpTrial, clean_up  # noqa: E402
from trainer.scoring.statistics import summarise  # noqa: E402
from trainer.training.loop import fit  # noqa: E402

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-brats18"
CACHE = Path(__file__).resolve().parent / ".cache" / "real_cases"
FOLDS = 4
REGIONS = ("WT", "TC", "ET")
PLANES = ("axial", "coronal", "sagittal")


@dataclass(frozen=True)
class Model:
    plane: str = "axial"
    context: int = 0
    task: str = "multiclass"

    @property
    def name(self) -> str:
        return f"{self.plane}-c{self.context}-{self.task}"


@dataclass(frozen=True)
class Recipe:
    label: str
    models: tuple[Model, ...]
    tta: bool = False
    default_clean_up: bool = False  # True: today's fixed rule instead of one chosen on the other folds

    @property
    def key(self) -> str:
        """What its raw predictions depend on (recipes that differ only in clean-up share them)."""
        return "+".join(m.name for m in self.models) + ("-tta" if self.tta else "")


RECIPES = {
    "today": Recipe("baseline with today's fixed clean-up", (Model(),), default_clean_up=True),
    "baseline": Recipe("baseline (axial, multiclass)", (Model(),)),
    "context": Recipe("+ context 1", (Model(context=1),)),
    "regions": Recipe("+ regions", (Model(task="regions"),)),
    "context-regions": Recipe("+ context 1 + regions", (Model(context=1, task="regions"),)),
    "mirroring": Recipe("+ mirroring", (Model(),), tta=True),
    "planes": Recipe("three planes", tuple(Model(plane) for plane in PLANES)),
    "planes-context-regions": Recipe("three planes, context 1, regions",
                                     tuple(Model(plane, 1, "regions") for plane in PLANES)),
    "all": Recipe("three planes, context 1, regions, mirroring",
                  tuple(Model(plane, 1, "regions") for plane in PLANES), tta=True),
}


def fold_patients(patients: list[str], fold: int) -> list[str]:
    return patients[fold::FOLDS]


def artifact(fold: int, patients: list[str], plane: str, context: int) -> Path:
    """The fold's training patients in ``plane`` with ``context`` neighbours (cached)."""
    out = CACHE / f"fold{fold}" / f"{plane}-c{context}.h5"
    if out.is_file():
        return out
    source = CACHE / f"fold{fold}" / "source"
    source.mkdir(parents=True, exist_ok=True)
    for patient in patients:
        if patient not in fold_patients(patients, fold) and not (source / patient).exists():
            os.symlink(REAL / patient, source / patient)
    build(source, out, BuildOptions(jobs=2, val_fraction=0.1, test_fraction=0, progress=False,
                                    rule=SliceRule(per_case=None, background=4, plane=plane, context=context)))
    return out


def trained(fold: int, patients: list[str], model: Model, steps: int) -> tuple[Path, float]:
    """The fold's run of ``model`` (trained once, cached) and its training minutes."""
    run = CACHE / f"fold{fold}" / f"run-{model.name}-{steps}"
    timing = run / "train_minutes.txt"
    if not timing.is_file():
        data = artifact(fold, patients, model.plane, model.context)
        config = FitConfig(data=str(data), modality="all", encoder="resnet18", encoder_weights=None, batch_size=16,
                           crop=128, epochs=1000, max_steps=steps, patience=1000, workers=0, device="cpu",
                           context=model.context, task=model.task)
        started = time.perf_counter()
        fit(config, run_dir=run)
        timing.write_text(str((time.perf_counter() - started) / 60))
    return run, float(timing.read_text())


def predict_fold(fold: int, patients: list[str], recipes: dict[str, Recipe], steps: int) -> dict[str, dict]:
    """Raw labels of each held-out patient under each recipe (cached as .npz), prediction seconds per recipe."""
    device = torch.device("cpu")
    models = {m for r in recipes.values() for m in r.models}
    runs = {m: trained(fold, patients, m, steps) for m in sorted(models, key=lambda m: m.name)}
    members = {model: Member.load(run, "best.pt", device) for model, (run, _) in runs.items()}
    out: dict[str, dict] = {name: {"train_minutes": sum(runs[m][1] for m in r.models), "seconds": []}
                            for name, r in recipes.items()}
    cases = {c.case_id: c for c in find_cases(REAL)}
    for patient in fold_patients(patients, fold):
        for name, recipe in recipes.items():
            path = labels_file(fold, recipe, steps, patient)
            if path.is_file():
                out[name]["seconds"].append(float(np.load(path)["seconds"]))
                continue
            segmenter = Segmenter.of([members[m] for m in recipe.models], device, recipe.tta, clean=False)
            volumes = segmenter.read(cases[patient])
            done = segmenter.segment(volumes, progress=False)  # raw labels: each fold's clean-up is chosen later
            np.savez_compressed(path, labels=volumes.in_input_space(done.raw), seconds=done.result.seconds)
            out[name]["seconds"].append(done.result.seconds)
        print(f"fold {fold}: {patient} segmented by {len(recipes)} recipes", flush=True)
    return out


def truths(patients: list[str]) -> dict[str, tuple[np.ndarray, tuple[float, ...]]]:
    """Each patient's label map (2023 values) and voxel size, as stored."""
    import nibabel as nib

    from builder.labels import to_brats2023

    cases = {c.case_id: c for c in find_cases(REAL)}
    out = {}
    for patient in patients:
        image = nib.load(cases[patient].files["seg"])
        labels = to_brats2023(np.asanyarray(image.dataobj), image.get_filename(), True)
        out[patient] = (labels, tuple(float(z) for z in image.header.get_zooms()[:3]))
    return out


def labels_file(fold: int, recipe: Recipe, steps: int, patient: str) -> Path:
    return CACHE / f"fold{fold}" / f"labels-{recipe.key}-{steps}-{patient}.npz"


def score_recipe(name: str, recipe: Recipe, folds: list[int], patients: list[str], steps: int, truth: dict
                 ) -> tuple[list[dict], list[dict]]:
    """Each held-out patient's scores with the clean-up chosen on the recipe's other folds (or today's rule)."""
    raw = {(fold, p): np.load(labels_file(fold, recipe, steps, p))["labels"] for fold in folds
           for p in fold_patients(patients, fold)}
    rows, rules = [], []
    for fold in folds:
        if recipe.default_clean_up:
            rule = DEFAULT_CLEAN_UP
        else:
            trial = CleanUpTrial(REGIONS)
            for (other, patient), labels in raw.items():
                if other != fold:
                    trial.add(patient, labels, *truth[patient])
            rule = trial.best()[0] if trial.scores else DEFAULT_CLEAN_UP
        rules.append({"fold": fold, "rule": rule.describe()})
        for patient in fold_patients(patients, fold):
            rows.append({"case_id": patient, "fold": fold,
                         **score_case(clean_up(raw[fold, patient], rule), *truth[patient])})
    return rows, rules


def table(results: dict) -> str:
    def cell(summary: dict, digits: int = 3) -> str:
        if summary.get("ci_low") is None:
            return f"{summary['mean']:.{digits}f}"
        return f"{summary['mean']:.{digits}f} [{summary['ci_low']:.{digits}f}, {summary['ci_high']:.{digits}f}]"

    lines = ["| recipe | folds (patients) | lesion-wise Dice WT | TC | ET | Dice WT / TC / ET | lesion-wise HD95 WT / "
             "TC / ET (mm) | false lesions per case and region | training min per fold | prediction s per volume |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        m = r["metrics"]
        dice = " / ".join(f"{m[f'dice_{x}']['mean']:.3f}" for x in REGIONS)
        hd = " / ".join(f"{m[f'lesion_hd95_{x}']['mean']:.0f}" for x in REGIONS)
        false = np.mean([m[f"lesion_fp_{x}"]["mean"] for x in REGIONS])
        lines.append(f"| {RECIPES[name].label} | {len(r['folds'])} ({m['dice_WT']['patients']}) | "
                     + " | ".join(cell(m[f"lesion_dice_{x}"]) for x in REGIONS)
                     + f" | {dice} | {hd} | {false:.2f} | {r['train_minutes']:.1f} | {r['predict_seconds']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=180, help="optimiser steps per model (batch 16, 128x128)")
    parser.add_argument("--recipes", default=",".join(RECIPES), help=f"comma-separated, of: {', '.join(RECIPES)}")
    parser.add_argument("--folds-of", default="today=4,baseline=4,context=4,planes-context-regions=2,all=2",
                        help="recipe=folds for recipes run on more than the default one fold")
    args = parser.parse_args()
    if not REAL.is_dir():
        sys.exit(f"{REAL}: the real cases are not here (they sit beside the repository in shared/)")
    torch.set_num_threads(2)
    patients = sorted(c.case_id for c in find_cases(REAL))
    chosen = {name: RECIPES[name] for name in args.recipes.split(",") if name}
    folds_of = {name: 1 for name in chosen}
    for item in args.folds_of.split(","):
        if "=" in item and item.split("=")[0] in folds_of:
            folds_of[item.split("=")[0]] = int(item.split("=")[1])
    timing: dict[str, dict] = {name: {"train_minutes": [], "seconds": []} for name in chosen}
    for fold in range(FOLDS):
        here = {name: r for name, r in chosen.items() if fold < folds_of[name]}
        if here:
            for name, out in predict_fold(fold, patients, here, args.steps).items():
                timing[name]["train_minutes"].append(out["train_minutes"])
                timing[name]["seconds"].extend(out["seconds"])
    truth = truths(patients)
    results = {}
    for name, recipe in chosen.items():
        folds = list(range(folds_of[name]))
        rows, rules = score_recipe(name, recipe, folds, patients, args.steps, truth)
        keys = [k for k in rows[0] if k not in ("case_id", "fold")]
        results[name] = {"folds": folds, "rules": rules, "rows": rows,
                         "metrics": {k: summarise([r["case_id"] for r in rows], [r[k] for r in rows]) for k in keys},
                         "train_minutes": float(np.mean(timing[name]["train_minutes"])),
                         "predict_seconds": float(np.median(timing[name]["seconds"]))}
    print(f"\n{args.steps} steps per model, {FOLDS}-fold cross-validation over {len(patients)} real BraTS 2018 "
          f"patients, 2 CPU threads\n")
    print(table(results))
    for name, r in results.items():
        print(f"{RECIPES[name].label}: clean-up per fold: " + "; ".join(f"fold {x['fold']}: {x['rule']}" for x in r["rules"]))
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / f"results-{args.steps}.json").write_text(json.dumps(results, indent=2, default=float))


if __name__ == "__main__":
    main()

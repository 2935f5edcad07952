"""nnU-Net 2d beside brats2d at the same budget, on the same fold of the 26 real patients as benchmarks/budget.py.

nnunetv2 lives in its own virtual environment (benchmarks/.cache/nnunet/venv, made by ``--install``: nnunetv2 2.8.1
and a CPU build of torch), never a dependency of brats2d. For one fold (``budget.Fold``):

1. The fold's training patients are converted as nnU-Net's own BraTS script (Dataset137_BraTS21) converts them:
   channels T1, T1ce, T2, Flair; labels ED 1, NCR 2, ET 3 (2018's 4); regions WT (1, 2, 3), TC (2, 3), ET (3).
2. ``nnUNetv2_plan_and_preprocess -c 2d`` is timed beside ``brats-build build`` of the same patients (brats2d's
   axial artifact with 2 slices of context).
3. The 2d configuration trains on the CPU for ``--minutes`` of wall time (default: the brats2d row's training
   minutes on this fold): ``nnUNetTrainer_Budget`` below, nnU-Net's own trainer with epochs of 25 iterations, stopped
   when the next epoch would not fit, its poly schedule set after the first epoch to the epochs that fit. The plan's
   batch of 2d patches is set to brats2d's 16 (its default, over 100 slices of 192x160, takes about 80 s a step here).
4. The held-out patients are predicted (no mirroring, as brats2d's rows) and scored with ``trainer.scoring``: raw,
   and with each region's largest component kept (nnU-Net's BraTS rule; dropped voxels go to the next region out,
   brats2d's convention).

    python benchmarks/peer_nnunet.py --install            # once: about 300 MB
    python benchmarks/peer_nnunet.py --fold 0 [--minutes 30]

Writes benchmarks/.cache/nnunet/fold<K>/results.json and prints one table. Never run it beside another timing.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from budget import CACHE, FOLDS, REAL, REGIONS, Fold, truths  # noqa: E402

from builder.build import BuildOptions, build  # noqa: E402
from builder.extract import SliceRule  # noqa: E402
from builder.layout import find_cases  # noqa: E402
from trainer.scoring.brats import score_case  # noqa: E402
from trainer.scoring.cleanup import CleanUp, clean_up  # noqa: E402
from trainer.scoring.statistics import summarise  # noqa: E402

HERE = CACHE.parent / "nnunet"
VENV = HERE / "venv"
PACKAGES = ("torch==2.13.0", "nnunetv2==2.8.1")
DATASET = 900  # nnU-Net dataset ids 900 + fold
CHANNELS = (("t1n", "T1"), ("t1c", "T1ce"), ("t2w", "T2"), ("t2f", "Flair"))
KEEP_LARGEST = CleanUp.uniform(min_share=1.0)

TRAINER = '''
import os
import time

import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer


class nnUNetTrainer_Budget(nnUNetTrainer):
    """nnUNetTrainer bounded by wall time (BRATS2D_PEER_MINUTES), with short epochs (written by brats2d's
    benchmarks/peer_nnunet.py; placed at the top of the trainer folder so that nnU-Net finds it first)."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.num_iterations_per_epoch = 25
        self.num_val_iterations_per_epoch = 5
        self.num_epochs = 100_000
        self.budget_seconds = float(os.environ["BRATS2D_PEER_MINUTES"]) * 60

    def run_training(self):
        started = time.perf_counter()
        self.on_train_start()
        first = self.current_epoch
        for epoch in range(first, self.num_epochs):
            self.on_epoch_start()
            self.on_train_epoch_start()
            outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                outputs = [self.validation_step(next(self.dataloader_val))
                           for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(outputs)
            self.on_epoch_end()
            elapsed = time.perf_counter() - started
            per_epoch = elapsed / (epoch - first + 1)
            if epoch == first:  # the poly schedule over the epochs that fit
                self.num_epochs = first + max(1, int(self.budget_seconds / per_epoch))
                self.lr_scheduler.max_steps = self.num_epochs
            if elapsed + per_epoch > self.budget_seconds or epoch + 1 >= self.num_epochs:
                break
        self.on_train_end()

    def perform_actual_validation(self, save_probabilities: bool = False):
        """Skipped: with fold "all" it would predict every training patient inside the timed budget."""
'''


def tool(name: str) -> Path:
    return VENV / "bin" / name


def install() -> None:
    """nnunetv2 and a CPU torch in their own virtual environment."""
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(tool("pip")), "install", "-q", *PACKAGES], check=True)
    site = next((VENV / "lib").glob("python*/site-packages"))
    target = site / "nnunetv2" / "training" / "nnUNetTrainer" / "nnUNetTrainer_Budget.py"
    target.write_text(TRAINER)
    print(f"nnunetv2 installed in {VENV}; trainer written to {target}")


def convert(fold: Fold, raw: Path) -> Path:
    """The fold as nnU-Net's raw dataset (training patients, held-out images in imagesTs), as its BraTS script
    converts BraTS (labels ED 1, NCR 2, ET 3)."""
    import nibabel as nib

    from builder.labels import to_brats2023

    folder = raw / f"Dataset{DATASET + fold.index:03d}_BraTS18fold{fold.index}"
    if (folder / "dataset.json").is_file():
        return folder
    cases = {c.case_id: c for c in find_cases(REAL)}
    for sub in ("imagesTr", "labelsTr", "imagesTs"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for patient in fold.training + fold.held_out:
        images = "imagesTr" if patient in fold.training else "imagesTs"
        for index, (modality, _) in enumerate(CHANNELS):
            shutil.copy(cases[patient].files[modality], folder / images / f"{patient}_{index:04d}.nii.gz")
        if patient in fold.training:
            seg = nib.load(cases[patient].files["seg"])
            labels = to_brats2023(np.asanyarray(seg.dataobj), seg.get_filename(), True)  # NCR 1, ED 2, ET 3
            nnunet = np.select([labels == 2, labels == 1, labels == 3], [1, 2, 3], 0).astype(np.uint8)
            header = seg.header.copy()
            header.set_data_dtype(np.uint8)
            nib.save(nib.Nifti1Image(nnunet, seg.affine, header), folder / "labelsTr" / f"{patient}.nii.gz")
    (folder / "dataset.json").write_text(json.dumps({
        "channel_names": {str(i): name for i, (_, name) in enumerate(CHANNELS)},
        "labels": {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]},
        "regions_class_order": [1, 2, 3], "numTraining": len(fold.training), "file_ending": ".nii.gz",
    }, indent=2))
    return folder


def timed(command: list[str], env: dict[str, str], log: Path) -> float:
    """Seconds ``command`` took (its output in ``log``); a failure is one line naming the log."""
    started = time.perf_counter()
    with open(log, "w") as handle:
        done = subprocess.run(command, env=env, stdout=handle, stderr=subprocess.STDOUT)
    if done.returncode:
        sys.exit(f"{command[0]} failed (exit {done.returncode}): see {log}")
    return time.perf_counter() - started


def brats2d_minutes(fold: Fold, row: str) -> float | None:
    """The training minutes of a budget.py row on this fold, if it ran."""
    folder = fold.folder / "predictions" / row.replace("/", "-")
    files = sorted(folder.glob("*.npz")) if folder.is_dir() else []
    return float(np.load(files[0])["train_minutes"]) if files else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--install", action="store_true", help=f"make {VENV} with {', '.join(PACKAGES)}")
    parser.add_argument("--fold", type=int, default=0, choices=range(FOLDS))
    parser.add_argument("--minutes", type=float, default=None,
                        help="wall-time budget of the training (default: the --row's training minutes)")
    parser.add_argument("--row", default="planes-light@500", help="the budget.py row to set beside")
    args = parser.parse_args()
    if args.install:
        install()
        return
    if not tool("nnUNetv2_train").is_file():
        sys.exit(f"nnunetv2 is not installed for this benchmark: run `python {sys.argv[0]} --install` (its own "
                 f"virtual environment in {VENV}, never a dependency of brats2d)")
    if not REAL.is_dir():
        sys.exit(f"{REAL}: the real cases are not here (they sit beside the repository in shared/)")
    patients = sorted(c.case_id for c in find_cases(REAL))
    fold = Fold.of(CACHE, patients, args.fold)
    minutes = args.minutes or brats2d_minutes(fold, args.row)
    if minutes is None:
        sys.exit(f"no --minutes given and budget.py's row {args.row} has not run on fold {args.fold}: give --minutes")
    work = HERE / f"fold{args.fold}"
    env = {**os.environ, "nnUNet_raw": str(work / "raw"), "nnUNet_preprocessed": str(work / "preprocessed"),
           "nnUNet_results": str(work / "results"), "BRATS2D_PEER_MINUTES": str(minutes), "nnUNet_n_proc_DA": "2",
           "OMP_NUM_THREADS": "2", "nnUNet_compile": "false"}
    dataset = convert(fold, work / "raw")
    ident = str(DATASET + args.fold)
    timings = {"plan_and_preprocess_s": timed([str(tool("nnUNetv2_plan_and_preprocess")), "-d", ident, "-c", "2d",
                                               "-np", "2"], env, work / "plan.log")}
    started = time.perf_counter()
    source = fold.folder / f"source-p{len(fold.training)}"
    build(source, work / "brats2d.h5", BuildOptions(jobs=2, val_fraction=0.1, test_fraction=0, progress=False,
                                                   rule=SliceRule(per_case=None, background=4, context=2)))
    timings["brats2d_build_s"] = time.perf_counter() - started
    plans_file = next((work / "preprocessed").glob("Dataset*/nnUNetPlans.json"))
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["2d"]["batch_size"] = 16
    plans_file.write_text(json.dumps(plans, indent=2))
    timings["train_s"] = timed([str(tool("nnUNetv2_train")), ident, "2d", "all", "-tr", "nnUNetTrainer_Budget",
                                "-device", "cpu"], env, work / "train.log")
    predicted = work / "predicted"
    timings["predict_s_per_volume"] = timed(
        [str(tool("nnUNetv2_predict")), "-i", str(dataset / "imagesTs"), "-o", str(predicted), "-d", ident, "-c", "2d",
         "-f", "all", "-tr", "nnUNetTrainer_Budget", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
        env, work / "predict.log") / len(fold.held_out)
    score(fold, predicted, minutes, timings, work)


def score(fold: Fold, predicted: Path, minutes: float, timings: dict[str, float], work: Path) -> None:
    import nibabel as nib

    truth = truths(REAL, list(fold.held_out))
    rows: dict[str, list[dict]] = {"raw": [], "largest component per region": []}
    for patient in fold.held_out:
        nnunet = np.asanyarray(nib.load(predicted / f"{patient}.nii.gz").dataobj)
        labels = np.select([nnunet == 1, nnunet == 2, nnunet == 3], [2, 1, 3], 0).astype(np.uint8)  # BraTS 2023
        for name, cleaned in (("raw", labels), ("largest component per region", clean_up(labels, KEEP_LARGEST))):
            rows[name].append({"case_id": patient, **score_case(cleaned, *truth[patient])})
    results = {"fold": fold.index, "minutes": minutes, **timings,
               "metrics": {name: {k: summarise([r["case_id"] for r in rs], [r[k] for r in rs])
                                  for k in rs[0] if k != "case_id"} for name, rs in rows.items()}}
    (work / "results.json").write_text(json.dumps(results, indent=2, default=float))
    print(f"\nnnU-Net 2d, fold {fold.index} ({len(fold.held_out)} held-out patients), {minutes:.1f} min of training "
          f"on 2 CPU threads; plan and preprocess {timings['plan_and_preprocess_s']:.0f} s (brats-build "
          f"{timings['brats2d_build_s']:.0f} s), prediction {timings['predict_s_per_volume']:.0f} s per volume\n")
    print("| nnU-Net 2d | lesion-wise Dice WT / TC / ET | Dice WT / TC / ET | false lesions per case (WT, TC, ET) |")
    print("|---|---|---|---|")
    for name, m in results["metrics"].items():
        lesion = " / ".join(f"{m[f'lesion_dice_{r}']['mean']:.3f}" for r in REGIONS)
        dice = " / ".join(f"{m[f'dice_{r}']['mean']:.3f}" for r in REGIONS)
        false = " / ".join(f"{m[f'lesion_fp_{r}']['mean']:.2f}" for r in REGIONS)
        print(f"| {name} | {lesion} | {dice} | {false} |")


if __name__ == "__main__":
    main()

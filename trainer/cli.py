"""``brats-train``: fit a model on the artifact, evaluate it, compare modalities, predict new cases."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click

from builder.format import MODALITIES, MODALITY_ALIASES, REGIONS
from trainer.config import CACHES, LOSSES, SCHEDULES, TASKS, FitConfig
from trainer.transforms import NORMALISATIONS

MODALITY_CHOICES = (*MODALITIES, *MODALITY_ALIASES, "all")


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's expected errors (bad files, names, options) into one line and exit code 1."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        from trainer.config import FitError
        from trainer.data import ArtifactError
        from trainer.model import ModelError
        from trainer.reports import OutputError

        try:
            return command(*args, **kwargs)
        except (ArtifactError, ModelError, FitError, OutputError, ValueError) as error:
            raise click.ClickException(_last_line(error)) from None
        except OSError as error:  # writes become OutputError: what is left is a read, e.g. a failed chunk checksum
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(
                f"{where}reading failed ({error.strerror or _last_line(error)}); if it is the .h5 file it may be "
                "damaged: check it with `brats-build verify FILE`"
            ) from None

    return run


def _last_line(error: BaseException) -> str:
    """The error's own message: DataLoader workers re-raise an error with the worker's traceback above it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train 2D BraTS segmentation models that stream from a brats2d HDF5 file (datasets/FORMAT.md)."""


def fit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `fit` and `compare`: everything that defines how one model is trained."""
    options = [
        click.option("--arch", default="unet", show_default=True,
                     help="smp architecture: unet, unetplusplus, deeplabv3plus, fpn, manet, linknet, pspnet, pan, ..."),
        click.option("--encoder", default="resnet34", show_default=True, help="smp encoder name, e.g. resnet18, efficientnet-b0."),
        click.option("--encoder-weights", default="imagenet", show_default=True,
                     help="Pretrained encoder weights: imagenet (downloaded once) or none."),
        click.option("--task", type=click.Choice(TASKS), default="multiclass", show_default=True,
                     help="multiclass: background/NCR/ED/ET; binary: whole tumour vs background."),
        click.option("--loss", type=click.Choice(LOSSES), default="ce+dice", show_default=True),
        click.option("--norm", type=click.Choice(NORMALISATIONS), default="zscore", show_default=True,
                     help="Per-slice intensity normalisation over brain pixels (zscore) or max-scaling (minmax)."),
        click.option("--epochs", default=50, show_default=True, type=click.IntRange(1)),
        click.option("--max-steps", default=None, type=click.IntRange(1), help="Stop after this many optimiser steps."),
        click.option("--batch-size", default=None, type=click.IntRange(1),
                     help="Slices per step; default 16 on a CPU, 64 on a GPU (at most the train split)."),
        click.option("--lr", default=1e-3, show_default=True, type=float, help="Peak learning rate (AdamW)."),
        click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
                     help="After warm-up: constant, polynomial decay to 0 (nnU-Net's (1-t)^0.9) or cosine. Constant "
                          "measured better on the demo's 6-epoch runs (README); decay is for long runs."),
        click.option("--warmup-epochs", default=0.0, show_default=True, type=click.FloatRange(0),
                     help="Linear learning-rate warm-up, in epochs (at most half the run)."),
        click.option("--clip-grad", default=12.0, show_default=True, type=click.FloatRange(0),
                     help="Clip the gradient norm to this (nnU-Net's 12); 0 turns clipping off."),
        click.option("--workers", default=2, show_default=True, type=click.IntRange(0), help="DataLoader worker processes."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
        click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA (bf16, else fp16)."),
        click.option("--compile/--no-compile", "compile_model", default=False, show_default=True, help="torch.compile the model."),
        click.option("--augment/--no-augment", default=True, show_default=True, help="Flips, rotations, intensity jitter."),
        click.option("--crop", default=None, type=click.IntRange(32),
                     help="Train on random NxN patches (multiple of 32, tumour-centred 2 in 3); eval sees whole slices."),
        click.option("--seed", default=0, show_default=True),
        click.option("--patience", default=5, show_default=True, type=click.IntRange(1), help="Early stopping patience, epochs."),
        click.option("--cache", type=click.Choice(CACHES), default="auto", show_default=True,
                     help="stream rows from the file, hold the splits on the device, or choose by free GPU memory."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def make_config(data: Path, modality: str, out: Path, **options: Any) -> FitConfig:
    options["compile"] = options.pop("compile_model")
    options["clip_grad"] = options["clip_grad"] or None
    return FitConfig(data=str(data), modality=modality, out=str(out), **options)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@click.option("--modality", "-m", type=click.Choice(MODALITY_CHOICES, case_sensitive=False), required=False,
              default=None, help="t1n, t1c, t2w, t2f (or t1, t1ce/t1gd, t2, flair), or all (early fusion).")
@fit_options
@click.option("--out", default=Path("runs"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Run folder prefix (default: the modality).")
@click.option("--resume", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this folder from its last.pt, with its saved options (DATA may have moved).")
@one_line_errors
def fit(data: Path, modality: str | None, out: Path, name: str | None, resume: Path | None, **options: Any) -> None:
    """Train one model on DATA (an .h5 file from brats-build) and leave a run folder under --out."""
    from trainer.model import read_checkpoint
    from trainer.train import fit as run_fit

    if resume is not None:
        config = FitConfig.from_dict({**read_checkpoint(resume / "last.pt")["config"], "data": str(data)})
    else:
        if modality is None:
            raise click.UsageError("--modality is required (t1n, t1c, t2w, t2f, their aliases, or all)")
        config = make_config(data, modality, out, name=name, **options)
    run_dir = run_fit(config, resume)
    click.echo(f"run folder: {run_dir}")


def clean_up_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--clean-up/--no-clean-up", "clean", default=True, show_default=True,
                        help="Clean whole-volume predictions up: per region (WT, TC, ET), drop components under 30% "
                             "of the region's largest (trainer/cleanup.py; chosen on held-out real cases).")(command)


def clean_rule(clean: bool) -> Any:
    from trainer.cleanup import DEFAULT_CLEAN_UP

    return DEFAULT_CLEAN_UP if clean else None


def format_scores(scores: dict[str, Any], regions: tuple[str, ...] = tuple(REGIONS)) -> str:
    """One line of the headline whole-volume scores: lesion-wise Dice and HD95, then legacy Dice, per region."""
    def value(key: str) -> Any:
        found = scores.get(key)
        return found["mean"] if isinstance(found, dict) else found

    parts = []
    for label, key, digits in (("lesion-wise Dice", "lesion_dice", 3), ("lesion-wise HD95", "lesion_hd95", 1),
                               ("Dice", "dice", 3)):
        present = [(r, value(f"{key}_{r}")) for r in regions if value(f"{key}_{r}") is not None]
        parts.append(f"{label} " + " ".join(f"{r} {v:.{digits}f}" for r, v in present))
    return "; ".join(parts)


@main.command(name="evaluate")
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--split", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--data", default=None, type=click.Path(path_type=Path),
              help="The run's .h5 file if it moved (checked by its build id: a rebuilt file is refused).")
@click.option("--other-data", is_flag=True,
              help="Score --data even though it is not the file the run trained on (said in the outputs).")
@click.option("--volumes", "volumes_dir", default=None, type=click.Path(path_type=Path),
              help="The BraTS folder the artifact was built from: segment each case of the split over its whole "
                   "volume and score it as BraTS 2023 does (lesion-wise Dice and HD95, legacy Dice, HD95, "
                   "sensitivity, specificity).")
@click.option("--limit", default=None, type=click.IntRange(1), help="With --volumes: score only the first N cases.")
@clean_up_option
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint", default="best.pt", show_default=True)
@one_line_errors
def evaluate_command(run_dir: Path, split: str, data: Path | None, other_data: bool, volumes_dir: Path | None,
                     limit: int | None, clean: bool, device: str, checkpoint: str) -> None:
    """Evaluate a run's checkpoint on a split.

    Per slice on the artifact's rows: <split>_metrics.json and <split>_cases.csv. With --volumes, per patient on
    whole volumes: <split>_volumes.csv (a row per case) and <split>_volumes.json (means with 95% intervals).
    """
    from trainer.evaluate import evaluate_run, evaluate_volumes

    if volumes_dir is None:
        result = evaluate_run(run_dir, split, data, device, checkpoint, other_data=other_data)
        shown = " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        click.echo(f"{run_dir} on {split} ({result['slices']} slices, per-slice 2D scores; data: "
                   f"{result['data_check']}): {shown}")
        click.echo(f"wrote {run_dir / f'{split}_metrics.json'} and {run_dir / f'{split}_cases.csv'}")
        return
    report = evaluate_volumes(run_dir, volumes_dir, split, data, device, checkpoint, clean_rule(clean), limit,
                              other_data)
    for line in report["skipped"]:
        click.echo(f"skipped {line['case_id']}: {line['reason']}")
    subset = f", {report['subset']}" if report["subset"] else ""
    click.echo(f"{run_dir} on {report['cases_scored']} whole {split} volumes{subset} (data: {report['data_check']}): "
               f"{format_scores(report['metrics'])}")
    click.echo(f"wrote {run_dir / f'{split}_volumes.csv'} and {run_dir / f'{split}_volumes.json'}")
    if report["skipped"]:
        raise SystemExit(1)


@main.command()
@click.argument("data", type=click.Path(path_type=Path))
@fit_options
@click.option("--out", default=Path("runs/compare"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reuse", is_flag=True, help="Keep runs already finished in --out instead of training them again.")
@click.option("--volumes", "volumes_dir", default=None, type=click.Path(path_type=Path),
              help="The BraTS folder the artifact was built from: also score all seven approaches on the test cases' "
                   "whole volumes (BraTS 2023 lesion-wise and legacy scores, fusion voxel by voxel) with paired "
                   "differences from the best.")
@click.option("--volume-cases", default=None, type=click.IntRange(1),
              help="With --volumes: score only the first N test cases (said in the table).")
@clean_up_option
@one_line_errors
def compare(data: Path, out: Path, reuse: bool, volumes_dir: Path | None, volume_cases: int | None, clean: bool,
            **options: Any) -> None:
    """Train t1n, t1c, t2w, t2f and all four (early fusion) alike, fuse the four late (vote and mean),
    and score all seven on the test split: comparison.md/.csv/.png/.gif in --out (with --volumes, also
    comparison_volumes.csv/.json, the whole-volume scores per patient)."""
    from trainer.compare import compare as run_compare

    run_compare(make_config(data, "all", out, **options), out, reuse, volumes_dir=volumes_dir, volume_cases=volume_cases,
                rule=clean_rule(clean))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("case_dirs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Folder for <case>-seg.nii.gz.")
@clean_up_option
@click.option("--device", default="auto", show_default=True)
@click.option("--checkpoint", default="best.pt", show_default=True)
@one_line_errors
def predict(run_dir: Path, case_dirs: tuple[Path, ...], out: Path, clean: bool, device: str, checkpoint: str) -> None:
    """Segment every brain slice of new cases (CASE_DIRS: BraTS case folders) with the model in RUN_DIR.

    Volumes in another orientation are reoriented for the model (nibabel) and the mask is written in the input's
    own space: <case>-seg.nii.gz with the source affine and header and BraTS label values (opens in ITK-SNAP or
    3D Slicer over the images). Cases with a -seg file are also scored as BraTS 2023 scores them
    (predict_scores.csv). A case that cannot be read or matched is listed and skipped; the others are written.
    """
    from trainer.predict import predict_cases

    reports, skipped = predict_cases(run_dir, list(case_dirs), out, device, checkpoint, clean_rule(clean))
    for report in reports:
        speed = f"{report['brain_slices']} brain slices at {report['slices_per_second']:.1f} slices/s"
        scores = f"; {format_scores(report)}" if "score_seconds" in report else ""
        click.echo(f"{report['case_id']}: wrote {report['output']} ({speed}){scores}")
    for line in skipped:
        click.echo(f"skipped {line['case_id']}: {line['reason']}")
    if skipped:
        raise SystemExit(1)

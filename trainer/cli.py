"""``brats-train``: fit a model on the artifact, evaluate it, compare modalities, predict new cases."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any

import click
from click.core import ParameterSource

from builder import __version__
from builder.console import Commands, standard_output_failed
from builder.format import MODALITIES, MODALITY_ALIASES, REGIONS
from builder.remote import ArtifactFile, RemoteError, address_of, is_address, run_data, stream_option
from trainer.config import CACHES, LOSSES, MAX_FOLDS, NORMALISATIONS, SCHEDULES, FitConfig
from trainer.errors import USER_ERRORS, CommandError
from trainer.inference.options import VolumeOptions
from trainer.tasks import TASKS

MODALITY_CHOICES = (*MODALITIES, *MODALITY_ALIASES, "all")
#: How predicted masks write enhancing tumour (kept here so that `--help` needs no nibabel).
LABEL_CONVENTIONS = ("auto", "brats2023", "brats2021")


def one_line_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's expected errors (bad files, names, options) into one line and exit code 1."""

    @wraps(command)
    def run(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except (*USER_ERRORS, RemoteError, ValueError) as error:  # RemoteError: a streamed read, maybe in a worker
            raise click.ClickException(_last_line(error)) from None
        except (MemoryError, RuntimeError) as error:
            if not out_of_memory(error):
                raise
            raise click.ClickException(
                f"out of memory ({_last_line(error)[:100] or type(error).__name__}): use a smaller --batch-size or "
                "--crop, --workers 0, or a machine (or memory limit) with more room") from None
        except OSError as error:  # writes become OutputError: what is left is a read, e.g. a failed chunk checksum
            if standard_output_failed(error):
                raise  # not a read: Commands ends it as Unix tools end
            where = f"{error.filename}: " if error.filename else ""
            raise click.ClickException(
                f"{where}reading failed ({error.strerror or _last_line(error)}); if it is the .h5 file it may be "
                "damaged: check it with `brats-build verify FILE`"
            ) from None

    return run


def out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` says memory ran out: Python's MemoryError, torch's CPU allocator and CUDA out-of-memory
    errors, or a DataLoader worker killed by the kernel's out-of-memory killer."""
    text = str(error).lower()
    return isinstance(error, MemoryError) or any(
        words in text for words in ("out of memory", "can't allocate memory", "cannot allocate memory",
                                    "killed by signal: killed"))


def _last_line(error: BaseException) -> str:
    """The error's own message: DataLoader workers re-raise an error with the worker's traceback above it."""
    text = str(error).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="brats-train (brats2d)")
def main() -> None:
    """Train 2D BraTS segmentation models that stream from a brats2d HDF5 file (datasets/FORMAT.md)."""


#: The options of whole-volume segmentation (``VolumeOptions``), each declared once (``--device`` serves `fit` too).
_VOLUME_OPTIONS = {
    "tta": click.option("--tta/--no-tta", default=False, show_default=True,
                        help="Test-time mirroring of whole volumes: average each slice's probabilities over its mirror "
                             "images along both in-plane axes (4 network passes per slice: about 4x the time on a CPU)."),
    "clean": click.option("--clean-up/--no-clean-up", "clean", default=True, show_default=True,
                          help="Clean whole-volume predictions up: the rule chosen for the (lead) run on validation "
                               "patients if one was (--choose-clean-up), else per region (WT, TC, ET) drop components "
                               "under 30% of the region's largest (trainer/scoring/cleanup.py)."),
    "device": click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N."),
    "checkpoint": click.option("--checkpoint", default="best.pt", show_default=True,
                               help="Which checkpoint file of each run to load."),
}


def fit_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Options shared by `fit` and `compare`: everything that defines how one model is trained."""
    options = [
        click.option("--arch", default="unet", show_default=True,
                     help="smp architecture: unet, unetplusplus, deeplabv3plus, fpn, manet, linknet, pspnet, pan, ..."),
        click.option("--encoder", default="resnet34", show_default=True, help="smp encoder name, e.g. resnet18, efficientnet-b0."),
        click.option("--encoder-weights", default="imagenet", show_default=True,
                     help="Pretrained encoder weights: imagenet (downloaded once) or none."),
        click.option("--decoder-channels", type=int, default=None,
                     help="Width of the widest decoder block, halving block by block (smp's default: 256). 128 makes "
                          "a Unet/resnet18 step 1.5x faster on a CPU (README, \"What a budget buys\")."),
        click.option("--task", type=click.Choice(TASKS), default="multiclass", show_default=True,
                     help="multiclass: a softmax over background/NCR/ED/ET; binary: whole tumour vs background; "
                          "regions: three sigmoids WT/TC/ET with Dice + BCE on each (nnU-Net's region-based BraTS "
                          "training), labels drawn so that ET lies in TC in WT."),
        click.option("--loss", type=click.Choice(LOSSES), default="ce+dice", show_default=True),
        click.option("--norm", type=click.Choice(NORMALISATIONS), default="zscore", show_default=True,
                     help="Per-slice intensity normalisation over brain pixels (zscore) or max-scaling (minmax)."),
        click.option("--epochs", default=50, show_default=True, type=click.IntRange(1)),
        click.option("--max-steps", default=None, type=click.IntRange(1), help="Stop after this many optimiser steps."),
        click.option("--time-limit", default=None, type=float, metavar="MINUTES",
                     help="Train and validate for at most this many minutes (counted across --resume): the learning "
                          "rate schedule runs over the time instead of the steps, and the last epoch is cut so that "
                          "its validation ends within the budget; --epochs, --max-steps and --patience still end a "
                          "run earlier (it says so). A killed run resumes with the minutes it has left."),
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
        _VOLUME_OPTIONS["device"],
        click.option("--amp/--no-amp", default=True, show_default=True, help="Mixed precision on CUDA (bf16, else fp16)."),
        click.option("--compile/--no-compile", "compile_model", default=False, show_default=True, help="torch.compile the model."),
        click.option("--augment/--no-augment", default=True, show_default=True, help="Flips, rotations, intensity jitter."),
        click.option("--crop", default=None, type=click.IntRange(32),
                     help="Train on random NxN patches (multiple of 32, tumour-centred 2 in 3); eval sees whole slices."),
        click.option("--seed", default=0, show_default=True),
        click.option("--patience", default=5, show_default=True, type=click.IntRange(1), help="Early stopping patience, epochs."),
        click.option("--cache", type=click.Choice(CACHES), default="auto", show_default=True,
                     help="stream rows from the file, hold the splits on the device, or choose by free GPU memory."),
        click.option("--keep-last", is_flag=True,
                     help="Keep the resume state (last.pt, with the optimiser: about 3x best.pt) when the run ends, "
                          "so that `--resume RUN --epochs N` can extend it; a killed run always keeps it."),
        click.option("--quiet", is_flag=True, help="Print only the run folder; everything the run says goes to RUN/log.txt "
                                                   "(as it always does)."),
        click.option("--tensorboard", is_flag=True,
                     help="Also write every epoch's metrics and the sample picture for TensorBoard (RUN/tensorboard; "
                          "pip install 'brats2d[tensorboard]'): tensorboard --logdir runs"),
        click.option("--context", default=0, show_default=True, type=click.IntRange(0),
                     help="Feed each slice with its K neighbouring slices on each side as extra channels (2.5D); the "
                          "file must hold at least K (`brats-build build --context K`)."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def config_values(options: dict[str, Any]) -> dict[str, Any]:
    """Command-line options as FitConfig fields (absolute paths, --clip-grad 0 as none)."""
    values = dict(options)
    if "compile_model" in values:
        values["compile"] = values.pop("compile_model")
    if "clip_grad" in values:
        values["clip_grad"] = values["clip_grad"] or None
    for path in ("data", "out"):
        if values.get(path) is not None and not is_address(str(values[path])):  # an address streamed stays as given
            values[path] = str(Path(values[path]).resolve())
    return values


def make_config(data: Path, modality: str, out: Path, **options: Any) -> FitConfig:
    return FitConfig(**config_values({"data": data, "modality": modality, "out": out, **options}),
                     data_url=address_of(data))


def data_fields(data: Path | None, saved: dict[str, Any]) -> dict[str, Any]:
    """Where a run made from saved options reads: DATA if given (and the address it was fetched from), else the saved
    file, fetched again from its recorded address when the local copy is gone."""
    if data:
        return {"data": str(data) if is_address(str(data)) else str(Path(data).resolve()), "data_url": address_of(data)}
    found = run_data(saved["data"], saved.get("data_url"))
    return {"data": found if is_address(found) else str(Path(found).resolve())}


#: Options a resumed run may take anew: how long it trains (extending it), and where it runs.
RESUME_MAY_CHANGE = ("epochs", "max_steps", "time_limit", "device", "workers", "cache", "keep_last", "quiet",
                     "tensorboard")


def _given(names: list[str]) -> list[str]:
    """Which of these parameters the user typed (as opposed to their defaults)."""
    context = click.get_current_context()
    return [n for n in names if context.get_parameter_source(n) in (ParameterSource.COMMANDLINE,
                                                                    ParameterSource.ENVIRONMENT)]


def resume_config(run_dir: Path, data: Path | None, options: dict[str, Any]) -> FitConfig:
    """The resumed run's configuration: as saved, on DATA if given (the file may have moved; checked by identity),
    with --epochs / --max-steps (extending it) and where it runs taken anew; any other option given that would change
    the run is refused in one line naming it."""
    from trainer.training.runs import resume_point

    saved, _ = resume_point(run_dir)
    config = FitConfig.from_dict({**saved, **data_fields(data, saved)}, str(run_dir))
    given = config_values({name: options[name] for name in _given(list(options))})
    asked = dataclasses.replace(config, **given)
    for name in given:
        if name not in RESUME_MAY_CHANGE and getattr(asked, name) != getattr(config, name):
            flag = name.replace("_", "-")
            raise CommandError(f"--{flag} {options.get(name, getattr(asked, name))}: {run_dir} was trained with "
                           f"{flag} {getattr(config, name)}, and resuming continues it as it was (only "
                           f"{', '.join('--' + n.replace('_', '-') for n in RESUME_MAY_CHANGE)} may change); start a "
                           f"new run to change it: brats-train fit --config {run_dir / 'config.json'} --{flag} ...")
    return asked


def config_from_file(path: Path, data: Path | None, options: dict[str, Any]) -> FitConfig:
    """A new run with the options of a saved config.json, on DATA if given (else the file it names), the options
    given here overriding the file's."""
    from trainer.training.runs import read_config

    saved = read_config(path)
    keep = {k: v for k, v in saved.items() if k not in ("axis_codes", "voxel_size", "slice_shape", "plane",
                                                        "slice_axis", "data_sha256", "data_id")}  # bound anew
    config = FitConfig.from_dict({**keep, **data_fields(data, saved)}, str(path))
    return dataclasses.replace(config, **config_values({name: options[name] for name in _given(list(options))}))


@main.command()
@click.argument("data", type=ArtifactFile(), required=False)
@stream_option
@click.option("--modality", "-m", type=click.Choice(MODALITY_CHOICES, case_sensitive=False), required=False,
              default=None, help="t1n, t1c, t2w, t2f (or t1, t1ce/t1gd, t2, flair), or all (early fusion).")
@fit_options
@click.option("--out", default=Path("runs"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--name", default=None, help="Run folder prefix (default: the modality).")
@click.option("--folds", default=None, type=click.IntRange(2, MAX_FOLDS),
              help="Cross-validation: group the train and val patients into this many folds (stable keyed ranks; "
                   "the test patients never enter) and train on all but --fold, validating on it.")
@click.option("--fold", default=None, type=click.IntRange(0), help="With --folds: the fold held out (0 to folds-1).")
@click.option("--config", "config_file", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="Train a new run with the options of this config.json (a run's): the options given here override "
                   "it, and DATA, if given, replaces the file it names.")
@click.option("--resume", default=None, type=click.Path(file_okay=False, path_type=Path),
              help="Continue the run in this folder (from its last.pt) as it was trained; --epochs N extends a run "
                   "that finished with --keep-last. DATA may be given if the file moved (held to the run's by its id).")
@one_line_errors
def fit(data: Path | None, modality: str | None, resume: Path | None, config_file: Path | None,
        **options: Any) -> None:
    """Train one model on DATA (an .h5 file from brats-build, or its address: https://, s3://, hf://... with
    #sha256=<hex>, fetched once into ~/.cache/brats2d or $BRATS2D_CACHE) and leave a run folder under --out."""
    from trainer.training.loop import fit as run_fit

    if resume is not None and config_file is not None:
        raise click.UsageError("--resume continues a run, --config starts a new one from a run's options: give one")
    if modality is not None:
        options["modality"] = modality
    if resume is not None:
        config = resume_config(resume, data, options)
    elif config_file is not None:
        config = config_from_file(config_file, data, options)
    else:
        if data is None:
            raise click.UsageError("give DATA (an .h5 file from brats-build), or --config / --resume")
        if modality is None:
            raise click.UsageError("--modality is required (t1n, t1c, t2w, t2f, their aliases, or all)")
        config = make_config(data, **options)
    run_dir = run_fit(config, resume)
    click.echo(f"run folder: {run_dir}")


def volume_options(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add the named ``_VOLUME_OPTIONS`` to a command, handed to it together as ``volume`` (a ``VolumeOptions``)."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(command)
        def run(*args: Any, **kwargs: Any) -> Any:
            return command(*args, volume=VolumeOptions(**{name: kwargs.pop(name) for name in names}), **kwargs)

        for name in reversed(names):
            run = _VOLUME_OPTIONS[name](run)
        return run

    return decorate


def ensemble_option(command: Callable[..., Any]) -> Callable[..., Any]:
    return click.option("--ensemble", multiple=True, type=click.Path(file_okay=False, path_type=Path),
                        help="Average in this run's probabilities too (repeatable; a folder of runs adds all of them): "
                             "other planes, folds or seeds, each segmenting with its own plane and context. Runs must "
                             "share the task, modalities, orientation and voxel size.")(command)


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
@stream_option
@click.option("--data", default=None, type=ArtifactFile(),
              help="The run's .h5 file if it moved, or its address (checked by its build id: a rebuilt file is "
                   "refused).")
@click.option("--other-data", is_flag=True,
              help="Score --data even though it is not the file the run trained on (said in the outputs).")
@click.option("--volumes", "volumes_dir", default=None, type=click.Path(path_type=Path),
              help="The BraTS folder the artifact was built from: segment each case of the split over its whole "
                   "volume and score it as BraTS 2023 does (lesion-wise Dice and HD95, legacy Dice, HD95, "
                   "sensitivity, specificity).")
@click.option("--limit", default=None, type=click.IntRange(1), help="With --volumes: score only the first N cases.")
@ensemble_option
@volume_options("tta", "clean", "device", "checkpoint")
@click.option("--choose-clean-up", "choose", is_flag=True,
              help="With --volumes on the val split: try each clean-up rule of trainer/scoring/cleanup.py's "
                   "REGION_FAMILY on these patients, region by region (components dropped by size, share of the "
                   "largest, or confidence: the region's maximum or mean probability over them), keep each region's "
                   "best by mean lesion-wise Dice and store the result in the run (clean_up.json), where later "
                   "evaluate and predict find it. Refused on the test split.")
@click.option("--calibrate", is_flag=True,
              help="With --volumes on the val split: fit one temperature per output (each region's sigmoid, or the "
                   "softmax) on these patients' voxels inside the brain and store it in the run (calibration.json, "
                   "with the expected calibration error before and after, and calibration.png), where later "
                   "evaluate, predict and ensembles of the same members use it. Labels never move. Refused on test.")
@click.option("--report", "with_report", is_flag=True,
              help="With --volumes: also write <split>_volumes.html, one self-contained page to open offline: the "
                   "run and data, a sortable table of every patient, the worst patients first with axial, coronal "
                   "and sagittal views through the tumour (truth, prediction, errors, uncertainty), the definitions; "
                   "the CSV adds each patient's Dice of the voxels above and below its median uncertainty.")
@one_line_errors
def evaluate_command(run_dir: Path, split: str, data: Path | None, other_data: bool, volumes_dir: Path | None,
                     limit: int | None, ensemble: tuple[Path, ...], volume: VolumeOptions, choose: bool,
                     calibrate: bool, with_report: bool) -> None:
    """Evaluate a run's checkpoint on a split (a fold run's val split is its held-out fold).

    Per slice on the artifact's rows: <split>_metrics.json and <split>_cases.csv. With --volumes, per patient on
    whole volumes (with --ensemble runs averaged in, --tta mirrored): <split>_volumes.csv (a row per case) and
    <split>_volumes.json (means with 95% intervals), marked _ensemble / _tta when they apply.
    """
    from trainer.commands.evaluate import evaluate_run, evaluate_volumes

    if volumes_dir is None and (ensemble or volume.tta or choose or with_report or calibrate):
        raise click.UsageError("--ensemble, --tta, --choose-clean-up, --calibrate and --report segment whole volumes: "
                               "give --volumes DIR")
    if volumes_dir is None:
        result = evaluate_run(run_dir, split, data, volume, other_data=other_data)
        shown = " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))
        click.echo(f"{run_dir} on {split} ({result['slices']} slices, per-slice 2D scores; data: "
                   f"{result['data_check']}): {shown}")
        click.echo(f"wrote {run_dir / f'{split}_metrics.json'} and {run_dir / f'{split}_cases.csv'}")
        return
    report = evaluate_volumes(run_dir, volumes_dir, split, data, volume, limit=limit, other_data=other_data,
                              ensemble=ensemble, choose=choose, with_report=with_report, calibrate=calibrate)
    for line in report["skipped"]:
        click.echo(f"skipped {line['case_id']}: {line['reason']}")
    subset = f", {report['subset']}" if report["subset"] else ""
    click.echo(f"models: {report['models']}; {report['clean_up_note']}")
    click.echo(f"{run_dir} on {report['cases_scored']} whole {split} volumes{subset} (data: {report['data_check']}): "
               f"{format_scores(report['metrics'])}")
    if calibrate:
        click.echo(f"calibration: {report['calibration']}; stored in the run for later evaluate, predict and "
                   "ensembles of these members (labels never move)")
    click.echo(f"wrote {', '.join(report['outputs'])}")
    if report["skipped"]:
        raise SystemExit(1)


@main.command()
@click.argument("data", type=ArtifactFile())
@stream_option
@fit_options
@click.option("--out", default=Path("runs/compare"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reuse", is_flag=True, help="Keep runs already finished in --out instead of training them again.")
@click.option("--volumes", "volumes_dir", default=None, type=click.Path(path_type=Path),
              help="The BraTS folder the artifact was built from: also score all seven approaches on the test cases' "
                   "whole volumes (BraTS 2023 lesion-wise and legacy scores, fusion voxel by voxel) with paired "
                   "differences from the best.")
@click.option("--volume-cases", default=None, type=click.IntRange(1),
              help="With --volumes: score only the first N test cases (said in the table).")
@volume_options("tta", "clean")
@click.option("--report", "with_report", is_flag=True,
              help="With --volumes: also write comparison_volumes.html, one self-contained page to open offline "
                   "(as `evaluate --report`: the approaches' scores, every patient's table, the worst first with "
                   "three views of each approach's mask beside the truth, the definitions).")
@one_line_errors
def compare(data: Path, out: Path, reuse: bool, volumes_dir: Path | None, volume_cases: int | None,
            volume: VolumeOptions, with_report: bool, **options: Any) -> None:
    """Train t1n, t1c, t2w, t2f and all four (early fusion) alike, fuse the four late (vote and mean),
    and score all seven on the test split: comparison.md/.csv/.png/.gif in --out (with --volumes, also
    comparison_volumes.csv/.json, the whole-volume scores per patient, and with --report their HTML page)."""
    from trainer.commands.compare import compare as run_compare

    run_compare(make_config(data, "all", out, **options), out, reuse, volumes_dir=volumes_dir, volume_cases=volume_cases,
                options=volume, with_report=with_report)


@main.command(name="cross-validate")
@click.argument("data", type=ArtifactFile())
@stream_option
@click.option("--folds", default=5, show_default=True, type=click.IntRange(2, MAX_FOLDS),
              help="Folds over the train and val patients (stable keyed ranks; the test patients never enter).")
@click.option("--modality", "-m", type=click.Choice(MODALITY_CHOICES, case_sensitive=False), default="all",
              show_default=True)
@fit_options
@click.option("--out", default=Path("runs/cv"), show_default=True, type=click.Path(file_okay=False, path_type=Path))
@click.option("--reuse", is_flag=True, help="Keep fold runs already finished in --out instead of training them again.")
@click.option("--volumes", "volumes_dir", default=None, type=click.Path(path_type=Path),
              help="The BraTS folder the artifact was built from: segment every patient with the fold run that held "
                   "it out and score the out-of-fold predictions (oof_volumes.csv/.json, oof.md).")
@volume_options("tta", "clean")
@click.option("--choose-clean-up", "choose", is_flag=True,
              help="With --volumes: choose the clean-up on the out-of-fold predictions (each fold scored with the "
                   "rule chosen on the others; every fold run stores the rule chosen on all of them).")
@click.option("--report", "with_report", is_flag=True,
              help="With --volumes: also write oof_volumes.html, one self-contained page of the out-of-fold patients "
                   "(as `evaluate --report`: the table, the worst first with three views, the definitions).")
@one_line_errors
def cross_validate_command(data: Path, folds: int, modality: str, out: Path, reuse: bool, volumes_dir: Path | None,
                           volume: VolumeOptions, choose: bool, with_report: bool, **options: Any) -> None:
    """Train all K fold runs of DATA (OUT/fold-0 ... fold-K-1), each validating on its held-out patients, and score
    the out-of-fold predictions on whole volumes: one table of every train and val patient, each segmented by the
    run that never saw it. The fold runs then form an ensemble: `brats-train predict OUT CASES --out DIR`."""
    from trainer.commands.crossval import cross_validate

    report = cross_validate(make_config(data, modality, out, **options), folds, out, reuse, volumes_dir, volume,
                            choose, with_report)
    if "metrics" in report:
        click.echo(f"{report['patients_scored']} out-of-fold patients: {format_scores(report['metrics'])}")
        html = f", {out / 'oof_volumes.html'}" if with_report else ""
        click.echo(f"wrote {out / 'oof.md'}, {out / 'oof_volumes.csv'}{html} and {out / 'oof_volumes.json'}")
    else:
        click.echo(f"trained {len(report['runs'])} fold runs in {out}")


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.argument("inputs", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for <case-id>.nii.gz (and <case-id>.npz with --save-probabilities).")
@ensemble_option
@volume_options("tta", "clean", "device", "checkpoint")
@click.option("--labels", "convention", type=click.Choice(LABEL_CONVENTIONS), default="auto", show_default=True,
              help="How enhancing tumour is written: auto = as the input's naming expects (4 for 2018-2021 names such "
                   "as BraTS2021_00000, 3 for the 2023 family); brats2023 = always 3; brats2021 = always 4.")
@click.option("--save-probabilities", is_flag=True,
              help="Also write <case-id>.npz: float16 probabilities (outputs, X, Y, Z) in the input's voxel order, "
                   "their names and the affine.")
@click.option("--save-uncertainty", is_flag=True,
              help="Also write <case-id>_uncertainty.nii.gz: each voxel's entropy of the mean probabilities, 0 (certain) "
                   "to 1 (a uniform guess), float32 in the input's space and header; for an ensemble also "
                   "<case-id>_disagreement.nii.gz, the members' mutual information. Scored cases add the Dice of the "
                   "voxels above and below the median uncertainty (dice_WT_uncertain, dice_WT_certain, ...).")
@click.option("--overwrite", is_flag=True, help="Predict cases whose output already exists again (default: skip them).")
@one_line_errors
def predict(run_dir: Path, inputs: tuple[Path, ...], out: Path, ensemble: tuple[Path, ...], volume: VolumeOptions,
            convention: str, save_probabilities: bool, save_uncertainty: bool, overwrite: bool) -> None:
    """Segment every brain slice of new cases with the model in RUN_DIR (or an ensemble it leads).

    INPUTS are BraTS case folders or folders holding them (every case found, as `brats-build build` finds them).
    Volumes in another orientation are reoriented for the model (nibabel) and each mask is written in the input's
    own space as <case-id>.nii.gz (never the ground truth's -seg name) with the source affine and header; it opens
    in ITK-SNAP or 3D Slicer over the images. Cases with a seg file are also scored as BraTS 2023 scores them
    (predict_scores.csv). A mask already in --out is kept unless --overwrite: when its header says these models,
    options and inputs wrote it (a rerun after a kill), it is scored again with the rest, so the table holds every
    case; else the case is refused. A case that cannot be read or matched is listed and skipped, the others are
    written.
    """
    from trainer.commands.predict import predict_cases

    reports, skipped, segmenter = predict_cases(run_dir, list(inputs), out, volume, ensemble=ensemble,
                                                labels=convention, save_probabilities=save_probabilities,
                                                overwrite=overwrite, save_uncertainty=save_uncertainty)
    click.echo(f"models: {segmenter.describe()}; {segmenter.rule_note}")
    for report in reports:
        scores = f"; {format_scores(report)}" if "score_seconds" in report else ""
        if report["written"] == "now":
            speed = f"{report['brain_slices']} brain slices at {report['slices_per_second']:.1f} slices/s"
            click.echo(f"{report['case_id']}: wrote {report['output']} ({speed}){scores}")
        else:
            click.echo(f"{report['case_id']}: kept {report['output']}, written before by these models{scores}")
    for line in skipped:
        click.echo(f"skipped {line['case_id']}: {line['reason']}")
    scored = sum("score_seconds" in r for r in reports)
    before = sum(r["written"] == "before" for r in reports)
    click.echo(f"{len(reports)} cases in {out} ({before} written before), {scored} scored"
               + (f" in {out / 'predict_scores.csv'}" if scored else "") + f"; {len(skipped)} skipped")
    if any(line["kind"] == "error" for line in skipped):
        raise SystemExit(1)


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), required=True,
              help="torchscript: torch.jit, loads with torch alone; onnx: onnxruntime, TensorRT, ... (pip install "
                   "'brats2d[export]').")
@click.option("--out", default=None, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write (default RUN_DIR/model.pt or model.onnx); a JSON sidecar goes beside it.")
@volume_options("checkpoint")
@one_line_errors
def export(run_dir: Path, fmt: str, out: Path | None, volume: VolumeOptions) -> None:
    """Export the network of RUN_DIR for other runtimes, with a JSON sidecar naming its input channels (in order),
    normalisation and outputs. The graph takes normalised (N, C, H, W) slices, H and W multiples of 32, and returns
    logits; it does not read NIfTI or clean up (use `brats-train predict` for whole volumes)."""
    from trainer.commands.export import export_model

    written, sidecar = export_model(run_dir, fmt, out, volume.checkpoint)
    click.echo(f"wrote {written} and {sidecar}")

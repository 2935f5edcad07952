"""The epoch loop: one model on one modality (or all four as channels), streaming from the artifact.

What one step does lives in ``trainer.step``, where batches come from in ``trainer.pipeline``, the options in
``trainer.config``; this module runs epochs, validates, keeps the history and the checkpoints.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from builder import __version__
from builder.progress import Progress
from trainer.board import Board, board
from trainer.config import FitConfig, FitError, default_batch_size, resolve_device
from trainer.data import Artifact
from trainer.distributed import World, barrier, broadcast_buffers, broadcast_object, init_world, shutdown
from trainer.metrics import SegmentationMetrics
from trainer.model import build_model, checkpoint_of, read_checkpoint, save_checkpoint
from trainer.pipeline import Batches, autocast_dtype, choose_cache, make_source, open_artifact
from trainer.reports import BackgroundWriter, OutputError, write_csv, write_text
from trainer.runs import CONFIG_FILE, CONFIG_VERSION, held, new_run_dir
from trainer.step import Optimiser, evaluate, make_loss, train_step

#: Learning curves are redrawn at most this often (and at the end): a plot costs about 0.26 s.
PLOT_EVERY_SECONDS = 30.0
#: The validation score that chooses best.pt and early stopping.
SCORE_KEY = "val_dice_mean"


LOG_FILE = "log.txt"


class RunLog:
    """What a run says: printed (unless quiet) and appended to RUN/log.txt, so a batch job's log is never the only
    copy. Ranks other than 0 say nothing."""

    def __init__(self, path: Path | None, quiet: bool) -> None:
        self.path, self.quiet = path, quiet

    def __call__(self, text: str) -> None:
        if self.path is None:
            return
        if not self.quiet:
            print(text, flush=True)
        try:
            with open(self.path, "a") as handle:
                handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {text}\n")
        except OSError as error:
            raise OutputError(f"{self.path}: could not be written ({error.strerror or error}); free some space or "
                              "choose a writable --out") from None

    def stopped(self, error: BaseException) -> None:
        """Record why the run ended early (the command line shows it too)."""
        if self.path is not None and self.path.parent.is_dir():
            try:
                with open(self.path, "a") as handle:
                    handle.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} stopped: {type(error).__name__}: "
                                 f"{str(error).splitlines()[0] if str(error) else ''}\n")
            except OSError:
                pass  # the error being reported matters more


class History:
    """metrics.csv: one row per epoch, every metric for train and val (rewritten whole each epoch)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        self.damaged: int | None = None  # the first line that could not be read back, if any
        if path.is_file():
            self._read()

    def _read(self) -> None:
        """Read the rows back, numbers as they were written (an epoch stays an integer); reading stops at a damaged
        line (a file cut mid-row by hand or a failing disk), which ``damaged`` names."""
        try:
            with open(self.path, newline="") as handle:
                for line, row in enumerate(csv.DictReader(handle), start=2):
                    try:
                        self.rows.append({k: _number(v) for k, v in row.items()})
                    except (TypeError, ValueError):
                        self.damaged = line
                        return
        except (OSError, UnicodeDecodeError, csv.Error):
            self.damaged = 1

    def truncate(self, last_epoch: int) -> None:
        """Keep the rows up to ``last_epoch`` (those the resume state goes with)."""
        self.rows = [row for row in self.rows if row["epoch"] <= last_epoch]
        self._write()

    def add(self, row: dict[str, float]) -> None:
        self.rows.append(row)
        self._write()

    def amend_last(self, **values: float) -> None:
        """Fill in what is known only after the row was logged (the epoch's checkpoint and plot time)."""
        self.rows[-1] |= values
        self._write()

    def _write(self) -> None:
        if self.rows:
            write_csv(self.path, self.rows)
        else:
            self.path.unlink(missing_ok=True)


def _number(text: str | None) -> float | int:
    """A metrics.csv cell: an integer when it was written as one, else a float (nan included)."""
    if text is None or text == "":
        raise ValueError("a missing cell")
    return int(text) if text.lstrip("-").isdigit() else float(text)


def fit(config: FitConfig, resume: Path | None = None, run_dir: Path | None = None) -> Path:
    """Train as configured (or continue the run in ``resume``); returns the run directory.

    ``run_dir`` names the (new, empty) run folder; by default it is ``<out>/<name or modality>-<time>``.
    """
    device = resolve_device(config.device)
    world = init_world(device.type)
    try:
        return _fit(config, device, world, resume, run_dir)
    finally:
        shutdown(world)


def fit_each(configs: dict[str, FitConfig], artifact: Artifact, out: Path, reuse: bool) -> dict[str, Path]:
    """Train each configuration into ``out/<name>`` (or, with ``reuse``, keep a finished run there); a run kept must
    have trained on ``artifact`` itself and as asked (the same folds), checked before anything is trained."""
    runs = {}
    for name, config in configs.items():
        run_dir = out / name
        if (run_dir / "best.pt").is_file() and reuse:
            saved = read_checkpoint(run_dir / "best.pt")["config"]
            artifact.check_identity(saved.get("data_id"), saved.get("data_sha256"))
            if (saved.get("folds"), saved.get("fold")) != (config.folds, config.fold):
                raise FitError(f"{run_dir}: trained on fold {saved.get('fold')} of {saved.get('folds')}, not fold "
                               f"{config.fold} of {config.folds}; choose another --out")
            print(f"reusing {run_dir}", flush=True)
        elif run_dir.exists() and any(run_dir.iterdir()):
            if reuse:
                raise FitError(f"{run_dir}: an unfinished run; resume it (brats-train fit --resume {run_dir}) or "
                               "delete it, then run this again")
            raise FitError(f"{run_dir} exists: pass --reuse to keep finished runs, or choose another --out")
        runs[name] = run_dir
    for name, config in configs.items():
        if not (runs[name] / "best.pt").is_file():
            fit(config, run_dir=runs[name])
    return runs


def _bind_to_data(config: FitConfig, artifact: Artifact, device: torch.device, world: World,
                  resume: Path | None) -> FitConfig:
    """The configuration completed from the artifact (geometry, identity, default batch size); a resumed run must
    continue on the very file it started on."""
    if resume is not None:
        artifact.check_identity(config.data_id, config.data_sha256)
        return config
    train_rows = len(artifact.rows_of("train"))
    sha256 = broadcast_object(artifact.sha256() if world.is_main else None, world)
    return dataclasses.replace(
        config, plane=artifact.plane, slice_axis=artifact.slice_axis,
        axis_codes=list(artifact.axis_codes), voxel_size=list(artifact.voxel_size),
        slice_shape=list(artifact.slice_shape), data_sha256=sha256, data_id=artifact.data_id,
        batch_size=config.batch_size or default_batch_size(device, train_rows),
    )


def _fit(config: FitConfig, device: torch.device, world: World, resume: Path | None, run_dir: Path | None) -> Path:
    artifact = open_artifact(config)
    config = _bind_to_data(config, artifact, device, world, resume)
    train_rows = artifact.rows_of("train")
    artifact.rows_of("val")
    assert config.batch_size is not None
    if config.batch_size > len(train_rows):
        raise FitError(f"--batch-size {config.batch_size} is larger than the train split ({len(train_rows)} rows)")
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.encoder, config.encoder_weights, config.in_channels, config.classes)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    amp_dtype = autocast_dtype(device, config.amp)
    use_cache = choose_cache(config, artifact, device)
    train_source = make_source(config, artifact, "train", True, device, world, use_cache)
    val_source = make_source(config, artifact, "val", False, device, world, use_cache)
    steps_per_epoch = len(train_source)  # type: ignore[arg-type]
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    optimiser = Optimiser.create(model, config, device, amp_dtype, int(total_steps), steps_per_epoch)
    network: nn.Module = model
    if world.distributed:
        network = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)
    if config.compile:
        network = torch.compile(network)
    if world.is_main:
        run_dir = resume or _make_folder(run_dir) or new_run_dir(Path(config.out), config.name or config.modality)
    run_dir = Path(broadcast_object(str(run_dir) if world.is_main else None, world))  # type: ignore[arg-type]
    with held(run_dir) if world.is_main else nullcontext():
        log = RunLog(run_dir / LOG_FILE if world.is_main else None, config.quiet or not world.is_main)
        run = Session(config, {"epoch": -1, "step": 0, "best_score": -math.inf, "bad_epochs": 0}, model, network,
                      optimiser, train_source, val_source, Batches(config, artifact.slice_shape, device),
                      make_loss(config.loss, config.task).to(device), amp_dtype, artifact, world,
                      History(run_dir / "metrics.csv"), run_dir, BackgroundWriter(), log,
                      board(run_dir) if config.tensorboard and world.is_main else None)
        try:
            if resume is not None:
                _continue(run, device)
            if world.is_main:
                _announce(run, len(train_rows), use_cache, device)
            try:
                _epochs(run)
                run.writer.wait()
            finally:
                run.writer.close(failing=sys.exc_info()[0] is not None)
            if world.is_main:
                if not config.keep_last:  # the run is over: the resume state (the optimiser's, 2x the weights) goes
                    (run_dir / "last.pt").unlink(missing_ok=True)
                _plot_samples(run_dir, artifact, run.batches)
                if run.board is not None:
                    run.board.picture(run_dir / "samples.png")
        except (Exception, KeyboardInterrupt) as error:
            log.stopped(error)
            raise
        finally:
            if run.board is not None:
                run.board.close()
    barrier(world)
    return run_dir


def _make_folder(run_dir: Path | None) -> Path | None:
    """``run_dir``, made if it is not there yet (compare and the benchmarks name their runs' folders)."""
    if run_dir is not None:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise OutputError(f"{run_dir}: could not be created ({error.strerror or error})") from None
    return run_dir


def _continue(run: Session, device: torch.device) -> None:
    """Load the resume state into ``run`` (a run killed before its first checkpoint starts from its first epoch)."""
    if run.history.damaged is not None:
        run.log(f"{run.history.path}: line {run.history.damaged} is damaged; the rows before it are kept")
    state_file = run.run_dir / "last.pt"
    if state_file.is_file():
        checkpoint = read_checkpoint(state_file, device, resume=True)
        run.model.load_state_dict(checkpoint["model"])
        run.optimiser.load_state_dict(checkpoint)
        run.state = {k: checkpoint[k] for k in run.state}
        if run.state["bad_epochs"] >= run.config.patience and run.state["epoch"] < run.config.epochs - 1:
            run.state["bad_epochs"] = 0  # an early-stopped run extended with --epochs: its patience starts again
    if run.world.is_main:
        run.history.truncate(run.state["epoch"])


def _announce(run: Session, train_rows: int, use_cache: bool, device: torch.device) -> None:
    """config.json (every option, absolute paths, the data's provenance) and the run's first line."""
    config, artifact, world = run.config, run.artifact, run.world
    config_json = {**config.to_dict(), "config_version": CONFIG_VERSION, "brats2d_version": __version__,
                   "artifact": _provenance(artifact), "world_size": world.size}
    write_text(run.run_dir / CONFIG_FILE, json.dumps(config_json, indent=2, default=str))
    if config.crop and config.crop >= min(artifact.slice_shape):
        run.log(f"--crop {config.crop}: not smaller than the {artifact.slice_shape[0]}x{artifact.slice_shape[1]} "
                "slices, so training sees whole slices")
    run.log(f"run {run.run_dir}: {config.modality} ({', '.join(config.channels)}"
          f"{f', each with {config.context} slice(s) on each side' if config.context else ''}; {config.plane}"
          f"{f'; fold {config.fold} of {config.folds}' if config.folds else ''}), {config.task}, "
          f"{config.arch}/{config.encoder}, {train_rows} train rows, batch {config.batch_size}, "
          f"data {'held on the device' if use_cache else 'streamed from the file'}"
          f", device {device}{f' x{world.size}' if world.distributed else ''}")


@dataclass
class Session:
    """Everything a run holds while its epochs go by."""

    config: FitConfig
    state: dict[str, Any]  # epoch, step, best_score, bad_epochs: saved in last.pt
    model: nn.Module  # the plain model (evaluated, saved)
    network: nn.Module  # what trains: the model, maybe wrapped by DDP and torch.compile
    optimiser: Optimiser
    train_source: Iterable
    val_source: Iterable
    batches: Batches
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None
    artifact: Artifact
    world: World
    history: History
    run_dir: Path
    writer: BackgroundWriter
    log: RunLog
    board: Board | None = None  # TensorBoard, with --tensorboard


def _epochs(run: Session) -> None:
    """Train and validate epoch by epoch until ``config.epochs``, ``max_steps`` or early stopping."""
    config, state, world, history, optimiser, model = run.config, run.state, run.world, run.history, run.optimiser, run.model
    last_plot = -math.inf
    for epoch in range(state["epoch"] + 1, config.epochs):
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
        started = time.perf_counter()
        torch.manual_seed(config.seed + epoch)
        run.train_source.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        # per rank: under DDP each rank crops and augments its own rows differently
        generator = torch.Generator(device=run.batches.device).manual_seed(config.seed * 1000 + epoch + 7919 * world.rank)
        lr = optimiser.lr
        train_metrics = _train_epoch(run.network, run.train_source, run.batches, run.loss_fn, optimiser, run.amp_dtype,
                                     generator,
                                     state, f"epoch {epoch + 1}/{config.epochs}", world.is_main and not config.quiet)
        train_metrics.all_reduce()
        train_seconds = time.perf_counter() - started
        run.artifact.check_unchanged()  # every rank, every epoch: never validate on rows of another file
        # the unwrapped model: a rank with no validation rows must not wait in DDP's buffer broadcast
        broadcast_buffers(model, world)
        val_metrics = evaluate(model, run.val_source, run.batches, run.amp_dtype)
        val_metrics.all_reduce()
        val_seconds = time.perf_counter() - started - train_seconds
        row = {"epoch": epoch, "step": state["step"], "lr": lr, "train_seconds": round(train_seconds, 3),
               "val_seconds": round(val_seconds, 3), "train_images_per_s": round(train_metrics.slices / train_seconds, 2)}
        row |= {f"train_{k}": v for k, v in train_metrics.compute().items()}
        row |= {f"val_{k}": v for k, v in val_metrics.compute().items()}
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
            raise FitError(f"epoch {epoch + 1}: the loss is no longer finite (train {row['train_loss']}, val "
                           f"{row['val_loss']}); stopped before saving this epoch, {run.run_dir / 'best.pt'} holds the "
                           f"best finite one. Lower --lr (now {config.lr:g}) or keep --clip-grad on")
        improved = row[SCORE_KEY] > state["best_score"]
        state["best_score"] = max(state["best_score"], row[SCORE_KEY])
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        early_stop = state["bad_epochs"] >= config.patience
        final = early_stop or epoch == config.epochs - 1 or state["step"] >= (config.max_steps or math.inf)
        if world.is_main:
            history.add(row | {"other_seconds": math.nan, "seconds": math.nan})  # logged before its checkpoint
            best = checkpoint_of(model, config.to_dict()) if improved else None  # what inference needs
            # what resuming needs; a run that ends here drops it (unless --keep-last): the previous one serves a kill
            keep = not final or config.keep_last
            last = checkpoint_of(model, config.to_dict(), **optimiser.state_dict(), **state) if keep else None
            plot = final or time.perf_counter() - last_plot >= PLOT_EVERY_SECONDS
            last_plot = time.perf_counter() if plot else last_plot
            run.writer.submit(_write_epoch, run.run_dir, best, last, [dict(r) for r in history.rows] if plot else None)
            history.amend_last(other_seconds=round(time.perf_counter() - started - train_seconds - val_seconds, 3),
                               seconds=round(time.perf_counter() - started, 3))
            run.log(_summary_line(history.rows[-1], improved))
            if run.board is not None:
                run.board.epoch(history.rows[-1])
        barrier(world)
        if early_stop:
            run.log(f"early stop: no better {SCORE_KEY} for {config.patience} epochs")
            break


def _write_epoch(run_dir: Path, best: dict[str, Any] | None, last: dict[str, Any] | None,
                 rows: list[dict[str, float]] | None) -> None:
    """An epoch's outputs, on the background writer: best.pt when it improved, last.pt unless the run ends here,
    and the curves if due."""
    if best is not None:
        save_checkpoint(run_dir / "best.pt", best)
    if last is not None:
        save_checkpoint(run_dir / "last.pt", last)
    if rows is not None:
        _plot_curves(rows, run_dir)


def _train_epoch(network: nn.Module, source: Iterable, batches: Batches, loss_fn: nn.Module, optimiser: Optimiser,
                 amp_dtype: torch.dtype | None, generator: torch.Generator, state: dict[str, Any], desc: str,
                 show: bool) -> SegmentationMetrics:
    """One pass over the training batches (stops early at ``max_steps``); metrics of the inputs trained on."""
    config = batches.config
    metrics = SegmentationMetrics(config.task, batches.device)
    network.train()
    bar = Progress(source, desc, unit="batch", show=show, leave=False)
    for images, labels, _ in bar:
        logits, target, loss = train_step(network, batches, images, labels, generator, loss_fn, optimiser, amp_dtype)
        metrics.update(logits, target, loss)
        state["step"] += 1
        if state["step"] % 10 == 1:
            bar.note(f"loss {loss.item():.4f}")  # a device sync: only every tenth step
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
    return metrics


def _provenance(artifact: Artifact) -> dict[str, Any]:
    keep = ("format_version", "builder_version", "created", "seed", "source", "slice_rule", "cases_written",
            "background_slices", "split_unit", "axis_codes", "voxel_size", "data_id")
    return {"path": str(artifact.path.resolve()), "rows": artifact.rows,
            **{k: artifact.provenance.get(k) for k in keep}}


def _summary_line(row: dict[str, float], improved: bool) -> str:
    regions = " ".join(f"{k[9:]} {v:.3f}" for k, v in row.items() if k.startswith("val_dice_") and k != "val_dice_mean")
    return (f"epoch {int(row['epoch']) + 1}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"PA {row['val_pixel_accuracy']:.4f} mIoU {row['val_mean_iou']:.3f} MSE {row['val_mse']:.4f} "
            f"Dice {regions} mean {row['val_dice_mean']:.3f} ({row['seconds']:.1f} s: train {row['train_seconds']:.1f} s "
            f"at {row['train_images_per_s']:.1f} img/s, val {row['val_seconds']:.1f} s, other {row['other_seconds']:.2f} s)"
            f"{' *best' if improved else ''}")


def _plot_curves(rows: list[dict[str, float]], run_dir: Path) -> None:
    from trainer.plots import plot_curves

    if rows:
        plot_curves(rows, run_dir / "curves.png")


def _plot_samples(run_dir: Path, artifact: Artifact, batches: Batches) -> None:
    from trainer.plots import plot_samples

    best = run_dir / "best.pt"
    if best.is_file():
        plot_samples(best, artifact, batches, run_dir / "samples.png")

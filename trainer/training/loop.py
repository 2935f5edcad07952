"""The epoch loop: one model on one modality (or all four as channels), streaming from the artifact.

``fit`` sets a run up (data, model, optimiser, run folder) and ``_epochs`` runs it, top to bottom: train an epoch,
validate, log the row, hand the checkpoints to the background writer. What one step does lives in
``trainer.training.step``, where batches come from in ``trainer.data.inputs``, the options in ``trainer.config``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from builder import __version__
from builder.progress import Progress
from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.data.inputs import NetworkInputs, choose_cache, make_source, open_artifact
from trainer.device import autocast_dtype, channels_last, default_batch_size, resolve_device
from trainer.errors import CommandError, OutputError
from trainer.outputs import BackgroundWriter, write_text
from trainer.training.board import Board, board
from trainer.training.clock import RunClock
from trainer.training.distributed import (
    World,
    agreed,
    barrier,
    broadcast_buffers,
    broadcast_object,
    init_world,
    shutdown,
)
from trainer.training.history import LOG_FILE, History, RunLog
from trainer.training.metrics import SegmentationMetrics
from trainer.training.model import build_model, checkpoint_of, read_checkpoint, save_checkpoint
from trainer.training.runs import CONFIG_FILE, held, new_run_dir
from trainer.training.step import Optimiser, evaluation_pass, make_loss, train_step

#: Learning curves are redrawn at most this often (and at the end): a plot costs about 0.26 s.
PLOT_EVERY_SECONDS = 30.0
#: The validation score that chooses best.pt and early stopping.
SCORE_KEY = "val_dice_mean"

#: Called on rank 0 with each epoch's metrics.csv row once it is logged, before that epoch's checkpoints are written;
#: what it raises stops the run there, as a kill at that moment would (tests use it to stop runs).
EpochHook = Callable[[dict[str, float]], None]


@dataclass
class TrainingState:
    """Where a run stands; saved in last.pt, so that a resumed run continues exactly where it stopped."""

    epoch: int = -1  # the last epoch done
    step: int = 0
    best_score: float = -math.inf
    bad_epochs: int = 0  # epochs since the score last improved
    seconds: float = 0.0  # spent training and validating, what --time-limit counts

    def record(self, epoch: int, score: float) -> bool:
        """Count ``epoch`` as done with validation ``score``; returns whether it is the best so far."""
        improved = score > self.best_score
        self.best_score = max(self.best_score, score)
        self.bad_epochs = 0 if improved else self.bad_epochs + 1
        self.epoch = epoch
        return improved


@dataclass
class Learner:
    """What trains: the model (evaluated and saved), the network that trains it (the model, maybe wrapped by DDP and
    torch.compile), the optimiser, the loss and the autocast precision."""

    model: nn.Module
    network: nn.Module
    optimiser: Optimiser
    loss_fn: nn.Module
    amp_dtype: torch.dtype | None
    clock: RunClock  # --time-limit: the schedule and the last epoch follow it


@dataclass
class BatchSources:
    """Where the run's batches come from, and how they become network inputs on the device."""

    artifact: Artifact
    train: Iterable
    val: Iterable
    inputs: NetworkInputs


@dataclass
class Record:
    """What the run writes: RUN/metrics.csv, log.txt, checkpoints and curves (on one background thread), TensorBoard."""

    run_dir: Path
    history: History
    log: RunLog
    writer: BackgroundWriter
    board: Board | None


def fit(config: FitConfig, resume: Path | None = None, run_dir: Path | None = None,
        on_epoch_end: EpochHook | None = None) -> Path:
    """Train as configured (or continue the run in ``resume``); returns the run directory.

    ``run_dir`` names the (new, empty) run folder; by default it is ``<out>/<name or modality>-<time>``.
    """
    device = resolve_device(config.device)
    world = init_world(device.type)
    try:
        return _fit(config, device, world, resume, run_dir, on_epoch_end)
    finally:
        shutdown(world)


def _fit(config: FitConfig, device: torch.device, world: World, resume: Path | None, run_dir: Path | None,
         on_epoch_end: EpochHook | None) -> Path:
    artifact = open_artifact(config)
    config = _bind_to_data(config, artifact, device, world, resume)
    train_rows = len(artifact.rows_of("train"))
    artifact.rows_of("val")
    assert config.batch_size is not None
    if config.batch_size > train_rows:
        raise CommandError(f"--batch-size {config.batch_size} is larger than the train split ({train_rows} rows)")
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.encoder, config.encoder_weights, config.in_channels, config.classes,
                        config.decoder_channels)
    model.to(device)
    if channels_last(device):
        model = model.to(memory_format=torch.channels_last)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    use_cache = choose_cache(config, artifact, device)
    batches = BatchSources(artifact,
                           make_source(config, artifact, "train", True, device, use_cache, world.rank, world.size),
                           make_source(config, artifact, "val", False, device, use_cache, world.rank, world.size),
                           NetworkInputs(config, device))
    steps_per_epoch = len(batches.train)  # type: ignore[arg-type]
    total_steps = min(config.epochs * steps_per_epoch, config.max_steps or math.inf)
    amp_dtype = autocast_dtype(device, config.amp)
    clock = RunClock(config.time_limit * 60 if config.time_limit else None)
    optimiser = Optimiser.create(model, config, device, amp_dtype, total_steps, steps_per_epoch, clock)
    learner = Learner(model, _network(model, config, world, device), optimiser,
                      make_loss(config.loss, config.task).to(device), amp_dtype, clock)
    run_dir = _run_folder(config, world, resume, run_dir)
    with held(run_dir) if world.is_main else nullcontext():
        log = RunLog(run_dir / LOG_FILE if world.is_main else None, config.quiet or not world.is_main)
        tensorboard = board(run_dir) if config.tensorboard and world.is_main else None
        try:
            with BackgroundWriter() as writer:
                record = Record(run_dir, History(run_dir / "metrics.csv"), log, writer, tensorboard)
                state = _resume_state(record, learner, config, world, device) if resume else TrainingState()
                if world.is_main:
                    _announce(config, artifact, record, world, use_cache, device)
                best = _epochs(config, state, learner, batches, record, world, on_epoch_end)
            if world.is_main:
                _finish(config, learner, batches, record, best)
        except (Exception, KeyboardInterrupt) as error:
            log.stopped(error)
            raise
        finally:
            if tensorboard is not None:
                tensorboard.close()
    barrier(world)
    return run_dir


def _epochs(config: FitConfig, state: TrainingState, learner: Learner, batches: BatchSources, record: Record,
            world: World, on_epoch_end: EpochHook | None) -> dict[str, Any] | None:
    """Train and validate epoch by epoch until ``config.epochs``, ``max_steps``, early stopping or the time limit;
    returns the best checkpoint written by these epochs (None if none improved on the resumed run's best)."""
    max_steps = config.max_steps or math.inf
    last_plot, written_best, val_seconds = -math.inf, None, None
    learner.clock.start(state.seconds)  # a resumed run counts on from the seconds it had used
    for epoch in range(state.epoch + 1, config.epochs):
        if state.step >= max_steps or agreed(learner.clock.cannot_fit(0.0), world):
            break
        started, first_step = time.perf_counter(), state.step
        lr = learner.optimiser.lr
        train_metrics = _train_epoch(config, epoch, state, learner, batches, world, val_seconds)
        train_seconds = time.perf_counter() - started
        batches.artifact.check_unchanged()  # every rank, every epoch: never validate on rows of another file
        broadcast_buffers(learner.model, world)  # the unwrapped model: a rank without val rows must not wait in DDP
        val_metrics = evaluation_pass(learner.model, batches.val, batches.inputs, learner.amp_dtype)
        val_metrics.all_reduce()
        val_seconds = time.perf_counter() - started - train_seconds
        row = {"epoch": epoch, "step": state.step, "lr": lr, "train_seconds": round(train_seconds, 3),
               "val_seconds": round(val_seconds, 3),
               "train_images_per_s": round(train_metrics.slices / train_seconds, 2),
               **{f"train_{k}": v for k, v in train_metrics.compute().items()},
               **{f"val_{k}": v for k, v in val_metrics.compute().items()}}
        if not (math.isfinite(row["train_loss"]) and math.isfinite(row["val_loss"])):
            raise CommandError(f"epoch {epoch + 1}: the loss is no longer finite (train {row['train_loss']}, val "
                               f"{row['val_loss']}); stopped before saving this epoch, {record.run_dir / 'best.pt'} "
                               f"holds the best finite one. Lower --lr (now {config.lr:g}) or keep --clip-grad on")
        improved = state.record(epoch, row[SCORE_KEY])
        state.seconds = learner.clock.used()
        early_stop = state.bad_epochs >= config.patience
        step_seconds = train_seconds / max(1, state.step - first_step)
        time_up = agreed(learner.clock.cannot_fit(step_seconds + val_seconds), world)  # not one more step + validation
        final = early_stop or epoch == config.epochs - 1 or state.step >= max_steps or time_up
        if world.is_main:
            record.history.add(row | {"other_seconds": math.nan, "seconds": math.nan})  # logged before its checkpoint
            if on_epoch_end is not None:
                on_epoch_end(record.history.rows[-1])
            plot = final or time.perf_counter() - last_plot >= PLOT_EVERY_SECONDS
            last_plot = time.perf_counter() if plot else last_plot
            # best.pt is what inference needs; last.pt what resuming needs (a run that ends here drops it unless
            # --keep-last: the previous one serves a kill)
            best = checkpoint_of(learner.model, config.to_dict()) if improved else None
            if best is not None:
                written_best = best  # kept for the sample picture: no reading back what was just written
            last = (checkpoint_of(learner.model, config.to_dict(), **learner.optimiser.state_dict(),
                                  **dataclasses.asdict(state)) if not final or config.keep_last else None)
            record.writer.submit(_write_epoch, record.run_dir, best, last,
                                 [dict(r) for r in record.history.rows] if plot else None)
            seconds = time.perf_counter() - started
            record.history.amend_last(other_seconds=round(seconds - train_seconds - val_seconds, 3),
                                      seconds=round(seconds, 3))
            record.log(_summary_line(record.history.rows[-1], improved))
            if record.board is not None:
                record.board.epoch(record.history.rows[-1])
        barrier(world)
        if early_stop:
            record.log(f"early stop: no better {SCORE_KEY} for {config.patience} epochs")
        if final:
            if learner.clock.budget is not None:
                record.log(_budget_line(config, learner.clock, early_stop, time_up))
            break
    return written_best


def _train_epoch(config: FitConfig, epoch: int, state: TrainingState, learner: Learner, batches: BatchSources,
                 world: World, val_seconds: float | None) -> SegmentationMetrics:
    """One pass over the training batches (stops early at ``max_steps``, or when the time limit leaves room for no
    more than the validation after it: ``val_seconds``, the last one's, or before the first an estimate of two
    training steps per validation batch); metrics of the inputs trained on, reduced over ranks."""
    torch.manual_seed(config.seed + epoch)
    batches.train.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
    # per rank: under DDP each rank crops and augments its own rows differently
    generator = torch.Generator(device=batches.inputs.device)
    generator.manual_seed(config.seed * 1000 + epoch + 7919 * world.rank)
    metrics = SegmentationMetrics(config.task, batches.inputs.device)
    learner.network.train()
    bar = Progress(batches.train, f"epoch {epoch + 1}/{config.epochs}", unit="batch",
                   show=world.is_main and not config.quiet, leave=False)
    started, first_step = time.perf_counter(), state.step
    for images, labels, _ in bar:
        logits, target, loss = train_step(learner.network, batches.inputs, images, labels, generator, learner.loss_fn,
                                          learner.optimiser, learner.amp_dtype)
        metrics.update(logits, target, loss)
        state.step += 1
        if state.step % 10 == 1:
            bar.note(f"loss {loss.item():.4f}")  # a device sync: only every tenth step
        if config.max_steps is not None and state.step >= config.max_steps:
            break
        # under DDP the ranks agree through one all-reduce: every tenth step (and the first), not every step
        if learner.clock.budget is not None and (not world.distributed or state.step % 10 == 0 or state.step == 1):
            step = (time.perf_counter() - started) / (state.step - first_step)
            reserve = val_seconds if val_seconds is not None else 2 * step * len(batches.val)  # type: ignore[arg-type]
            if state.step == 1 and agreed(step + reserve > learner.clock.budget, world):
                needed = (step + reserve) / 60
                raise CommandError(f"--time-limit {config.time_limit:g}: one training step and one validation take "
                                   f"about {needed:.2g} minutes here; give at least --time-limit {needed * 2:.2g} (or "
                                   "a smaller --batch-size, or fewer validation rows)")
            if agreed(learner.clock.cannot_fit(step + reserve), world):
                break
    metrics.all_reduce()
    return metrics


def _budget_line(config: FitConfig, clock: RunClock, early_stop: bool, time_up: bool) -> str:
    """How the run ended against its --time-limit: at the budget, or before it and what ended it."""
    used = f"{clock.used() / 60:.1f} of {config.time_limit:g} minutes"
    if time_up:
        return f"time limit: {used} used; the last epoch was cut so that its validation ended within the budget"
    bound = ("early stopping (--patience)" if early_stop else f"--max-steps {config.max_steps}"
             if config.max_steps is not None else f"--epochs {config.epochs}")
    return f"time limit: the run ended at {bound} after {used}; raise it to use the whole budget"


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
                raise CommandError(f"{run_dir}: trained on fold {saved.get('fold')} of {saved.get('folds')}, not fold "
                                   f"{config.fold} of {config.folds}; choose another --out")
            print(f"reusing {run_dir}", flush=True)
        elif run_dir.exists() and any(run_dir.iterdir()):
            if reuse:
                raise CommandError(f"{run_dir}: an unfinished run; resume it (brats-train fit --resume {run_dir}) or "
                                   "delete it, then run this again")
            raise CommandError(f"{run_dir} exists: pass --reuse to keep finished runs, or choose another --out")
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


def _network(model: nn.Module, config: FitConfig, world: World, device: torch.device) -> nn.Module:
    """What trains: the model, wrapped for DistributedDataParallel across ranks and compiled when asked."""
    network: nn.Module = model
    if world.distributed:
        network = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)
    return torch.compile(network) if config.compile else network  # type: ignore[return-value]


def _run_folder(config: FitConfig, world: World, resume: Path | None, run_dir: Path | None) -> Path:
    """The run's folder, the same on every rank: the resumed one, ``run_dir`` (made if it is not there yet: compare
    and the benchmarks name their runs' folders), or a new ``<out>/<name or modality>-<time>``."""
    if world.is_main:
        if resume is not None:
            run_dir = resume
        elif run_dir is not None:
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise OutputError(f"{run_dir}: could not be created ({error.strerror or error})") from None
        else:
            run_dir = new_run_dir(Path(config.out), config.name or config.modality)
    return Path(broadcast_object(str(run_dir) if world.is_main else None, world))  # type: ignore[arg-type]


def _resume_state(record: Record, learner: Learner, config: FitConfig, world: World, device: torch.device
                  ) -> TrainingState:
    """The resume state loaded into ``learner`` (a run killed before its first checkpoint starts from its first
    epoch), and metrics.csv cut back to it."""
    if record.history.damaged is not None:
        record.log(f"{record.history.path}: line {record.history.damaged} is damaged; the rows before it are kept")
    state = TrainingState()
    state_file = record.run_dir / "last.pt"
    if state_file.is_file():
        checkpoint = read_checkpoint(state_file, device, resume=True)
        learner.model.load_state_dict(checkpoint["model"])
        learner.optimiser.load_state_dict(checkpoint)
        state = TrainingState(**{f.name: checkpoint[f.name] for f in dataclasses.fields(TrainingState)
                                 if f.name in checkpoint})  # resume states before --time-limit hold no seconds
        if state.bad_epochs >= config.patience and state.epoch < config.epochs - 1:
            state.bad_epochs = 0  # an early-stopped run extended with --epochs: its patience starts again
    if world.is_main:
        record.history.truncate(state.epoch)
    return state


def _announce(config: FitConfig, artifact: Artifact, record: Record, world: World, use_cache: bool,
              device: torch.device) -> None:
    """config.json (every option, absolute paths, the data's provenance) and the run's first line."""
    config_json = {**config.to_dict(), "brats2d_version": __version__,
                   "artifact": {"path": str(artifact.path.resolve() if isinstance(artifact.path, Path) else artifact.path), "rows": artifact.rows, **artifact.provenance},
                   "world_size": world.size}
    write_text(record.run_dir / CONFIG_FILE, json.dumps(config_json, indent=2, default=str))
    if config.crop and config.crop >= min(artifact.slice_shape):
        record.log(f"--crop {config.crop}: not smaller than the {artifact.slice_shape[0]}x{artifact.slice_shape[1]} "
                   "slices, so training sees whole slices")
    record.log(f"run {record.run_dir}: {config.modality} ({', '.join(config.channels)}"
               f"{f', each with {config.context} slice(s) on each side' if config.context else ''}; {config.plane}"
               f"{f'; fold {config.fold} of {config.folds}' if config.folds else ''}), {config.task}, "
               f"{config.arch}/{config.encoder}, {len(artifact.rows_of('train'))} train rows, "
               f"batch {config.batch_size}, "
               f"data {'held on the device' if use_cache else 'streamed from the file'}"
               f", device {device}{f' x{world.size}' if world.distributed else ''}")


def _write_epoch(run_dir: Path, best: dict[str, Any] | None, last: dict[str, Any] | None,
                 rows: list[dict[str, float]] | None) -> None:
    """An epoch's outputs, on the background writer: best.pt when it improved, last.pt unless the run ends here,
    and the curves if due."""
    if best is not None:
        save_checkpoint(run_dir / "best.pt", best)
    if last is not None:
        save_checkpoint(run_dir / "last.pt", last)
    if rows:
        from trainer.training.plots import plot_curves

        plot_curves(rows, run_dir / "curves.png")


def _finish(config: FitConfig, learner: Learner, batches: BatchSources, record: Record,
            best: dict[str, Any] | None) -> None:
    """The run is over: the resume state (the optimiser's, 2x the weights) goes unless --keep-last; the sample
    picture of the best weights is drawn (those just written, else best.pt's)."""
    from trainer.training.plots import plot_samples

    if not config.keep_last:
        (record.run_dir / "last.pt").unlink(missing_ok=True)
    if best is None and (record.run_dir / "best.pt").is_file():
        best = read_checkpoint(record.run_dir / "best.pt", batches.inputs.device)
    if best is not None:
        learner.model.load_state_dict(best["model"])
        plot_samples(learner.model.eval(), config, batches.artifact, batches.inputs, record.run_dir / "samples.png")
    if record.board is not None:
        record.board.picture(record.run_dir / "samples.png")


def _summary_line(row: dict[str, float], improved: bool) -> str:
    regions = " ".join(f"{k[9:]} {v:.3f}" for k, v in row.items() if k.startswith("val_dice_") and k != "val_dice_mean")
    return (f"epoch {int(row['epoch']) + 1}: train loss {row['train_loss']:.4f} | val loss {row['val_loss']:.4f} "
            f"PA {row['val_pixel_accuracy']:.4f} mIoU {row['val_mean_iou']:.3f} MSE {row['val_mse']:.4f} "
            f"Dice {regions} mean {row['val_dice_mean']:.3f} ({row['seconds']:.1f} s: train {row['train_seconds']:.1f} s "
            f"at {row['train_images_per_s']:.1f} img/s, val {row['val_seconds']:.1f} s, other {row['other_seconds']:.2f} s)"
            f"{' *best' if improved else ''}")

"""The training loop: one model on one modality (or all four as channels), streaming from the artifact."""

from __future__ import annotations

import csv
import dataclasses
import datetime as dt
import json
import math
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from builder.format import MODALITIES, canonical_modality
from trainer.data import Artifact, DeviceCache, SliceDataset, make_loader
from trainer.distributed import World, barrier, broadcast_buffers, broadcast_object, init_world, shutdown
from trainer.metrics import SegmentationMetrics
from trainer.model import build_model, read_checkpoint, save_checkpoint
from trainer.transforms import NORMALISATIONS, augment, crop, normalise, pad, padding_for, random_crop

LOSSES = ("ce+dice", "ce", "dice", "focal+dice")
TASKS = ("multiclass", "binary")
CACHES = ("auto", "stream", "device")
#: Learning curves are redrawn at most this often (and at the end): a plot costs about 0.26 s.
PLOT_EVERY_SECONDS = 30.0
#: The device cache is used automatically when the split needs less than this share of free GPU memory.
DEVICE_CACHE_SHARE = 0.25


class FitError(Exception):
    """A run that cannot start as configured; one line naming the problem and the fix."""


@dataclass
class FitConfig:
    """Every option of a run; saved as config.json and inside each checkpoint (plain JSON types only)."""

    data: str
    modality: str
    arch: str = "unet"
    encoder: str = "resnet34"
    encoder_weights: str | None = "imagenet"
    task: str = "multiclass"
    loss: str = "ce+dice"
    norm: str = "zscore"
    epochs: int = 50
    max_steps: int | None = None
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 1e-4
    workers: int = 2
    device: str = "auto"
    amp: bool = True
    compile: bool = False
    augment: bool = True
    crop: int | None = None
    seed: int = 0
    patience: int = 5
    cache: str = "auto"
    out: str = "runs"
    name: str | None = None
    # Filled from the artifact when the run starts, so that a checkpoint alone can segment and name its data:
    axis_codes: list[str] | None = None
    voxel_size: list[float] | None = None
    slice_shape: list[int] | None = None
    data_sha256: str | None = None

    def __post_init__(self) -> None:
        self.modality = "all" if self.modality.lower() in ("all", "early", "fusion") else canonical_modality(self.modality)
        for value, valid, what in ((self.task, TASKS, "task"), (self.loss, LOSSES, "loss"),
                                   (self.norm, NORMALISATIONS, "normalisation"), (self.cache, CACHES, "cache")):
            if value not in valid:
                raise ValueError(f"unknown {what} {value!r}; valid: {', '.join(valid)}")
        if self.encoder_weights in ("none", "None", ""):
            self.encoder_weights = None
        if self.crop is not None and self.crop % 32:
            raise ValueError(f"--crop {self.crop}: use a multiple of 32 (what the encoders need)")

    @property
    def channels(self) -> list[str]:
        return list(MODALITIES) if self.modality == "all" else [self.modality]

    @property
    def classes(self) -> int:
        return 4 if self.task == "multiclass" else 2

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": self.channels, "classes": self.classes}

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> FitConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise FitError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise FitError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None


class SummedLoss(nn.Module):
    """The sum of several losses on the same logits and targets."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return torch.stack([part(logits, target) for part in self.parts]).sum()


def make_loss(name: str) -> nn.Module:
    """Cross-entropy (torch) and/or smp's focal and Dice losses on logits, summed: e.g. "ce+dice"."""
    available = {
        "ce": nn.CrossEntropyLoss,
        "focal": lambda: smp.losses.FocalLoss(mode="multiclass"),
        "dice": lambda: smp.losses.DiceLoss(mode="multiclass", from_logits=True),
    }
    return SummedLoss([available[part]() for part in name.split("+")])


def make_optimizer(model: nn.Module, config: FitConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW; on CUDA the fused kernel (one launch per step instead of several per parameter tensor)."""
    return torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                             fused=device.type == "cuda")


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a grad scaler); no autocast on CPUs."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


class Batches:
    """Turns stored batches into network inputs and targets on the device, the same way for train and eval."""

    def __init__(self, config: FitConfig, slice_shape: tuple[int, int], device: torch.device) -> None:
        self.config, self.device = config, device
        self.padding = padding_for(*slice_shape)
        self.channels_last = device.type == "cuda"

    def inputs(self, images: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Network input and class targets; with a ``generator`` (training) augmented and maybe cropped."""
        images = normalise(images.to(self.device, non_blocking=True), self.config.norm)
        target = labels.to(self.device, non_blocking=True).long()
        if self.config.task == "binary":
            target = (target > 0).long()
        if generator is not None:
            if self.config.augment:
                images, target = augment(images, target, generator)
            if self.config.crop:
                images, target = random_crop(images, target, self.config.crop, generator)
                return self._layout(images), target
        return self._layout(pad(images, self.padding)), target

    def _layout(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images
    def crop(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Logits at the target's size: undo the padding of whole slices (training patches have none)."""
        return logits if logits.shape[-2:] == target.shape[-2:] else crop(logits, self.padding)


def make_source(config: FitConfig, artifact: Artifact, split: str, train: bool, device: torch.device,
                world: World, use_cache: bool) -> Iterable:
    dataset = SliceDataset(artifact.path, artifact.rows_of(split), config.channels)
    if use_cache:
        return DeviceCache(dataset, config.batch_size, train, config.seed, device, world.rank, world.size)
    return make_loader(dataset, config.batch_size, train, config.workers, config.seed, world.rank, world.size,
                       pin_memory=device.type == "cuda")


def choose_cache(config: FitConfig, artifact: Artifact, device: torch.device) -> bool:
    """Whether to hold the splits on the device: asked for, or (auto) on a GPU with room to spare."""
    if config.cache != "auto":
        return config.cache == "device"
    if device.type != "cuda":
        return False
    needed = sum(DeviceCache.nbytes(artifact.path, len(artifact.splits[s]), config.channels) for s in ("train", "val"))
    free, _ = torch.cuda.mem_get_info(device)
    return needed < DEVICE_CACHE_SHARE * free


def per_slice_loss(loss_fn: nn.Module, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The mean over slices of each slice's loss: unlike a batch's Dice loss, independent of how slices are
    batched or sharded, so evaluation gives the same number in one process or across ranks."""
    return torch.stack([loss_fn(logits[i : i + 1], target[i : i + 1]) for i in range(len(target))]).mean()


def evaluate(model: nn.Module, source: Iterable, batches: Batches, amp_dtype: torch.dtype | None,
             keep_per_slice: bool = False, probabilities: list[torch.Tensor] | None = None) -> SegmentationMetrics:
    """Metrics of ``model`` over ``source`` (this rank's share; call ``all_reduce`` for the whole split).

    With a ``probabilities`` list, each batch's softmax maps are appended to it (float16, on the CPU).
    """
    config = batches.config
    metrics = SegmentationMetrics(config.classes, config.task, batches.device, keep_per_slice)
    loss_fn = make_loss(config.loss).to(batches.device)
    model.eval()
    with torch.no_grad(), autocast_context(batches.device, amp_dtype):
        for images, labels, rows in source:
            inputs, target = batches.inputs(images, labels)
            logits = batches.crop(model(inputs), target).float()
            metrics.update(logits, target, per_slice_loss(loss_fn, logits, target), rows)
            if probabilities is not None:
                probabilities.append(logits.softmax(1).half().cpu())
    return metrics


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """Autocast to ``dtype`` on the device, or nothing when mixed precision is off."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def _new_run_dir(config: FitConfig) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path(config.out) / f"{config.name or config.modality}-{stamp}"
    run_dir, n = base, 1
    while run_dir.exists():
        run_dir, n = Path(f"{base}-{n}"), n + 1
    run_dir.mkdir(parents=True)
    return run_dir


class History:
    """metrics.csv: one row per epoch, every metric for train and val."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: list[dict[str, float]] = []
        if path.is_file():
            with open(path, newline="") as handle:
                self.rows = [{k: float(v) for k, v in row.items()} for row in csv.DictReader(handle)]

    def truncate(self, last_epoch: int) -> None:
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
        if not self.rows:
            return
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(self.rows[0]))
            writer.writeheader()
            writer.writerows(self.rows)


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


def _fit(config: FitConfig, device: torch.device, world: World, resume: Path | None, run_dir: Path | None) -> Path:
    artifact = Artifact.open(config.data)
    artifact.require(config.channels)
    config = dataclasses.replace(
        config, axis_codes=list(artifact.axis_codes), voxel_size=list(artifact.voxel_size),
        slice_shape=list(artifact.slice_shape),
        data_sha256=broadcast_object(artifact.sha256() if world.is_main else None, world),
    )
    train_rows = artifact.rows_of("train")
    artifact.rows_of("val")
    if config.batch_size > len(train_rows):
        raise FitError(f"--batch-size {config.batch_size} is larger than the train split ({len(train_rows)} rows)")
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.encoder, config.encoder_weights, len(config.channels), config.classes)
    model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    optimizer = make_optimizer(model, config, device)
    amp_dtype = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    state = {"epoch": -1, "step": 0, "best_score": -math.inf, "bad_epochs": 0}

    if world.is_main:
        if resume is not None:
            run_dir = resume
        elif run_dir is not None:
            run_dir.mkdir(parents=True, exist_ok=True)
        else:
            run_dir = _new_run_dir(config)
    run_dir = Path(broadcast_object(str(run_dir) if world.is_main else None, world))  # type: ignore[arg-type]
    history = History(run_dir / "metrics.csv")
    if resume is not None:
        checkpoint = read_checkpoint(run_dir / "last.pt", device)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scaler.load_state_dict(checkpoint["scaler"])
        state = {k: checkpoint[k] for k in state}
        if world.is_main:
            history.truncate(state["epoch"])
    if world.is_main:
        config_json = {**config.to_dict(), "artifact": _provenance(artifact), "world_size": world.size}
        (run_dir / "config.json").write_text(json.dumps(config_json, indent=2, default=str))

    use_cache = choose_cache(config, artifact, device)
    if config.crop and config.crop >= min(artifact.slice_shape) and world.is_main:
        print(f"--crop {config.crop}: not smaller than the {artifact.slice_shape[0]}x{artifact.slice_shape[1]} slices, "
              "so training sees whole slices", flush=True)
    if world.is_main:
        print(f"run {run_dir}: {config.modality} ({', '.join(config.channels)}), {config.arch}/{config.encoder}, "
              f"{len(train_rows)} train rows, data {'held on the device' if use_cache else 'streamed from the file'}"
              f", device {device}{f' x{world.size}' if world.distributed else ''}", flush=True)
    train_source = make_source(config, artifact, "train", True, device, world, use_cache)
    val_source = make_source(config, artifact, "val", False, device, world, use_cache)
    network: nn.Module = model
    if world.distributed:
        network = DistributedDataParallel(model, device_ids=[world.local_rank] if device.type == "cuda" else None)
    if config.compile:
        network = torch.compile(network)
    batches = Batches(config, artifact.slice_shape, device)
    loss_fn = make_loss(config.loss).to(device)
    score_key = "val_dice_mean"
    last_plot = -math.inf

    for epoch in range(state["epoch"] + 1, config.epochs):
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
        started = time.perf_counter()
        torch.manual_seed(config.seed + epoch)
        train_source.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        # per rank: under DDP each rank crops and augments its own rows differently
        generator = torch.Generator(device=device).manual_seed(config.seed * 1000 + epoch + 7919 * world.rank)
        train_metrics = _train_epoch(network, train_source, batches, loss_fn, optimizer, scaler, amp_dtype, generator,
                                     state, f"epoch {epoch + 1}/{config.epochs}", world.is_main)
        train_metrics.all_reduce()
        train_seconds = time.perf_counter() - started
        # the unwrapped model: a rank with no validation rows must not wait in DDP's buffer broadcast
        broadcast_buffers(model, world)
        val_metrics = evaluate(model, val_source, batches, amp_dtype)
        val_metrics.all_reduce()
        val_seconds = time.perf_counter() - started - train_seconds
        row = {"epoch": epoch, "step": state["step"], "lr": config.lr, "train_seconds": round(train_seconds, 3),
               "val_seconds": round(val_seconds, 3), "train_images_per_s": round(train_metrics.slices / train_seconds, 2)}
        row |= {f"train_{k}": v for k, v in train_metrics.compute().items()}
        row |= {f"val_{k}": v for k, v in val_metrics.compute().items()}
        improved = row[score_key] > state["best_score"]
        state["best_score"] = max(state["best_score"], row[score_key])
        state["bad_epochs"] = 0 if improved else state["bad_epochs"] + 1
        state["epoch"] = epoch
        if world.is_main:
            history.add(row | {"other_seconds": math.nan, "seconds": math.nan})  # logged before its checkpoint
            if improved:  # what inference needs: weights and configuration
                save_checkpoint(run_dir / "best.pt", model, config.to_dict())
            save_checkpoint(run_dir / "last.pt", model, config.to_dict(), optimizer=optimizer.state_dict(),
                            scaler=scaler.state_dict(), **state)
            if time.perf_counter() - last_plot >= PLOT_EVERY_SECONDS:
                _plot_curves(history.rows, run_dir)
                last_plot = time.perf_counter()
            history.amend_last(other_seconds=round(time.perf_counter() - started - train_seconds - val_seconds, 3),
                               seconds=round(time.perf_counter() - started, 3))
            tqdm.write(_summary_line(history.rows[-1], improved))
        barrier(world)
        if state["bad_epochs"] >= config.patience:
            if world.is_main:
                tqdm.write(f"early stop: no better {score_key} for {config.patience} epochs")
            break
    if world.is_main:
        _plot_curves(history.rows, run_dir)
        _plot_samples(run_dir, artifact, batches)
    barrier(world)
    return run_dir


def _train_epoch(network: nn.Module, source: Iterable, batches: Batches, loss_fn: nn.Module,
                 optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, amp_dtype: torch.dtype | None,
                 generator: torch.Generator, state: dict[str, Any], desc: str, show: bool) -> SegmentationMetrics:
    """One pass over the training batches (stops early at ``max_steps``); metrics of the inputs trained on."""
    config = batches.config
    metrics = SegmentationMetrics(config.classes, config.task, batches.device)
    network.train()
    bar = tqdm(source, desc=desc, unit="batch", leave=False, disable=None if show else True, dynamic_ncols=True)
    for images, labels, _ in bar:
        inputs, target = batches.inputs(images, labels, generator)
        with autocast_context(batches.device, amp_dtype):
            logits = batches.crop(network(inputs), target)
            loss = loss_fn(logits.float(), target)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        metrics.update(logits.detach(), target, loss.detach())
        state["step"] += 1
        if state["step"] % 10 == 1:
            bar.set_postfix(loss=f"{loss.item():.4f}")  # a device sync: only every tenth step
        if config.max_steps is not None and state["step"] >= config.max_steps:
            break
    bar.close()
    return metrics


def _provenance(artifact: Artifact) -> dict[str, Any]:
    keep = ("format_version", "builder_version", "created", "seed", "source", "slice_rule", "cases_written",
            "background_slices", "split_unit", "axis_codes", "voxel_size")
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


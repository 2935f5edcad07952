"""Build smp models by name, and save and load checkpoints that rebuild their model from the file alone."""

from __future__ import annotations

import math
import pickle
import zipfile
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn

from builder.format import FORMAT_VERSION, MODALITIES, READABLE_VERSIONS
from trainer.errors import ModelError
from trainer.outputs import atomic_output
from trainer.tasks import OUTPUTS


def architectures() -> list[str]:
    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


#: The architectures whose decoder is five blocks of given widths (smp's ``decoder_channels`` tuple).
WIDENED_DECODERS = ("unet", "unetplusplus", "manet")


def decoder_widths(widest: int) -> tuple[int, ...]:
    """The five decoder blocks' channels from the widest one, halving block by block as smp's default (256, 128,
    64, 32, 16) does."""
    return tuple(max(1, widest >> block) for block in range(5))


def build_model(arch: str, encoder: str, encoder_weights: str | None, in_channels: int, classes: int,
                decoder_channels: int | None = None) -> nn.Module:
    """``smp.create_model`` with names checked first and a one-line error when weights cannot be fetched.
    ``decoder_channels``: the widest decoder block (None: smp's default); half of it halves a U-Net step on a CPU."""
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ModelError(f"unknown architecture {arch!r}; valid: {', '.join(architectures())}")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders:
        close = [e for e in encoders if encoder.split("_")[0].lower() in e.lower()][:8]
        hint = f" (similar: {', '.join(close)})" if close else " (see `brats-train fit --help`)"
        raise ModelError(f"unknown encoder {encoder!r}{hint}")
    if decoder_channels is not None and arch.lower() not in WIDENED_DECODERS:
        raise ModelError(f"--decoder-channels: the {arch} architecture has no decoder blocks to narrow; use it with "
                         f"{', '.join(WIDENED_DECODERS)}")
    widths = {} if decoder_channels is None else {"decoder_channels": decoder_widths(decoder_channels)}
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights,
                                in_channels=in_channels, classes=classes, **widths)
    except Exception as error:  # smp raises whatever its download backend raises (URLError, HTTP, hub errors...)
        if encoder_weights is None:
            raise
        raise ModelError(
            f"could not fetch {encoder_weights} weights for encoder {encoder} ({type(error).__name__}: "
            "no network or no cached copy); "
            "train from scratch with --encoder-weights none, or run once where the internet is reachable"
        ) from None


def unwrap(model: nn.Module) -> nn.Module:
    """The plain module inside DistributedDataParallel and torch.compile wrappers (what checkpoints store)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def checkpoint_of(model: nn.Module, config: dict[str, Any], **state: Any) -> dict[str, Any]:
    """What a checkpoint holds, copied (tensors cloned) so that training may go on while it is written."""
    return _copied({"model": unwrap(model).state_dict(), "config": config, **state})


def _copied(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: _copied(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copied(v) for v in value)
    return value


def save_checkpoint(path: Path, checkpoint: dict[str, Any]) -> None:
    """Write atomically: a run killed, or a disk filled, while saving keeps its previous checkpoint, and no partial
    file is left (OutputError names the file)."""
    with atomic_output(path) as partial:
        try:
            torch.save(checkpoint, partial)
        except RuntimeError as error:  # torch's zip writer reports a failed write (e.g. no space) this way
            raise OSError(f"write failed ({str(error).splitlines()[0][:120]})") from None


def read_checkpoint(path: Path, device: torch.device | str = "cpu", resume: bool = False) -> dict[str, Any]:
    """Load a checkpoint safely and checked: every byte against the CRC its zip records (torch itself does not look,
    so a flipped byte would load as other weights), then ``weights_only=True`` (never runs code from the file), then
    its configuration (and with ``resume`` its training state) by type and range. Anything else: one ModelError line.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no checkpoint here (train one with `brats-train fit`)")
    _check_bytes(path)
    try:
        checkpoint = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:
        raise ModelError(f"{path}: refused: loading it would run code or build objects a brats2d checkpoint never "
                         "holds; do not load it (brats2d checkpoints hold only tensors and plain values)") from None
    except (RuntimeError, EOFError, ValueError, OSError) as error:
        raise ModelError(_unreadable(path, error)) from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise ModelError(f"{path}: not a brats2d checkpoint (no model weights and configuration)")
    check_config(path, checkpoint["config"])
    if resume:
        _check_resume_state(path, checkpoint)
    return checkpoint


def _check_bytes(path: Path) -> None:
    """ModelError unless the file is a zip (torch's format) whose every member matches its recorded CRC-32."""
    try:
        with zipfile.ZipFile(path) as archive:
            damaged = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
        raise ModelError(_unreadable(path, error)) from None
    if damaged is not None:
        raise ModelError(f"{path}: damaged: its part {damaged} fails its checksum (CRC-32), so the weights are not the "
                         "ones saved; use another checkpoint of the run, or train it again")


#: The first bytes of torch's pre-1.6 checkpoint format: a pickle (protocol 2) of its magic number.
_LEGACY_TORCH = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _unreadable(path: Path, error: BaseException) -> str:
    """Why a checkpoint file cannot be read, said as what the file is: a TorchScript model, torch's legacy format,
    a zip cut short, or something else."""
    advice = "brats2d checkpoints are the best.pt and last.pt that `brats-train fit` writes"
    try:
        with open(path, "rb") as handle:
            head = handle.read(len(_LEGACY_TORCH))
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        names = None
    if names is not None and any(n.endswith("constants.pkl") or "/code/" in n for n in names):
        return (f"{path}: a TorchScript model (torch.jit.save), not a brats2d checkpoint; it runs with "
                f"torch.jit.load, and {advice}")
    if head.startswith(_LEGACY_TORCH):
        return f"{path}: a checkpoint in torch's legacy (before 1.6) format, not one brats2d wrote; {advice}"
    if head.startswith(b"PK\x03\x04") and names is None:
        return (f"{path}: a checkpoint cut short ({type(error).__name__}): use another checkpoint of the run "
                "(best.pt or last.pt), or train it again")
    return (f"{path}: not a torch checkpoint ({type(error).__name__}: {str(error)[:60]}); {advice}, or use another "
            "checkpoint of the run")


def check_config(path: Path, config: Any) -> None:
    """A checkpoint's configuration, checked field by field (``FitConfig.from_dict``: one schema for every command)
    before any model is built from it, and its channels and outputs against each other (a crafted one could ask for
    2e8 classes and a 100 GB allocation)."""
    from trainer.config import CONFIG_VERSION, FitConfig

    try:
        FitConfig.from_dict(config, str(path))
    except ValueError as error:
        raise ModelError(f"{error}; not a checkpoint brats2d wrote") from None
    version = config.get("config_version", 1)
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CONFIG_VERSION:
        raise ModelError(f"{path}: a checkpoint of configuration version {str(version)[:20]}, this brats2d reads "
                         f"versions 1 to {CONFIG_VERSION}; use the brats2d that wrote it, or train the run anew")
    format_version = config.get("format_version", FORMAT_VERSION)
    if not isinstance(format_version, int) or isinstance(format_version, bool) or \
            format_version not in READABLE_VERSIONS:
        raise ModelError(f"{path}: a checkpoint of a run on artifact format {str(format_version)[:20]}, this brats2d "
                         f"reads formats {', '.join(map(str, READABLE_VERSIONS))}; use the brats2d that wrote it")
    channels, classes = config.get("channels"), config.get("classes")
    task = config.get("task", "multiclass")
    problems = []
    if not (isinstance(channels, list) and channels and set(channels) <= set(MODALITIES)
            and len(set(channels)) == len(channels)):
        problems.append(f"channels {str(channels)[:60]} (expected some of {', '.join(MODALITIES)})")
    if classes != OUTPUTS.get(task):
        problems.append(f"task {str(task)[:20]} with {str(classes)[:20]} outputs (expected one of "
                        f"{', '.join(f'{t} with {n}' for t, n in OUTPUTS.items())})")
    if problems:
        raise ModelError(f"{path}: invalid configuration: {'; '.join(problems)}; not a checkpoint brats2d wrote")


#: The training state a resume checkpoint holds besides the weights, and the type of each.
RESUME_STATE = {"epoch": int, "step": int, "best_score": float, "bad_epochs": int, "optimizer": dict,
                "schedule": dict, "scaler": dict}
#: Held by resume states written since --time-limit (0.3.0): the seconds trained and validated so far.
LATER_RESUME_STATE = {"seconds": float}


def _check_resume_state(path: Path, checkpoint: dict[str, Any]) -> None:
    later = {key: kind for key, kind in LATER_RESUME_STATE.items() if key in checkpoint}
    for key, kind in {**RESUME_STATE, **later}.items():
        value = checkpoint.get(key)
        ok = isinstance(value, kind) and not isinstance(value, bool) or (kind is float and isinstance(value, int))
        if not ok or (kind is int and value < (-1 if key == "epoch" else 0)) or (key == "seconds" and not
                                                                                   0 <= value < math.inf):
            raise ModelError(f"{path}: its {key} is {str(value)[:40]!r}, not what a brats2d resume state holds; "
                             "the checkpoint is damaged or was edited: start the run again")


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint file alone; returns (model in eval mode, run config).

    >>> model, config = load_model("runs/t2f-20261127-101500/best.pt")
    """
    checkpoint = read_checkpoint(Path(path), device)
    config = checkpoint["config"]
    in_channels = len(config["channels"]) * (2 * config.get("context", 0) + 1)
    model = build_model(config["arch"], config["encoder"], None, in_channels, config["classes"],
                        config.get("decoder_channels"))
    try:
        model.load_state_dict(checkpoint["model"])
    except (RuntimeError, TypeError, AttributeError):
        raise ModelError(f"{path}: its weights do not fit a {config['arch']}/{config['encoder']} model; "
                         "the checkpoint is damaged or was edited") from None
    return model.to(device).eval(), config

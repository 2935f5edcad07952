"""Build smp models by name, and save and load checkpoints that rebuild their model from the file alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import torch
from torch import nn


class ModelError(Exception):
    """A model that cannot be built as asked; the message is one line with the fix."""


def architectures() -> list[str]:
    return sorted(smp.MODEL_ARCHITECTURES_MAPPING)


def build_model(arch: str, encoder: str, encoder_weights: str | None, in_channels: int, classes: int) -> nn.Module:
    """``smp.create_model`` with names checked first and a one-line error when weights cannot be fetched."""
    if arch.lower() not in smp.MODEL_ARCHITECTURES_MAPPING:
        raise ModelError(f"unknown architecture {arch!r}; valid: {', '.join(architectures())}")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders:
        close = [e for e in encoders if encoder.split("_")[0].lower() in e.lower()][:8]
        hint = f" (similar: {', '.join(close)})" if close else " (see `brats-train fit --help`)"
        raise ModelError(f"unknown encoder {encoder!r}{hint}")
    try:
        return smp.create_model(arch, encoder_name=encoder, encoder_weights=encoder_weights,
                                in_channels=in_channels, classes=classes)
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


def save_checkpoint(path: Path, model: nn.Module, config: dict[str, Any], **state: Any) -> None:
    """Write atomically: a run killed while saving keeps its previous checkpoint."""
    tmp = path.with_name(path.name + ".partial")
    torch.save({"model": unwrap(model).state_dict(), "config": config, **state}, tmp)
    tmp.replace(path)


def read_checkpoint(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a checkpoint safely: ``weights_only=True`` never runs code from the file."""
    if not Path(path).is_file():
        raise ModelError(f"{path}: no checkpoint here (train one with `brats-train fit`)")
    return torch.load(path, map_location=device, weights_only=True)


def load_model(path: Path | str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint file alone; returns (model in eval mode, run config).

    >>> model, config = load_model("runs/t2f-20261127-101500/best.pt")
    """
    checkpoint = read_checkpoint(Path(path), device)
    config = checkpoint["config"]
    model = build_model(config["arch"], config["encoder"], None, len(config["channels"]), config["classes"])
    model.load_state_dict(checkpoint["model"])
    return model.to(device).eval(), config

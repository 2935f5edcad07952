"""How whole volumes are segmented, as the commands' options say it: a module of its own so that the CLI can declare
them without importing torch's models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VolumeOptions:
    """``--tta`` (test-time mirroring), ``--clean-up`` (on, off), ``--device`` and ``--checkpoint`` (the file of each
    run to load): what every whole-volume command takes, declared once in ``trainer.cli``."""

    tta: bool = False
    clean: bool = True
    device: str = "auto"
    checkpoint: str = "best.pt"

"""TensorBoard for a run (``--tensorboard``, an optional extra): every epoch's metrics as scalars and, at the end,
the sample picture, in ``RUN/tensorboard`` (``tensorboard --logdir runs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from trainer.errors import CommandError

BOARD_FOLDER = "tensorboard"


class Board:
    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def epoch(self, row: dict[str, float]) -> None:
        """One metrics.csv row: ``train/loss``, ``val/dice_WT``, ``lr``, ... at step epoch + 1."""
        step = int(row["epoch"]) + 1
        for key, value in row.items():
            if key.startswith(("train_", "val_")) or key == "lr":
                self.writer.add_scalar(key.replace("_", "/", 1) if key != "lr" else key, float(value), step)
        self.writer.flush()

    def picture(self, path: Path) -> None:
        from PIL import Image

        if path.is_file():
            self.writer.add_image("samples", np.asarray(Image.open(path).convert("RGB")), dataformats="HWC")

    def close(self) -> None:
        self.writer.close()


def board(run_dir: Path) -> Board:
    """A Board writing into the run folder; one line when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise CommandError("--tensorboard needs the tensorboard package: pip install 'brats2d[tensorboard]'") from None
    return Board(SummaryWriter(str(run_dir / BOARD_FOLDER)))

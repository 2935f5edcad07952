"""brats2d trainer: 2D segmentation models that stream from the builder's HDF5 artifact.

Packages by workflow stage, each importing only from the stages before it (``tests/test_packaging.py`` holds them to
it): the base (``errors``, ``outputs``, ``tasks``, ``config``, ``device``), ``scoring`` (BraTS 2023 scores, clean-up,
statistics; no torch), ``data`` (the artifact, streaming, device-side inputs), ``training`` (model, step, loop,
runs), ``inference`` (whole volumes through ``Segmenter``), ``commands`` (evaluate, predict, compare,
cross-validate, export) and the CLI (``cli``, ``launch``).

The names in ``__all__`` are the public API, each loaded from its stage when first used (``import trainer`` alone
loads nothing heavy)::

    from trainer import FitConfig, Segmenter, VolumeOptions, fit, runs_in, score_case
"""

from __future__ import annotations

import importlib
from typing import Any

#: Each public name and the module it lives in.
_PUBLIC = {
    "Artifact": "trainer.data.artifact",
    "CaseVolumes": "trainer.inference.cases",
    "FitConfig": "trainer.config",
    "Segmenter": "trainer.inference.ensemble",
    "VolumeOptions": "trainer.inference.options",
    "fit": "trainer.training.loop",
    "load_model": "trainer.training.model",
    "read_case": "trainer.inference.cases",
    "runs_in": "trainer.inference.ensemble",
    "score_case": "trainer.scoring.brats",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'trainer' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)

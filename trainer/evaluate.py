"""Evaluate a finished run on a split: metrics over the split, and one row per slice and per case."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from trainer.data import Artifact, SliceDataset, make_loader
from trainer.metrics import SegmentationMetrics
from trainer.model import load_model
from trainer.train import Batches, FitConfig, autocast_dtype, evaluate, resolve_device


def per_case(records: list[dict[str, float]], artifact: Artifact) -> list[dict[str, Any]]:
    """Average the per-slice records of each case (a case has several rows with --slices-per-case > 1)."""
    groups: dict[str, list[dict[str, float]]] = defaultdict(list)
    for record in records:
        groups[str(artifact.case_ids[int(record["row"])])].append(record)
    out = []
    for case, rows in sorted(groups.items()):
        keys = [k for k in rows[0] if k != "row"]
        out.append({"case_id": case, "slices": len(rows), **{k: float(np.mean([r[k] for r in rows])) for k in keys}})
    return out


def evaluate_run(run_dir: Path, split: str = "test", data: Path | None = None, device_name: str = "auto",
                 checkpoint: str = "best.pt", workers: int = 0) -> dict[str, Any]:
    """Write ``<split>_metrics.json`` and ``<split>_cases.csv`` in ``run_dir``; return the metrics."""
    device = resolve_device(device_name)
    model, saved = load_model(run_dir / checkpoint, device)
    config = FitConfig.from_dict({**saved, "data": str(data or saved["data"]), "device": str(device)})
    artifact = Artifact.open(config.data)
    artifact.require(config.channels)
    metrics = evaluate_rows(model, config, artifact, artifact.rows_of(split), device, workers)
    result = {"split": split, "checkpoint": checkpoint, "data": str(artifact.path), "slices": len(artifact.splits[split]),
              **metrics.compute(),
              "note": "per-slice 2D metrics; not comparable to BraTS 2023 lesion-wise 3D leaderboard scores"}
    (run_dir / f"{split}_metrics.json").write_text(json.dumps(result, indent=2))
    cases = per_case(metrics.per_slice or [], artifact)
    with open(run_dir / f"{split}_cases.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(cases[0]))
        writer.writeheader()
        writer.writerows(cases)
    return result


def evaluate_rows(model: torch.nn.Module, config: FitConfig, artifact: Artifact, rows: np.ndarray,
                  device: torch.device, workers: int = 0,
                  probabilities: list[torch.Tensor] | None = None) -> SegmentationMetrics:
    """Per-slice-keeping metrics of ``model`` on the given rows, in one process (and its softmax maps if asked)."""
    loader = make_loader(SliceDataset(artifact.path, rows, config.channels), config.batch_size, False, workers,
                         config.seed, pin_memory=device.type == "cuda")
    batches = Batches(config, artifact.slice_shape, device)
    return evaluate(model, loader, batches, autocast_dtype(device, config.amp), True, probabilities)

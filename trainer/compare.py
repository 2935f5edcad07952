"""Which modality segments best? Train the five approaches alike, fuse the four single-modality models, and
score all seven on the test split with per-case bootstrap intervals."""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import h5py
import numpy as np
import torch
import torch.nn.functional as F

from builder.format import MODALITIES
from trainer.data import Artifact
from trainer.evaluate import evaluate_rows, per_case
from trainer.fusion import mean_probabilities, vote
from trainer.metrics import SegmentationMetrics
from trainer.model import load_model
from trainer.train import FitConfig, FitError, fit, resolve_device

APPROACHES = (*MODALITIES, "all")
LABELS = {"t1n": "T1 native", "t1c": "T1 contrast", "t2w": "T2", "t2f": "FLAIR", "all": "early fusion (4 channels)",
          "vote": "late fusion, vote", "mean": "late fusion, mean softmax"}
BOOTSTRAP_SAMPLES = 2000


@dataclass
class Outcome:
    """One approach's test predictions and scores."""

    name: str
    probabilities: torch.Tensor  # (N, C, H, W) float16 on the CPU
    metrics: dict[str, float]
    cases: list[dict]
    parameters: int | None = None
    train_seconds: float | None = None
    best_val_dice: float | None = None


def train_all(base: FitConfig, out: Path, reuse: bool) -> dict[str, Path]:
    """Train (or, with ``reuse``, keep the finished) run for each approach in ``out/<approach>``."""
    runs = {}
    for approach in APPROACHES:
        run_dir = out / approach
        if (run_dir / "best.pt").is_file() and reuse:
            print(f"reusing {run_dir}", flush=True)
        elif run_dir.exists() and any(run_dir.iterdir()):
            raise FitError(f"{run_dir} exists: pass --reuse to keep finished runs, or choose another --out")
        else:
            fit(replace(base, modality=approach, name=approach), run_dir=run_dir)
        runs[approach] = run_dir
    return runs


def _predict(run_dir: Path, artifact: Artifact, rows: np.ndarray, device: torch.device, workers: int) -> tuple:
    """Test-split softmax maps (float16, CPU), per-slice metrics, the run's config and its model."""
    model, saved = load_model(run_dir / "best.pt", device)
    config = FitConfig.from_dict({**saved, "data": str(artifact.path), "device": str(device)})
    chunks: list[torch.Tensor] = []
    metrics = evaluate_rows(model, config, artifact, rows, device, workers, chunks)
    return torch.cat(chunks), metrics, config, model


def _score_fused(name: str, probabilities: torch.Tensor, targets: torch.Tensor, rows: np.ndarray,
                 config: FitConfig, artifact: Artifact) -> Outcome:
    metrics = SegmentationMetrics(config.classes, config.task, torch.device("cpu"), keep_per_slice=True)
    for start in range(0, len(rows), 16):
        stop = start + 16
        metrics.update_probabilities(probabilities[start:stop], targets[start:stop], None,
                                     torch.from_numpy(rows[start:stop]))
    result = metrics.compute()
    result["loss"] = float("nan")  # a vote has no loss; the soft mean is not what any model minimised
    return Outcome(name, probabilities, result, per_case(metrics.per_slice or [], artifact))


def _run_summary(run_dir: Path) -> tuple[float, float]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    return sum(float(r["seconds"]) for r in rows), max(float(r["val_dice_mean"]) for r in rows)


def bootstrap_interval(values: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95% percentile bootstrap interval of the mean over cases."""
    rng = np.random.default_rng(seed)
    means = rng.choice(values, size=(BOOTSTRAP_SAMPLES, len(values)), replace=True).mean(1)
    return float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def compare(base: FitConfig, out: Path, reuse: bool = False, workers: int = 0) -> Path:
    """Train, fuse, score; writes comparison.{csv,md,png,gif} and comparison_cases.csv in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    artifact = Artifact.open(base.data)
    artifact.require(MODALITIES)
    artifact.rows_of("val")
    rows = artifact.rows_of("test")
    started = time.perf_counter()
    runs = train_all(base, out, reuse)
    device = resolve_device(base.device)
    with h5py.File(artifact.path, "r") as f:
        seg = np.stack([f["seg"][int(r)] for r in rows])
    outcomes: dict[str, Outcome] = {}
    config = None
    for approach, run_dir in runs.items():
        probabilities, metrics, config, model = _predict(run_dir, artifact, rows, device, workers)
        seconds, best_val = _run_summary(run_dir)
        outcomes[approach] = Outcome(approach, probabilities, metrics.compute(), per_case(metrics.per_slice or [], artifact),
                                     sum(p.numel() for p in model.parameters()), seconds, best_val)
    assert config is not None
    targets = torch.from_numpy(seg).long() if config.task == "multiclass" else torch.from_numpy(seg > 0).long()
    singles = [outcomes[m] for m in MODALITIES]
    best = int(np.argmax([o.best_val_dice for o in singles]))
    labels = [o.probabilities.float().argmax(1) for o in singles]
    voted = F.one_hot(vote(labels, best, config.classes), config.classes).permute(0, 3, 1, 2).float()
    outcomes["vote"] = _score_fused("vote", voted, targets, rows, config, artifact)
    outcomes["mean"] = _score_fused("mean", mean_probabilities([o.probabilities for o in singles]), targets, rows,
                                    config, artifact)
    table = _write_tables(outcomes, out, MODALITIES[best], len(rows))
    from trainer.plots import plot_comparison

    plot_comparison(artifact, rows, seg, {k: o.probabilities for k, o in outcomes.items()}, config.task, out)
    print(table)
    print(f"compared {len(outcomes)} approaches in {time.perf_counter() - started:.0f} s: {out / 'comparison.md'}")
    return out / "comparison.md"


def _write_tables(outcomes: dict[str, Outcome], out: Path, best_single: str, slices: int) -> str:
    columns = ("loss", "pixel_accuracy", "mean_iou", "mse", "dice_WT", "dice_TC", "dice_ET", "dice_mean")
    records = []
    for name, o in outcomes.items():
        case_means = np.array([np.mean([c[k] for k in c if k.startswith("dice_")]) for c in o.cases])
        low, high = bootstrap_interval(case_means)
        records.append({"approach": name, "description": LABELS[name], **{c: o.metrics.get(c, float("nan")) for c in columns},
                        "dice_mean_ci_low": low, "dice_mean_ci_high": high, "parameters": o.parameters or "",
                        "train_seconds": round(o.train_seconds, 1) if o.train_seconds is not None else ""})
    with open(out / "comparison.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(records[0]))
        writer.writeheader()
        writer.writerows(records)
    with open(out / "comparison_cases.csv", "w", newline="") as handle:
        case_rows = [{"approach": name, **case} for name, o in outcomes.items() for case in o.cases]
        writer = csv.DictWriter(handle, fieldnames=list(case_rows[0]))
        writer.writeheader()
        writer.writerows(case_rows)
    lines = [
        f"# Which modality segments best? ({slices} test slices)",
        "",
        "| approach | loss | pixel acc. | mIoU | MSE | Dice WT | Dice TC | Dice ET | Dice mean [95% CI] | params | train s |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        loss = "" if np.isnan(r["loss"]) else f"{r['loss']:.3f}"
        dice = {k: ("" if np.isnan(r[k]) else f"{r[k]:.3f}") for k in ("dice_WT", "dice_TC", "dice_ET")}
        params = f"{r['parameters'] / 1e6:.1f} M" if r["parameters"] else ""
        lines.append(
            f"| {r['description']} | {loss} | {r['pixel_accuracy']:.4f} | {r['mean_iou']:.3f} | {r['mse']:.4f} | "
            f"{dice['dice_WT']} | {dice['dice_TC']} | {dice['dice_ET']} | "
            f"{r['dice_mean']:.3f} [{r['dice_mean_ci_low']:.3f}, {r['dice_mean_ci_high']:.3f}] | {params} | {r['train_seconds']} |"
        )
    lines += [
        "",
        f"Late fusion by vote: the four single-modality models vote per pixel; {LABELS[best_single]} (best validation "
        "mean Dice) counts twice and wins ties. Late fusion by mean: argmax of the mean of the four softmax maps.",
        "Dice is per slice, averaged over slices (a region absent from both prediction and truth scores 1); the "
        "interval is a 95% bootstrap over test cases. These 2D per-slice scores are not comparable to the "
        "BraTS 2023 leaderboard's lesion-wise 3D Dice.",
    ]
    text = "\n".join(lines) + "\n"
    (out / "comparison.md").write_text(text)
    (out / "comparison.json").write_text(json.dumps(records, indent=2, default=float))
    return text

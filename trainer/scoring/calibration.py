"""Probabilities that mean what they say: temperature scaling (Guo et al., 2017), one temperature per output (each
region's sigmoid, or the softmax over classes), fitted on validation voxels inside the brain, and the expected
calibration error (ECE) with its reliability curve before and after.

Dice-trained networks push probabilities to 0 and 1 (nnU-Net issue 2763); a temperature above 1 softens them. A
temperature never moves a label: a sigmoid's 0.5 and a softmax's largest class stay where they are. Numpy only."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from builder.format import REGIONS
from trainer.outputs import write_json
from trainer.scoring.brats import region_mask

CALIBRATION_FILE = "calibration.json"
DIAGRAM_FILE = "calibration.png"  # its reliability diagram (trainer.commands.report.reliability_png)
BINS = 15
#: Temperatures searched (log-spaced bounds); an optimum on a bound did not converge.
LOWEST, HIGHEST = 0.05, 20.0
EPS = 1e-4  # float16 probabilities hold logits to about +-9


@dataclass(frozen=True)
class Calibration:
    """Temperatures of one task's outputs, and what they were fitted on."""

    task: str
    temperatures: tuple[float, ...]  # one per region sigmoid (regions), or one for the softmax
    fitted_on: str
    ece_before: float
    ece_after: float

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(outputs, ...) probabilities with the temperatures applied, float32 (a float16 copy may round a value
        next to 0.5 onto it: labels are drawn before calibration)."""
        logits = logits_of(probs, self.task)
        if self.task == "regions":
            scaled = logits / np.array(self.temperatures, np.float32).reshape(-1, *[1] * (probs.ndim - 1))
            return 1 / (1 + np.exp(-scaled))
        scaled = logits / np.float32(self.temperatures[0])
        scaled -= scaled.max(0, keepdims=True)
        exp = np.exp(scaled)
        return exp / exp.sum(0, keepdims=True)

    def describe(self) -> str:
        values = ", ".join(f"{t:.2f}" for t in self.temperatures)
        return (f"temperature {values} (fitted on {self.fitted_on}; voxel ECE {self.ece_before:.4f} -> "
                f"{self.ece_after:.4f})")


def logits_of(probs: np.ndarray, task: str) -> np.ndarray:
    """Logits that give ``probs`` back (a softmax's up to a constant per voxel), float32."""
    p = np.clip(probs.astype(np.float32), EPS, 1 - EPS)
    return np.log(p / (1 - p)) if task == "regions" else np.log(p)


def _nll(logits: np.ndarray, targets: np.ndarray, temperature: float, task: str) -> float:
    scaled = logits / temperature
    if task == "regions":  # binary cross-entropy of one sigmoid: log(1 + e^-z) for positives, log(1 + e^z) else
        signed = np.where(targets, scaled, -scaled)
        return float(np.logaddexp(0, -signed).mean())
    scaled = scaled - scaled.max(0, keepdims=True)
    log_sum = np.log(np.exp(scaled).sum(0))
    return float((log_sum - np.take_along_axis(scaled, targets[None].astype(np.int64), 0)[0]).mean())


def fit_temperature(logits: np.ndarray, targets: np.ndarray, task: str) -> float:
    """The temperature that minimises the negative log-likelihood (golden-section search over log T: the NLL is
    convex in 1/T). ValueError when the optimum lies on a bound of ``LOWEST``..``HIGHEST``."""
    low, high = math.log(LOWEST), math.log(HIGHEST)
    ratio = (math.sqrt(5) - 1) / 2
    a, b = high - ratio * (high - low), low + ratio * (high - low)
    fa, fb = _nll(logits, targets, math.exp(a), task), _nll(logits, targets, math.exp(b), task)
    for _ in range(60):
        if fa < fb:
            high, b, fb = b, a, fa
            a = high - ratio * (high - low)
            fa = _nll(logits, targets, math.exp(a), task)
        else:
            low, a, fa = a, b, fb
            b = low + ratio * (high - low)
            fb = _nll(logits, targets, math.exp(b), task)
    best = math.exp((low + high) / 2)
    if best < LOWEST * 1.01 or best > HIGHEST * 0.99:
        raise ValueError(f"the temperature did not converge (it ran to the bound {best:.2f} of {LOWEST}..{HIGHEST})")
    return best


def reliability(confidence: np.ndarray, correct: np.ndarray, bins: int = BINS) -> tuple[float, list[dict]]:
    """The ECE (the voxel-weighted gap between confidence and accuracy over equal-width bins) and the curve."""
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    curve, ece = [], 0.0
    for b in range(bins):
        inside = index == b
        if inside.any():
            mean_confidence, accuracy = float(confidence[inside].mean()), float(correct[inside].mean())
            ece += inside.mean() * abs(mean_confidence - accuracy)
            curve.append({"bin": b, "confidence": mean_confidence, "accuracy": accuracy, "voxels": int(inside.sum())})
    return float(ece), curve


def confidence_and_correct(probs: np.ndarray, targets: np.ndarray, task: str) -> tuple[np.ndarray, np.ndarray]:
    """Per voxel (each region's sigmoid counts as its own binary prediction): the confidence in the predicted value
    and whether it is right."""
    if task == "regions":
        p = probs.astype(np.float32).ravel()
        predicted = p > 0.5
        return np.where(predicted, p, 1 - p), predicted == targets.ravel()
    p = probs.astype(np.float32)
    return p.max(0), p.argmax(0) == targets


def calibrate(probs: np.ndarray, targets: np.ndarray, task: str, fitted_on: str) -> tuple[Calibration, dict]:
    """Fit the temperatures on (outputs, N) voxel probabilities and their targets ((outputs, N) booleans for regions,
    (N,) class indices otherwise); returns the calibration and the reliability curves before and after."""
    logits = logits_of(probs, task)
    if task == "regions":
        temperatures = tuple(fit_temperature(logits[r], targets[r], task) for r in range(len(probs)))
    else:
        temperatures = (fit_temperature(logits, targets, task),)
    before = reliability(*confidence_and_correct(probs, targets, task))
    unsaved = Calibration(task, temperatures, fitted_on, before[0], before[0])
    after = reliability(*confidence_and_correct(unsaved.apply(probs), targets, task))
    return Calibration(task, temperatures, fitted_on, before[0], after[0]), {"before": before[1], "after": after[1]}


def save_calibration(run_dir: Path, calibration: Calibration, curves: dict, **about: object) -> None:
    write_json(run_dir / CALIBRATION_FILE, {**asdict(calibration), **about, "curves": curves})


def load_calibration(run_dir: Path, members: list[str], tta: bool) -> Calibration | None:
    """The calibration stored in ``run_dir`` if it was fitted for these ``members`` and mirroring (the probabilities
    it was fitted on), else None."""
    path = run_dir / CALIBRATION_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
        calibration = Calibration(str(record["task"]), tuple(float(t) for t in record["temperatures"]),
                                  str(record["fitted_on"]), float(record["ece_before"]), float(record["ece_after"]))
        fitted_for = (list(record["members"]), bool(record["tta"]))
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{path}: not a calibration brats2d wrote; delete it, or fit it again with `brats-train "
                         "evaluate RUN --volumes DIR --split val --calibrate`") from None
    return calibration if fitted_for == (members, tta) else None


class VoxelSample:
    """Voxels inside the brain drawn from each case (at most ``per_case``, seeded), with their targets: what the
    temperatures are fitted on without holding every volume."""

    def __init__(self, task: str, per_case: int = 100_000) -> None:
        self.task, self.per_case = task, per_case
        self.probs: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.random = np.random.default_rng(0)

    def add(self, probs: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> None:
        """A case's (outputs, X, Y, Z) probabilities, its BraTS labels and its brain mask."""
        inside = np.flatnonzero(brain)
        chosen = self.random.choice(inside, min(self.per_case, inside.size), replace=False)
        flat = probs.reshape(len(probs), -1)[:, chosen]
        labels = truth.ravel()[chosen]
        if self.task == "regions":
            target = np.stack([region_mask(labels, r) for r in REGIONS])
        else:
            target = (labels > 0).astype(np.int64) if self.task == "binary" else labels.astype(np.int64)
        self.probs.append(flat)
        self.targets.append(target)

    def calibrate(self, fitted_on: str) -> tuple[Calibration, dict]:
        if not self.probs:
            raise ValueError("no voxels to fit on")
        return calibrate(np.concatenate(self.probs, axis=-1), np.concatenate(self.targets, axis=-1), self.task,
                         fitted_on)

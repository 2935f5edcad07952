"""The `fit` loop against the bare training step it calls, on this machine's CPU: images/s of each, same model,
batch, crops and data, measured side by side in one run. Target: fit within 1.1x of the bare step.

    python benchmarks/bench_step.py
"""

from __future__ import annotations

import csv
import dataclasses
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact  # noqa: E402
from trainer.training.loop import fit  # noqa: E402

from common import replicated_artifact, report  # noqa: E402
from steps import bare_step_rate  # noqa: E402

BATCH, EPOCHS = 8, 3


def fit_rate(config: FitConfig) -> tuple[float, float]:
    """Median train images/s over the epochs after the first, and the mean share of `other` time per epoch."""
    with tempfile.TemporaryDirectory() as out:
        run = fit(dataclasses.replace(config, out=out))
        with open(run / "metrics.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))[1:]
    rates = sorted(float(r["train_images_per_s"]) for r in rows)
    other = sum(float(r["other_seconds"]) for r in rows) / sum(float(r["seconds"]) for r in rows)
    return rates[len(rates) // 2], other


def main() -> None:
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = replicated_artifact(400, "rows400", source_cases=60)
    artifact = Artifact.open(path)
    # the demo's settings (Makefile DEMO_ARGS) on a 400-row file, rows read in the main process: on 2 cores a
    # DataLoader worker process takes CPU from the two compute threads, which is the machine, not the loop
    config = FitConfig(data=str(path), modality="t2f", encoder="resnet18", encoder_weights=None, batch_size=BATCH,
                       crop=128, workers=0, device="cpu", epochs=EPOCHS, patience=EPOCHS)
    steps = len(artifact.splits["train"]) // BATCH
    before, _ = bare_step_rate(config, artifact, torch.device("cpu"), warmup=3, steps=steps)
    looped, other = fit_rate(config)
    after, _ = bare_step_rate(config, artifact, torch.device("cpu"), warmup=3, steps=steps)
    bare = max(before, after)  # the faster of two bare runs, one on each side of fit: drift cannot flatter fit
    print(f"Unet/resnet18, t2f, batch {BATCH}, 128x128 crops, CPU ({torch.get_num_threads()} threads): "
          f"bare train_step {before:.1f} and {after:.1f} images/s, fit loop {looped:.1f} images/s")
    report("bare step / fit loop images/s", bare / looped, "<= 1.1", bare / looped <= 1.1)
    report("share of an epoch outside train and val passes (%)", 100 * other, "<= 5", other <= 0.05)


if __name__ == "__main__":
    main()

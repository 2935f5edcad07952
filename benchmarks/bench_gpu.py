"""The fast path on a GPU: images/s of the training step `fit` calls (trainer.training.step.train_step) and peak GPU
memory, streaming from the file against the device cache, with AMP and channels-last, compiled and not (same
model, same batch); then `fit` itself on the same settings, to set its images/s beside the bare step's. Needs CUDA.

    python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import csv
import dataclasses
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact  # noqa: E402
from trainer.training.loop import fit  # noqa: E402

from common import replicated_artifact  # noqa: E402
from steps import bare_step_rate  # noqa: E402

BATCH, WARMUP, STEPS = 64, 8, 60


def fit_epochs(config: FitConfig, out: Path) -> list[dict[str, str]]:
    """`fit` for 5 epochs of ``config``: its metrics.csv rows after the first (which holds the warm-up)."""
    run = fit(dataclasses.replace(config, epochs=5, patience=5, out=str(out)))
    with open(run / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))[1:]


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA device"
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True  # as `fit` sets it on CUDA
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    path = replicated_artifact(1251, "rows1251")
    artifact = Artifact.open(path)
    base = FitConfig(data=str(path), modality="t2f", encoder="resnet34", encoder_weights=None, batch_size=BATCH,
                     workers=8, device="cuda", augment=True)
    variants = {
        "stream (8 workers), bf16 AMP, channels-last": dict(cache="stream"),
        "device cache, bf16 AMP, channels-last": dict(cache="device"),
        "device cache, bf16 AMP, channels-last, compiled": dict(cache="device", compile=True),
        "stream (8 workers), bf16 AMP, channels-last, compiled": dict(cache="stream", compile=True),
        "device cache, fp32": dict(cache="device", amp=False),
    }
    print(f"Unet/resnet34, t2f, 1251-row file, batch {BATCH}, whole 240x240 slices padded to 256:")
    for name, change in variants.items():
        rate, memory = bare_step_rate(dataclasses.replace(base, **change), artifact, device, WARMUP, STEPS)
        print(f"  {name:<55} {rate:7.0f} images/s   peak GPU memory {memory:5.2f} GiB", flush=True)
    print("end-to-end `fit` (cache auto, 5 epochs; images/s of the training passes, share of other time):", flush=True)
    for row in fit_epochs(base, Path("/tmp/gpu-runs")):
        print(f"  epoch {row['epoch']}: {float(row['train_images_per_s']):7.0f} images/s, other "
              f"{float(row['other_seconds']) / float(row['seconds']):.1%} of {float(row['seconds']):.2f} s", flush=True)


if __name__ == "__main__":
    main()

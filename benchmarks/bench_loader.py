"""Will the model ever wait for data? Loader throughput from the file (0 and 2 workers) against the model's
training step rate, side by side in one run; and the per-batch cost of the device cache against streaming."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact
from trainer.data.inputs import NetworkInputs  # noqa: E402
from trainer.data.loading import DeviceCache, RowReader, SliceDataset, make_loader  # noqa: E402
from trainer.training.model import build_model  # noqa: E402
from trainer.training.step import make_loss  # noqa: E402

from common import replicated_artifact  # noqa: E402

BATCH = 16


def loader_rate(dataset: SliceDataset, workers: int, batches: int = 40) -> float:
    loader = make_loader(dataset, BATCH, True, workers, seed=0)
    loader.sampler.set_epoch(0)
    seen, start = 0, None
    for i, (images, _, _) in enumerate(loader):
        if i == 2:  # after the workers' start-up
            start, seen = time.perf_counter(), 0
        seen += images.shape[0]
        if i == batches + 2:
            break
    return seen / (time.perf_counter() - start)


def step_rate(config: FitConfig, artifact: Artifact, device: torch.device, steps: int = 6) -> float:
    model = build_model(config.arch, config.encoder, None, len(config.channels), config.classes).to(device)
    optimizer = torch.optim.AdamW(model.parameters())
    loss_fn = make_loss(config.loss, config.task)
    batches = NetworkInputs(config, device)
    dataset = SliceDataset(RowReader(artifact.path, config.channels), artifact.splits["train"][:BATCH])
    images = torch.stack([dataset[i][0] for i in range(BATCH)])
    labels = torch.stack([dataset[i][1] for i in range(BATCH)])
    inputs, target = batches.inputs(images, labels)
    for i in range(steps + 1):
        if i == 1:
            start = time.perf_counter()
        logits = batches.crop(model(inputs), target)
        loss = loss_fn(logits, target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * BATCH / (time.perf_counter() - start)


def main() -> None:
    path = replicated_artifact(1251, "rows1251")
    artifact = Artifact.open(path)
    device = torch.device("cpu")
    config = FitConfig(data=str(path), modality="t2f", encoder="resnet34", encoder_weights=None)
    train = SliceDataset(RowReader(path, ["t2f"]), artifact.splits["train"])
    fused = SliceDataset(RowReader(path, ["t1n", "t1c", "t2w", "t2f"]), artifact.splits["train"])
    rates = {f"{name}, {w} workers": loader_rate(ds, w) for name, ds in (("t2f", train), ("4 modalities", fused))
             for w in (0, 2)}
    model = step_rate(config, artifact, device)
    print(f"model training steps (Unet/resnet34, 1x240x240 padded to 256, batch {BATCH}, {device}): {model:.1f} images/s")
    for name, rate in rates.items():
        print(f"loader from the file ({name}): {rate:7.0f} slices/s = {rate / model:6.1f}x the model's rate")

    cache = DeviceCache(train, BATCH, True, 0, device)
    cache.sampler.set_epoch(0)
    start, n = time.perf_counter(), 0
    for images, _, _ in cache:
        n += 1
    per_batch_cache = (time.perf_counter() - start) / n
    loader = make_loader(train, BATCH, True, 0, seed=0)
    loader.sampler.set_epoch(0)
    start, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += 1
    per_batch_stream = (time.perf_counter() - start) / n
    print(f"data path per batch of {BATCH} on {device}: streaming (0 workers) {per_batch_stream * 1e3:.2f} ms, "
          f"device cache {per_batch_cache * 1e3:.3f} ms ({per_batch_stream / per_batch_cache:.0f}x less)")


if __name__ == "__main__":
    main()

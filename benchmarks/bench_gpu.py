"""The fast path on a GPU: training images/s and peak GPU memory, streaming from the file against the
device cache, with AMP and channels-last, compiled and not (same model, same batch). Needs CUDA.

    python benchmarks/bench_gpu.py
"""

from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import replicated_artifact  # noqa: E402

from trainer.data import Artifact  # noqa: E402
from trainer.model import build_model  # noqa: E402
from trainer.train import (Batches, FitConfig, autocast_context, autocast_dtype, fit, make_loss,  # noqa: E402
                           make_optimizer, make_source)
from trainer.distributed import World  # noqa: E402

BATCH, WARMUP, STEPS = 32, 8, 60


def images_per_second(config: FitConfig, artifact: Artifact, device: torch.device) -> tuple[float, float]:
    torch.manual_seed(0)
    model = build_model(config.arch, config.encoder, None, len(config.channels), config.classes).to(device)
    model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if config.compile else model
    optimizer = make_optimizer(model, config, device)
    amp = autocast_dtype(device, config.amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == torch.float16)
    loss_fn = make_loss(config.loss).to(device)
    batches = Batches(config, artifact.slice_shape, device)
    source = make_source(config, artifact, "train", True, device, World(), config.cache == "device")
    generator = torch.Generator(device=device).manual_seed(0)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    done, epoch, start = 0, 0, None
    while done < WARMUP + STEPS:
        source.sampler.set_epoch(epoch)
        for images, labels, _ in source:
            if done == WARMUP:
                if cuda:
                    torch.cuda.synchronize()
                start = time.perf_counter()
            inputs, target = batches.inputs(images, labels, generator)
            with autocast_context(device, amp):
                loss = loss_fn(batches.crop(network(inputs), target).float(), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            done += 1
            if done == WARMUP + STEPS:
                break
        epoch += 1
    if cuda:
        torch.cuda.synchronize()
    return STEPS * BATCH / (time.perf_counter() - start), torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0


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
        rate, memory = images_per_second(dataclasses.replace(base, **change), artifact, device)
        print(f"  {name:<55} {rate:7.0f} images/s   peak GPU memory {memory:5.2f} GiB", flush=True)
    print("end-to-end `fit` (cache auto, 2 epochs of 20 steps):", flush=True)
    run = fit(dataclasses.replace(base, epochs=2, max_steps=40, out="/tmp/gpu-runs"))
    print((run / "metrics.csv").read_text().splitlines()[-1][:200])


if __name__ == "__main__":
    main()

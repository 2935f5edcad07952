"""Time the training step `fit` calls (``trainer.training.step.train_step``) with nothing around it, to set beside `fit`.

Shared by bench_step.py (CPU, in `make bench`) and bench_gpu.py (CUDA).
"""

from __future__ import annotations

import time

import torch

from trainer.config import FitConfig
from trainer.data.artifact import Artifact
from trainer.data.inputs import NetworkInputs, make_source
from trainer.device import autocast_dtype
from trainer.device import channels_last as layout_of
from trainer.training.model import build_model
from trainer.training.step import Optimiser, make_loss, train_step


def bare_step_rate(config: FitConfig, artifact: Artifact, device: torch.device, warmup: int, steps: int,
                   channels_last: bool | None = None) -> tuple[float, float]:
    """Images/s of ``train_step`` alone on batches already in memory (read once from the run's own source), and
    peak GPU memory in GiB (0 on a CPU). Same model, optimiser, schedule, AMP and augmentation as `fit`; the memory
    layout as `fit` chooses it (channels-last on CUDA) unless ``channels_last`` says otherwise."""
    channels_last = layout_of(device) if channels_last is None else channels_last
    torch.manual_seed(config.seed)
    model = build_model(config.arch, config.encoder, None, len(config.channels), config.classes,
                        config.decoder_channels).to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    network = torch.compile(model) if config.compile else model
    amp = autocast_dtype(device, config.amp)
    optimiser = Optimiser.create(model, config, device, amp, warmup + steps, warmup + steps)
    loss_fn = make_loss(config.loss, config.task).to(device)
    batches = NetworkInputs(config, device)
    batches.channels_last = channels_last
    source = make_source(config, artifact, "train", True, device, config.cache == "device")
    held: list[tuple[torch.Tensor, torch.Tensor]] = []
    epoch = 0
    while len(held) < warmup + steps:
        source.sampler.set_epoch(epoch)  # type: ignore[attr-defined]
        held += [(images.to(device), labels.to(device)) for images, labels, _ in source]
        epoch += 1
    generator = torch.Generator(device=device).manual_seed(0)
    network.train()
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i, (images, labels) in enumerate(held[: warmup + steps]):
        if i == warmup:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
        train_step(network, batches, images, labels, generator, loss_fn, optimiser, amp)
    if cuda:
        torch.cuda.synchronize()
    rate = steps * config.batch_size / (time.perf_counter() - start)  # type: ignore[operator]
    return rate, torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

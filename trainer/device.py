"""Where a run computes and at what precision: the device by name, its default batch size, and autocast."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from trainer.errors import CommandError

#: The batch size when none is given: what a CPU gets through in reasonable time, and what fills a GPU.
DEFAULT_BATCH_SIZE = {"cpu": 16, "cuda": 64}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CommandError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CommandError(f"--device {name}: not a device torch knows; use auto, cpu, cuda or cuda:N") from None


def default_batch_size(device: torch.device, train_rows: int) -> int:
    """The device's default batch size, but never more than the train split holds."""
    return min(DEFAULT_BATCH_SIZE.get(device.type, DEFAULT_BATCH_SIZE["cpu"]), train_rows)


def channels_last(device: torch.device) -> bool:
    """Whether models and inputs use the channels-last memory layout: on CUDA; on a CPU it measured 1.01-1.03x
    (benchmarks/bench_cpu.py), no gain, so tensors stay contiguous there."""
    return device.type == "cuda"


def autocast_dtype(device: torch.device, amp: bool) -> torch.dtype | None:
    """bf16 where the GPU supports it, else fp16 (with a grad scaler); no autocast on CPUs."""
    if not amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast_context(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to ``dtype`` on the device, or nothing when mixed precision is off."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()

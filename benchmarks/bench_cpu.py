"""What pays on a CPU, per training step: channels-last memory layout, the number of torch threads and the decoder's
width (`fit --decoder-channels`), timed on the training step `fit` calls (``trainer.training.step.train_step``), side
by side in one run, rounds interleaved.

    python benchmarks/bench_cpu.py

Issue 20 asks whether `channels_last` and the thread count buy anything on a CPU at the demo's and the recipe's
settings (Unet/resnet18, 128x128 crops); what does not pay stays out of `fit`, with this measurement in the README.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from trainer.config import FitConfig  # noqa: E402
from trainer.data.artifact import Artifact  # noqa: E402

from common import replicated_artifact  # noqa: E402
from steps import bare_step_rate  # noqa: E402

ROUNDS, WARMUP, STEPS = 3, 2, 8


def main() -> None:
    path = replicated_artifact(400, "rows400", source_cases=60)
    artifact = Artifact.open(path)
    cores = torch.get_num_threads()
    single, fused = "t2f, batch 8, contiguous (fit's CPU default)", "4 modalities, batch 16, contiguous (recipe)"
    variants = {  # name: (modality, batch, threads, channels-last, decoder channels, the default it is set beside)
        single: ("t2f", 8, cores, False, None, single),
        "t2f, batch 8, channels-last": ("t2f", 8, cores, True, None, single),
        "t2f, batch 8, contiguous, 1 thread": ("t2f", 8, 1, False, None, single),
        fused: ("all", 16, cores, False, None, fused),
        "4 modalities, batch 16, channels-last": ("all", 16, cores, True, None, fused),
        "4 modalities, batch 16, decoder 128 (--decoder-channels 128)": ("all", 16, cores, False, 128, fused),
        "4 modalities, batch 16, decoder 64": ("all", 16, cores, False, 64, fused),
    }
    rates: dict[str, list[float]] = {name: [] for name in variants}
    order = list(variants.items())
    for round_ in range(ROUNDS):  # interleaved, reversed every other round: drift hits every variant alike
        for name, (modality, batch, threads, channels_last, decoder, _) in order[::-1] if round_ % 2 else order:
            torch.set_num_threads(threads)
            config = FitConfig(data=str(path), modality=modality, encoder="resnet18", encoder_weights=None,
                               batch_size=batch, crop=128, workers=0, device="cpu", decoder_channels=decoder)
            rate, _ = bare_step_rate(config, artifact, torch.device("cpu"), WARMUP, STEPS, channels_last)
            rates[name].append(rate)
    torch.set_num_threads(cores)
    print(f"Unet/resnet18 train_step on 128x128 crops, CPU ({cores} threads unless said), {ROUNDS} rounds of "
          f"{STEPS} timed steps; median images/s:")
    print("\n| variant | images/s | vs its contiguous default |\n|---|---|---|")
    median = {name: statistics.median(values) for name, values in rates.items()}
    for name, (*_, base) in variants.items():
        print(f"| {name} | {median[name]:.1f} | {median[name] / median[base]:.2f}x |")


if __name__ == "__main__":
    main()

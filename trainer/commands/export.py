"""Export a run's model for other runtimes: TorchScript (``torch.jit``, no brats2d needed to run it) or ONNX
(onnxruntime, TensorRT, ...), with a JSON sidecar saying what goes in and what comes out.

The exported graph is the network alone: it takes (N, C, H, W) float32 slices already normalised the run's way
(per slice and channel over the brain's non-zero pixels), H and W multiples of 32, channels in the order the sidecar
lists (each modality with its neighbouring slices), and returns (N, outputs, H, W) logits (softmax over classes, or
sigmoids per region for ``--task regions``; see trainer/tasks.py for turning them into labels).
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path
from typing import Any

import torch

from trainer.commands.predict import output_names
from trainer.config import FitConfig
from trainer.data.context import input_names
from trainer.errors import CommandError
from trainer.outputs import atomic_outputs, json_text
from trainer.training.model import load_model

FORMATS = {"torchscript": ".pt", "onnx": ".onnx"}


def export_model(run_dir: Path, fmt: str, out: Path | None = None, checkpoint: str = "best.pt") -> tuple[Path, Path]:
    """Write the model as ``fmt`` to ``out`` (default ``RUN/model.pt`` or ``model.onnx``) and its sidecar
    ``<out>.json``; returns both paths. Needs the ``onnx`` package for ONNX (``pip install 'brats2d[export]'``)."""
    if fmt not in FORMATS:
        raise CommandError(f"--format {fmt}: use {' or '.join(FORMATS)}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (torch's exporter needs it)
        except ImportError:
            raise CommandError("--format onnx needs the onnx package: pip install 'brats2d[export]'") from None
    model, saved = load_model(run_dir / checkpoint)
    config = FitConfig.from_dict(saved, str(run_dir / checkpoint))
    out = out or run_dir / f"model{FORMATS[fmt]}"
    example = torch.zeros(1, config.in_channels, 64, 64)
    network = io.BytesIO()  # serialised in memory: torch's file writer aborts the process when a write fails
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warns about shape-dependent branches that are fixed for a U-Net
        if fmt == "torchscript":
            torch.jit.save(torch.jit.trace(model, example), network)
        else:
            axes = {0: "batch", 2: "height", 3: "width"}
            torch.onnx.export(model, (example,), network, input_names=["slices"], output_names=["logits"],
                              dynamic_axes={"slices": axes, "logits": axes}, dynamo=False)
    sidecar = out.with_name(out.name + ".json")
    with atomic_outputs(out, sidecar) as (network_partial, sidecar_partial):  # both or neither
        network_partial.write_bytes(network.getvalue())
        sidecar_partial.write_text(json_text(describe(config, fmt, run_dir / checkpoint)))
    return out, sidecar


def describe(config: FitConfig, fmt: str, checkpoint: Path) -> dict[str, Any]:
    return {
        "format": fmt, "from": str(checkpoint), "task": config.task,
        "input": {"name": "slices", "shape": "(N, C, H, W) float32, H and W multiples of 32",
                  "channels": input_names(config.channels, config.context),
                  "normalisation": f"{config.norm} per slice and channel over its non-zero (brain) pixels; zero "
                                   "outside the brain",
                  "slices": f"{config.plane} (volume axis {config.slice_axis}) of volumes in orientation "
                            f"{''.join(config.axis_codes or [])} at {config.voxel_size} mm"},
        "output": {"name": "logits", "shape": "(N, outputs, H, W) float32",
                   "outputs": output_names(config.task),
                   "to_probabilities": "sigmoid per output" if config.task == "regions" else "softmax over outputs"},
        "configuration": json.loads(json.dumps(config.to_dict(), default=str)),
    }

"""Pictures a run leaves behind: learning curves and sample predictions, coloured by BraTS region.

Every slice is drawn as radiologists read it, worked out from the volume's axis codes (never assumed), with the
orientation letters on its edges: axial slices anterior up and the patient's right on the viewer's left, coronal
slices superior up and right on the left, sagittal slices superior up and anterior on the left. Layouts are fixed
(no tight_layout): a run draws its pictures in a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.patches import Patch

from builder.format import DEFAULT_AXIS_CODES
from trainer.tasks import classes, probabilities

#: RGBA per label: NCR red, ED green, ET yellow (the usual BraTS colours); background transparent.
LABEL_COLOURS = np.array([[0, 0, 0, 0], [1, 0.15, 0.15, 0.8], [0.2, 0.85, 0.2, 0.55], [1, 0.9, 0, 0.85]])
LEGEND = [Patch(color=LABEL_COLOURS[label][:3], label=name)
          for label, name in ((1, "necrotic core (NCR)"), (2, "oedema (ED)"), (3, "enhancing tumour (ET)"))]
CURVES = (("loss", "loss"), ("pixel_accuracy", "pixel accuracy"), ("mean_iou", "mean IoU"), ("mse", "MSE"),
          ("dice_mean", "mean region Dice"), ("dice_WT", "Dice WT"))
_OPPOSITE = {"L": "R", "R": "L", "A": "P", "P": "A", "S": "I", "I": "S"}


def overlay(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels 0..3 to an RGBA image to draw over a grey slice."""
    return LABEL_COLOURS[np.clip(labels, 0, 3)]


def slice_codes(axis_codes: Sequence[str], slice_axis: int = 2) -> tuple[str, str]:
    """The axis codes of a slice's two axes: the volume's, less the axis it was sliced along."""
    codes = [str(c).upper() for i, c in enumerate(axis_codes) if i != slice_axis]
    return codes[0], codes[1]


def radiological(image: np.ndarray, codes: Sequence[str]) -> tuple[np.ndarray, tuple[str, str, str, str]]:
    """A stored slice (its two axes named by ``codes``, where each letter is the direction the index grows towards)
    as radiologists read it, and the letters of its top, bottom, left and right edges.

    Up is superior when the slice has a superior-inferior axis (coronal, sagittal), else anterior (axial); across
    runs from the patient's right to left (axial, coronal), or from anterior to posterior (sagittal)."""
    first, second = (str(c).upper() for c in codes[:2])
    vertical = next((axis for axis, c in enumerate((first, second)) if c in "SI"),
                    next((axis for axis, c in enumerate((first, second)) if c in "AP"), 0))
    shown = image if vertical == 0 else image.T  # rows along the vertical axis
    down, across = (first, second) if vertical == 0 else (second, first)
    top = "S" if down in "SI" else "A"
    if down == top:  # the index grows towards the top: flip so that it grows downwards
        shown, down = shown[::-1], _OPPOSITE[down]
    left = "R" if across in "LR" else "A"
    if across == left:
        shown, across = shown[:, ::-1], _OPPOSITE[across]
    return shown, (top, down, left, across)


def show_slice(ax: plt.Axes, image: np.ndarray, labels: np.ndarray | None = None, title: str = "",
               codes: Sequence[str] = DEFAULT_AXIS_CODES[:2]) -> None:
    """A slice as radiologists read it (``radiological``), optionally with labels over it, its edges lettered."""
    shown, (top, bottom, left, right) = radiological(image, codes)
    ax.imshow(shown, cmap="gray", origin="upper")
    if labels is not None:
        ax.imshow(overlay(radiological(labels, codes)[0]), origin="upper", interpolation="nearest")
    style = dict(color="white", fontsize=6, fontweight="bold", transform=ax.transAxes)
    ax.text(0.5, 0.98, top, ha="center", va="top", **style)
    ax.text(0.5, 0.02, bottom, ha="center", va="bottom", **style)
    ax.text(0.02, 0.5, left, ha="left", va="center", **style)
    ax.text(0.98, 0.5, right, ha="right", va="center", **style)
    ax.set_title(title, fontsize=7)
    ax.axis("off")


def panel_grid(rows: int, columns: int, width: float, height: float, top: float = 0.86) -> tuple[plt.Figure, np.ndarray]:
    """A figure of slice panels with a fixed layout, room for a title above and a legend below."""
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows + 0.9), squeeze=False)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.7 / (height * rows + 0.9), top=top, wspace=0.05, hspace=0.3)
    fig.legend(handles=LEGEND, loc="lower center", ncol=3, fontsize=7, frameon=False)
    return fig, axes


def sample_positions(artifact, split: str, count: int) -> list[int]:
    """Positions within ``split``'s rows of different patients' most tumour-laden rows, most tumour first."""
    from builder.layout import patient_of
    from builder.remote import open_h5

    rows = artifact.splits[split]
    best: dict[str, tuple[int, int]] = {}
    with open_h5(artifact.path) as f:
        for position, row in enumerate(rows):
            tumour = int(np.count_nonzero(f["seg"][int(row)]))
            patient = patient_of(str(artifact.case_ids[row]))
            if patient not in best or tumour > best[patient][1]:
                best[patient] = (position, tumour)
    return [position for position, _ in sorted(best.values(), key=lambda item: -item[1])[:count]]


def plot_curves(rows: Sequence[dict[str, float]], path: Path) -> None:
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, wspace=0.25, hspace=0.35)
    for ax, (key, title) in zip(axes.flat, CURVES):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{key}", np.nan) for r in rows]
            ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("per-slice metrics (not comparable to BraTS leaderboard 3D lesion-wise scores)", fontsize=9)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def slice_dice(pred: np.ndarray, truth: np.ndarray, task: str) -> float:
    """The mean region Dice of one slice (``trainer.training.metrics.region_dice``): what a panel's title reports."""
    from trainer.training.metrics import region_dice

    return float(region_dice(torch.as_tensor(pred)[None].long(), torch.as_tensor(truth)[None].long(), task).mean())


def plot_samples(model: torch.nn.Module, config, artifact, inputs, path: Path, count: int = 4) -> None:
    """A few validation slices: the input, the truth and the prediction of ``model`` (in eval mode, on
    ``inputs.device``), trained as ``config`` says."""
    from trainer.data.context import own_slice
    from trainer.data.inputs import dataset_for

    rows = artifact.splits["val"][sample_positions(artifact, "val", count)]
    dataset = dataset_for(config, artifact, rows)
    items = [dataset[i] for i in range(len(rows))]
    images, truth = torch.stack([item[0] for item in items]), torch.stack([item[1] for item in items]).numpy()
    with torch.no_grad():
        batch, target = inputs.inputs(images, torch.from_numpy(truth))
        pred = classes(probabilities(inputs.crop(model(batch), target), config.task), config.task).cpu().numpy()
    if config.task == "binary":
        truth = (truth > 0).astype(np.uint8)
    scale = 2 if config.task == "binary" else 1  # binary: the whole tumour drawn in the oedema colour
    shown = config.channels[-1]
    centre = own_slice(len(config.channels) - 1, config.context)  # the last channel's own slice, not a neighbour
    codes = slice_codes(artifact.axis_codes, artifact.slice_axis)
    fig, axes = panel_grid(len(rows), 3, 2.5, 2.6)
    for i, row in enumerate(rows):
        name = f"{artifact.case_ids[row]} {artifact.plane} {artifact.slice_index[row]}"
        image = images[i, centre].numpy()
        show_slice(axes[i, 0], image, None, f"input: {shown}\n{name}", codes)
        show_slice(axes[i, 1], image, truth[i] * scale, "truth", codes)
        show_slice(axes[i, 2], image, pred[i] * scale,
                   f"model: Dice {slice_dice(pred[i], truth[i], config.task):.2f}", codes)
    fig.suptitle(f"validation slices of different patients, as radiologists read them ({config.task} model)", fontsize=9)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _case_panels(axes, artifact, row: int, seg: np.ndarray, predictions: dict[str, np.ndarray], images: dict,
                 names: dict[str, str], task: str) -> None:
    from builder.format import MODALITIES

    codes = slice_codes(artifact.axis_codes, artifact.slice_axis)
    base = images["t2f"]
    for ax, modality in zip(axes, MODALITIES):
        show_slice(ax, images[modality], None, f"input: {names.get(modality, modality)}", codes)
    scale = 2 if task == "binary" else 1
    show_slice(axes[4], base, seg * scale, f"truth\n{artifact.case_ids[row]}", codes)
    for ax, (name, labels) in zip(axes[5:], predictions.items()):
        show_slice(ax, base, labels * scale, f"model: {names.get(name, name)}\nDice {slice_dice(labels, seg, task):.2f}",
                   codes)


def plot_comparison(artifact, rows: np.ndarray, seg: np.ndarray, predicted: dict[str, torch.Tensor], task: str,
                    out: Path, names: dict[str, str], cases_in_png: int = 4, frames: int = 24) -> None:
    """comparison.png (a few test cases, every approach) and comparison.gif (one test case per frame): the four
    input modalities, the truth, then each approach's prediction with its Dice on that slice."""
    from PIL import Image

    from builder.format import MODALITIES
    from builder.remote import open_h5

    shown = sample_positions(artifact, "test", frames)  # different patients, their most tumour-laden rows
    rows, seg = rows[shown], seg[shown]
    with open_h5(artifact.path) as f:
        images = [{m: f[m][int(row)] for m in MODALITIES} for row in rows]
    labels = {name: classes(p[shown].float(), task).numpy() for name, p in predicted.items()}
    truth = seg if task != "binary" else (seg > 0).astype(np.uint8)
    panels = 5 + len(labels)
    count = min(cases_in_png, len(shown))
    title = "test cases: four inputs (left), the truth, then each model's prediction with its Dice on the slice"
    fig, axes = panel_grid(count, panels, 1.45, 1.6)
    for i in range(count):
        _case_panels(axes[i], artifact, int(rows[i]), truth[i], {k: v[i] for k, v in labels.items()}, images[i], names,
                     task)
    fig.suptitle(title, fontsize=9)
    fig.savefig(out / "comparison.png", dpi=90)
    plt.close(fig)
    pictures = []
    columns = (panels + 1) // 2
    for i in range(len(shown)):
        fig, axes = panel_grid(2, columns, 1.6, 1.8, top=0.84)
        for ax in axes.flat[panels:]:
            ax.axis("off")
        _case_panels(list(axes.flat), artifact, int(rows[i]), truth[i], {k: v[i] for k, v in labels.items()},
                     images[i], names, task)
        fig.suptitle(title, fontsize=7)
        fig.canvas.draw()
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
        plt.close(fig)
    pictures[0].save(out / "comparison.gif", save_all=True, append_images=pictures[1:], duration=1200, loop=0)

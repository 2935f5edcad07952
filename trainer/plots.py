"""Pictures a run leaves behind: learning curves and sample predictions, coloured by BraTS region."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from builder.format import DEFAULT_AXIS_CODES

#: RGBA per label: NCR red, ED green, ET yellow (the usual BraTS colours); background transparent.
LABEL_COLOURS = np.array([[0, 0, 0, 0], [1, 0.15, 0.15, 0.8], [0.2, 0.85, 0.2, 0.55], [1, 0.9, 0, 0.85]])
CURVES = (("loss", "loss"), ("pixel_accuracy", "pixel accuracy"), ("mean_iou", "mean IoU"), ("mse", "MSE"),
          ("dice_mean", "mean region Dice"), ("dice_WT", "Dice WT"))


def overlay(labels: np.ndarray) -> np.ndarray:
    """(H, W) labels 0..3 to an RGBA image to draw over a grey slice."""
    return LABEL_COLOURS[np.clip(labels, 0, 3)]


def radiological(image: np.ndarray, axis_codes: Sequence[str]) -> np.ndarray:
    """A stored axial slice (its axes named by the volume's first two axis codes) as radiologists read it:
    anterior at the top, the patient's right on the image's left. Worked out from the codes, not assumed."""
    codes = [c.upper() for c in axis_codes[:2]]
    if not ({"A", "P"} & set(codes) and {"L", "R"} & set(codes)):
        return image.T  # not an axial plane: show it as stored
    front_back = 0 if codes[0] in "AP" else 1
    shown = image if front_back == 0 else image.T  # rows along anterior-posterior, columns along left-right
    if codes[front_back] == "A":
        shown = shown[::-1]  # rows must run from anterior (top) to posterior
    if codes[1 - front_back] == "R":
        shown = shown[:, ::-1]  # columns must run from the patient's right to left
    return shown


def show_slice(ax: plt.Axes, image: np.ndarray, labels: np.ndarray | None = None, title: str = "",
               axis_codes: Sequence[str] = DEFAULT_AXIS_CODES) -> None:
    """A slice in radiological convention (see ``radiological``), optionally with labels over it."""
    ax.imshow(radiological(image, axis_codes), cmap="gray", origin="upper")
    if labels is not None:
        ax.imshow(overlay(radiological(labels, axis_codes)), origin="upper", interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def sample_positions(artifact, split: str, count: int) -> list[int]:
    """Positions within ``split``'s rows of different patients' most tumour-laden rows, most tumour first."""
    import h5py

    from builder.layout import patient_of

    rows = artifact.splits[split]
    best: dict[str, tuple[int, int]] = {}
    with h5py.File(artifact.path, "r") as f:
        for position, row in enumerate(rows):
            tumour = int(np.count_nonzero(f["seg"][int(row)]))
            patient = patient_of(str(artifact.case_ids[row]))
            if patient not in best or tumour > best[patient][1]:
                best[patient] = (position, tumour)
    return [position for position, _ in sorted(best.values(), key=lambda item: -item[1])[:count]]


def plot_curves(rows: Sequence[dict[str, float]], path: Path) -> None:
    epochs = [int(r["epoch"]) + 1 for r in rows]
    fig, axes = plt.subplots(2, 3, figsize=(12, 6.5))
    for ax, (key, title) in zip(axes.flat, CURVES):
        for split, style in (("train", "-o"), ("val", "-s")):
            values = [r.get(f"{split}_{key}", np.nan) for r in rows]
            ax.plot(epochs, values, style, markersize=3, label=split)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes.flat[0].legend()
    fig.suptitle("per-slice metrics (not comparable to BraTS leaderboard 3D lesion-wise scores)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def plot_samples(checkpoint: Path, artifact, batches, path: Path, count: int = 4) -> None:
    """A few validation slices: the input, the truth and the prediction of the model in ``checkpoint``."""
    import h5py

    from trainer.model import load_model

    model, config = load_model(checkpoint, batches.device)
    rows = artifact.splits["val"][sample_positions(artifact, "val", count)]
    with h5py.File(artifact.path, "r") as f:
        images = torch.from_numpy(np.stack([[f[c][r] for c in config["channels"]] for r in rows]))
        truth = np.stack([f["seg"][r] for r in rows])
    with torch.no_grad():
        inputs, target = batches.inputs(images, torch.from_numpy(truth))
        pred = batches.crop(model(inputs), target).argmax(1).cpu().numpy()
    if config["task"] == "binary":
        truth = (truth > 0).astype(np.uint8) * 2  # whole tumour drawn in the oedema colour
        pred = pred * 2
    shown = config["channels"][-1]
    fig, axes = plt.subplots(len(rows), 3, figsize=(7.5, 2.6 * len(rows)), squeeze=False)
    codes = artifact.axis_codes
    for i, row in enumerate(rows):
        name = f"{artifact.case_ids[row]} z={artifact.slice_index[row]}"
        show_slice(axes[i, 0], images[i, -1].numpy(), None, f"{name}\n{shown}", codes)
        show_slice(axes[i, 1], images[i, -1].numpy(), truth[i], "truth", codes)
        show_slice(axes[i, 2], images[i, -1].numpy(), pred[i], "prediction", codes)
    fig.suptitle("red NCR, green ED, yellow ET", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _case_panels(axes, artifact, row: int, seg: np.ndarray, predictions: dict[str, np.ndarray], images: dict) -> None:
    from builder.format import MODALITIES

    base, codes = images["t2f"], artifact.axis_codes
    for ax, modality in zip(axes, MODALITIES):
        show_slice(ax, images[modality], None, modality, codes)
    show_slice(axes[4], base, seg, f"truth\n{artifact.case_ids[row]}", codes)
    for ax, (name, labels) in zip(axes[5:], predictions.items()):
        show_slice(ax, base, labels, name, codes)


def plot_comparison(artifact, rows: np.ndarray, seg: np.ndarray, probabilities: dict[str, torch.Tensor], task: str,
                    out: Path, cases_in_png: int = 4, frames: int = 24) -> None:
    """comparison.png (a few test cases, every approach) and comparison.gif (one test case per frame)."""
    import h5py
    from PIL import Image

    from builder.format import MODALITIES

    shown = sample_positions(artifact, "test", frames)  # different patients, their most tumour-laden rows
    rows, seg = rows[shown], seg[shown]
    with h5py.File(artifact.path, "r") as f:
        images = [{m: f[m][int(row)] for m in MODALITIES} for row in rows]
    scale = 2 if task == "binary" else 1  # binary: draw the whole tumour in the oedema colour
    labels = {name: p[shown].float().argmax(1).numpy() * scale for name, p in probabilities.items()}
    truth = seg if task == "multiclass" else (seg > 0) * 2
    panels = 5 + len(labels)
    count = min(cases_in_png, len(shown))
    fig, axes = plt.subplots(count, panels, figsize=(1.45 * panels, 1.6 * count), squeeze=False)
    for i in range(count):
        _case_panels(axes[i], artifact, int(rows[i]), truth[i], {k: v[i] for k, v in labels.items()}, images[i])
    fig.suptitle("test cases: the four modalities, the truth, each approach (red NCR, green ED, yellow ET)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "comparison.png", dpi=90)
    plt.close(fig)
    pictures = []
    for i in range(len(shown)):
        fig, axes = plt.subplots(2, (panels + 1) // 2, figsize=(1.6 * ((panels + 1) // 2), 3.6), squeeze=False)
        for ax in axes.flat[panels:]:
            ax.axis("off")
        _case_panels(list(axes.flat), artifact, int(rows[i]), truth[i], {k: v[i] for k, v in labels.items()}, images[i])
        fig.tight_layout()
        fig.canvas.draw()
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3]))
        plt.close(fig)
    pictures[0].save(out / "comparison.gif", save_all=True, append_images=pictures[1:], duration=1200, loop=0)

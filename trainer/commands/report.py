"""One self-contained HTML report of a whole-volume evaluation (`evaluate --volumes --report`): the run's settings
and data identity, a sortable table of every patient, the worst patients first with axial, coronal and sagittal
views through the tumour (truth, prediction, errors, uncertainty), and the metric definitions.

Everything is inline (PNG pictures as data URIs, the styles and the few lines of script), so it opens offline from
the file, with no server; it is at most 1100 px wide, so a laptop screen never scrolls sideways."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from builder.format import PLANES, REGIONS, slice_axis
from trainer.outputs import write_text
from trainer.scoring.brats import region_mask

#: The modality the views are drawn on (FLAIR: the whole tumour shows on it).
REPORT_MODALITY = "t2f"
#: The columns of the patient table: (row key, heading, digits).
COLUMNS = [(f"lesion_dice_{r}", f"lesion-wise Dice {r}", 3) for r in REGIONS] + \
          [(f"dice_{r}", f"Dice {r}", 3) for r in REGIONS] + \
          [("volume_ml_WT", "WT ml (truth)", 1), ("predicted_ml_WT", "WT ml (predicted)", 1)] + \
          [(f"lesion_fp_{r}", f"false lesions {r}", 0) for r in REGIONS] + \
          [(f"lesion_fn_{r}", f"missed lesions {r}", 0) for r in REGIONS]

SCRIPT = """
document.querySelectorAll('th').forEach((th, column) => th.addEventListener('click', () => {
  const body = th.closest('table').tBodies[0];
  const up = th.dataset.order !== 'up';
  th.dataset.order = up ? 'up' : 'down';
  const value = row => { const t = row.cells[column].textContent; const n = parseFloat(t); return isNaN(n) ? t : n; };
  [...body.rows].sort((a, b) => (value(a) > value(b) ? 1 : value(a) < value(b) ? -1 : 0) * (up ? 1 : -1))
    .forEach(row => body.appendChild(row));
}));
window.addEventListener('load', () => {
  const images = [...document.images];
  const shown = images.filter(image => image.complete && image.naturalWidth > 0).length;
  document.getElementById('pictures').textContent = `${shown} of ${images.length} pictures shown`;
});
"""

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; max-width: 1100px; margin: 0 auto; padding: 12px; color: #222; }
table { border-collapse: collapse; width: 100%; font-size: 12px; }
th, td { border-bottom: 1px solid #ddd; padding: 3px 4px; text-align: right; }
th { cursor: pointer; background: #f4f4f4; position: sticky; top: 0; }
th:first-child, td:first-child { text-align: left; }
.scroll { max-height: 420px; overflow-y: auto; }
img { max-width: 100%; height: auto; display: block; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 2px 12px; }
dt { font-weight: 600; } dd { margin: 0; overflow-wrap: anywhere; }
"""


@dataclass(frozen=True)
class CaseViews:
    """A case's three views through the tumour, as one PNG (rows: axial, coronal, sagittal; a column per panel), with
    the run's pictures' orientation and colours (``trainer.training.plots``: radiological orientation from the axis
    codes, the BraTS label colours)."""

    case_id: str
    png: bytes

    @classmethod
    def of(cls, case_id: str, image: np.ndarray, truth: np.ndarray, labels: np.ndarray,
           uncertainty: np.ndarray | None, axis_codes: Sequence[str]) -> CaseViews:
        """One prediction: columns truth, prediction, its errors and (if given) its uncertainty. ``image`` (X, Y, Z)
        one modality (``REPORT_MODALITY``), ``truth`` and ``labels`` BraTS labels, ``uncertainty`` 0-1 (or None),
        all in the voxel order ``axis_codes`` names."""
        errors = np.where((labels > 0) & (truth == 0), 1, np.where((truth > 0) & (labels == 0), 2, 0))
        panels = {"truth": truth, "prediction": labels, "errors: red false, green missed": errors}
        return cls.drawn(case_id, image, panels, axis_codes, (truth > 0) | (labels > 0), uncertainty)

    @classmethod
    def compared(cls, case_id: str, image: np.ndarray, truth: np.ndarray, predictions: dict[str, np.ndarray],
                 axis_codes: Sequence[str]) -> CaseViews:
        """Several predictions of one case side by side (``compare``): columns truth, then each prediction."""
        tumour = truth > 0
        for labels in predictions.values():
            tumour = tumour | (labels > 0)
        return cls.drawn(case_id, image, {"truth": truth, **predictions}, axis_codes, tumour)

    @classmethod
    def drawn(cls, case_id: str, image: np.ndarray, panels: dict[str, np.ndarray], axis_codes: Sequence[str],
              tumour: np.ndarray, uncertainty: np.ndarray | None = None) -> CaseViews:
        """Each label map of ``panels`` (title: labels) over ``image``, through the centre of ``tumour`` (where any
        panel or the truth holds tumour), then the uncertainty as a heat map, if given. numpy composes the panels
        into one picture and matplotlib only letters it: a figure of twelve axes costs half a second a patient,
        more than the report's share of an evaluation (10%) allows."""
        from trainer.training.plots import overlay, plt, radiological, slice_codes

        found = np.nonzero(tumour)
        centre = [int(np.median(a)) for a in found] if len(found[0]) else [s // 2 for s in image.shape]
        titles = [*panels, *(["uncertainty"] if uncertainty is not None else [])]
        rows, edges = [], []
        for plane in PLANES:
            axis = slice_axis(tuple(axis_codes), plane)
            codes = slice_codes(axis_codes, axis)

            def cut(volume: np.ndarray, axis: int = axis) -> np.ndarray:
                return np.take(volume, centre[axis], axis=axis)

            shown, letters = radiological(cut(image).astype(np.float32), codes)
            low, high = float(shown.min()), float(shown.max())
            grey = np.repeat(((shown - low) / (high - low or 1))[..., None], 3, axis=2)  # as imshow scales a slice
            row = [_over(grey, overlay(radiological(cut(labels), codes)[0].astype(np.uint8))) for labels in panels.values()]
            if uncertainty is not None:
                heat = radiological(cut(uncertainty), codes)[0]
                colours = plt.get_cmap("magma")(heat)
                colours[..., 3] = np.where(heat > 0, 0.8, 0)
                row.append(_over(grey, colours))
            rows.append([panel[::VIEW_STEP, ::VIEW_STEP] for panel in row])
            edges.append(letters)
        return cls(case_id, _lettered_png(case_id, rows, titles, edges))


#: Views keep every second voxel of a slice (120 px panels for BraTS), as the run's own pictures show them.
VIEW_STEP = 2
_GAP, _LEFT, _TOP = 4, 58, 34  # pixels between panels, for the planes' names, for the titles


def _over(grey: np.ndarray, colours: np.ndarray) -> np.ndarray:
    """(H, W, 4) RGBA colours laid over an (H, W, 3) grey slice by their alpha, as matplotlib composes images."""
    alpha = colours[..., 3:4]
    return grey * (1 - alpha) + colours[..., :3] * alpha


def _lettered_png(case_id: str, rows: list[list[np.ndarray]], titles: list[str],
                  edges: list[tuple[str, str, str, str]]) -> bytes:
    """The panels (a row per plane) as one PNG on white, with the case id, the column titles, each plane's name and
    the orientation letters of its first panel (every panel of a row shares them)."""
    from trainer.training.plots import plt

    height = sum(row[0].shape[0] for row in rows) + _GAP * (len(rows) - 1)
    width = max(sum(p.shape[1] for p in row) for row in rows) + _GAP * (len(titles) - 1)
    mosaic = np.ones((height, width, 3))
    figure = plt.figure(figsize=((width + _LEFT + 4) / 100, (height + _TOP + 4) / 100), dpi=100)
    size_x, size_y = width + _LEFT + 4, height + _TOP + 4

    def label(x: float, y: float, text: str, **style: Any) -> None:  # pixels from the top left
        figure.text(x / size_x, 1 - y / size_y, text, **{"fontsize": 7, **style})

    label(size_x / 2, 4, case_id, ha="center", va="top", fontsize=9)
    top = 0
    for row, plane, (up, down, left, right) in zip(rows, PLANES, edges):
        x = 0
        for column, panel in enumerate(row):
            h, w = panel.shape[:2]
            mosaic[top : top + h, x : x + w] = panel
            if top == 0:
                label(_LEFT + x + w / 2, _TOP - 3, titles[column], ha="center", va="bottom")
            x += w + _GAP
        h, w = row[0].shape[:2]
        letter = dict(color="white", fontsize=6, fontweight="bold")
        label(_LEFT + w / 2, _TOP + top + 1, up, ha="center", va="top", **letter)
        label(_LEFT + w / 2, _TOP + top + h - 1, down, ha="center", va="bottom", **letter)
        label(_LEFT + 2, _TOP + top + h / 2, left, ha="left", va="center", **letter)
        label(_LEFT + w - 2, _TOP + top + h / 2, right, ha="right", va="center", **letter)
        label(_LEFT - 4, _TOP + top + h / 2, plane, ha="right", va="center")
        top += h + _GAP
    figure.figimage(mosaic, xo=_LEFT, yo=4, origin="upper")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    plt.close(figure)
    return buffer.getvalue()


def volumes_ml(truth: np.ndarray, labels: np.ndarray, spacing: Sequence[float]) -> dict[str, float]:
    """Whole-tumour volumes in millilitres, of the truth and of the prediction."""
    voxel_ml = float(np.prod(spacing)) / 1000
    return {"volume_ml_WT": float(region_mask(truth, "WT").sum()) * voxel_ml,
            "predicted_ml_WT": float(region_mask(labels, "WT").sum()) * voxel_ml}


def worst_first(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Patients by their mean lesion-wise Dice over the regions scored, lowest first."""
    def mean(row: dict[str, Any]) -> float:
        values = [row[f"lesion_dice_{r}"] for r in REGIONS if row.get(f"lesion_dice_{r}") is not None]
        return float(np.mean(values)) if values else 1.0

    return sorted(rows, key=mean)


def _cell(value: Any, digits: int) -> str:
    if value is None or value == "":
        return ""
    return f"{float(value):.{digits}f}" if isinstance(value, (int, float, np.floating, np.integer)) else \
        html.escape(str(value))


def reliability_png(curves: dict[str, list[dict]]) -> bytes:
    """The reliability diagram of ``trainer.scoring.calibration.calibrate``'s curves, before and after."""
    from trainer.training.plots import plt

    figure, ax = plt.subplots(figsize=(4.2, 4), dpi=80)
    ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="calibrated")
    for name, colour in (("before", "#c33"), ("after", "#36c")):
        points = curves[name]
        ax.plot([p["confidence"] for p in points], [p["accuracy"] for p in points], marker="o", color=colour,
                label=f"{name} temperature scaling")
    ax.set_xlabel("confidence (voxels inside the brain)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=8)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _table(rows: list[dict[str, Any]], columns: list[tuple[str, str, int]], identifier: str = "") -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in columns)
    body = "\n".join("<tr>" + "".join(f"<td>{_cell(r.get(k), d)}</td>" for k, _, d in columns) + "</tr>"
                     for r in rows)
    return f'<table{identifier}><thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>'


def report_html(title: str, settings: dict[str, Any], rows: list[dict[str, Any]], views: dict[str, CaseViews],
                definition: str, calibration_png: bytes | None = None,
                overview: list[dict[str, Any]] | None = None) -> str:
    """The report as one HTML document: ``rows`` a row per patient (and per approach, when rows name one:
    ``compare``), ``views`` by case id, ``overview`` an optional table above them (its keys are its headings)."""
    ordered = worst_first(rows)
    identity = [("case_id", "patient", 0), *([("approach", "approach", 0)] if any("approach" in r for r in rows)
                                              else [])]
    columns = identity + [c for c in COLUMNS if any(c[0] in r for r in rows)]
    about = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in settings.items())
    shown = list(dict.fromkeys(r["case_id"] for r in ordered if r["case_id"] in views))  # once each, worst first
    pictures = "\n".join(
        f'<h3>{html.escape(case)}</h3><img alt="{html.escape(case)}: axial, coronal and sagittal views" '
        f'src="data:image/png;base64,{base64.b64encode(views[case].png).decode("ascii")}">' for case in shown)
    summary = "" if not overview else (
        "<h2>Approaches</h2>" + _table(overview, [(k, k, 3) for k in overview[0]], ' id="approaches"'))
    calibration = "" if calibration_png is None else (
        '<h2>Calibration</h2><img alt="reliability diagram" style="max-width: 420px" '
        f'src="data:image/png;base64,{base64.b64encode(calibration_png).decode("ascii")}">')
    patients = len({r["case_id"] for r in rows})
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Run and data</h2><dl>{about}</dl>
{summary}
<h2>Patients ({patients}), worst first</h2>
<p>Click a heading to sort.</p>
<div class="scroll">{_table(ordered, columns, ' id="patients"')}</div>
<h2>The worst patients first</h2>
<p>Through the tumour's centre; colours: red necrotic core, green oedema, yellow enhancing tumour.</p>
{pictures}
{calibration}<h2>Definitions</h2><p>{html.escape(definition)}</p>
<p id="pictures"></p>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(path: Path, title: str, settings: dict[str, Any], rows: list[dict[str, Any]],
                 views: dict[str, CaseViews], definition: str, calibration_png: bytes | None = None,
                 overview: list[dict[str, Any]] | None = None) -> Path:
    """``report_html`` written whole or not at all."""
    write_text(path, report_html(title, settings, rows, views, definition, calibration_png, overview))
    return path

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
    """A case's three views through the tumour, as one PNG (rows: axial, coronal, sagittal; columns: image with the
    truth, with the prediction, the errors, the uncertainty), drawn as the run's pictures are
    (``trainer.training.plots``: radiological orientation from the axis codes, the BraTS label colours)."""

    case_id: str
    png: bytes

    @classmethod
    def of(cls, case_id: str, image: np.ndarray, truth: np.ndarray, labels: np.ndarray,
           uncertainty: np.ndarray | None, axis_codes: Sequence[str]) -> CaseViews:
        """``image`` (X, Y, Z) one modality (``REPORT_MODALITY``), ``truth`` and ``labels`` BraTS labels,
        ``uncertainty`` 0-1 (or None), all in the voxel order ``axis_codes`` names."""
        from trainer.training.plots import panel_grid, plt, radiological, show_slice, slice_codes

        tumour = (truth > 0) | (labels > 0)
        centre = [int(np.median(a)) for a in np.nonzero(tumour)] if tumour.any() else [s // 2 for s in truth.shape]
        errors = np.where((labels > 0) & (truth == 0), 1, np.where((truth > 0) & (labels == 0), 2, 0))
        titles = ["truth", "prediction", "errors: red false, green missed"] + (["uncertainty"] if uncertainty
                                                                                is not None else [])
        figure, axes = panel_grid(3, len(titles), 2.0, 2.1, top=0.9)
        for row, plane in enumerate(PLANES):
            axis = slice_axis(tuple(axis_codes), plane)
            codes = slice_codes(axis_codes, axis)

            def cut(volume: np.ndarray, axis: int = axis) -> np.ndarray:
                return np.take(volume, centre[axis], axis=axis)

            for col, overlay in enumerate((truth, labels, errors)):
                show_slice(axes[row][col], cut(image), cut(overlay).astype(np.uint8),
                           f"{titles[col]} ({plane})" if row == 0 else plane, codes)
            if uncertainty is not None:
                show_slice(axes[row][3], cut(image), None, titles[3] if row == 0 else "", codes)
                shown = radiological(cut(uncertainty), codes)[0]
                axes[row][3].imshow(np.ma.masked_where(shown == 0, shown), cmap="magma", vmin=0, vmax=1, alpha=0.8)
        figure.suptitle(case_id, fontsize=9)
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png", dpi=60)
        plt.close(figure)
        return cls(case_id, buffer.getvalue())


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


def report_html(title: str, settings: dict[str, Any], rows: list[dict[str, Any]], views: dict[str, CaseViews],
                definition: str, calibration_png: bytes | None = None) -> str:
    """The report as one HTML document."""
    ordered = worst_first(rows)
    columns = [c for c in COLUMNS if any(c[0] in r for r in rows)]
    head = "".join(f"<th>{html.escape(h)}</th>" for _, h, _ in [("case_id", "patient", 0), *columns])
    body = "\n".join("<tr>" + f"<td>{html.escape(str(r['case_id']))}</td>"
                     + "".join(f"<td>{_cell(r.get(k), d)}</td>" for k, _, d in columns) + "</tr>" for r in ordered)
    about = "".join(f"<dt>{html.escape(str(k))}</dt><dd>{html.escape(str(v))}</dd>" for k, v in settings.items())
    pictures = "\n".join(
        f'<h3>{html.escape(r["case_id"])}</h3><img alt="{html.escape(r["case_id"])}: axial, coronal and sagittal '
        f'views" src="data:image/png;base64,{base64.b64encode(views[r["case_id"]].png).decode("ascii")}">'
        for r in ordered if r["case_id"] in views)
    calibration = "" if calibration_png is None else (
        '<h2>Calibration</h2><img alt="reliability diagram" style="max-width: 420px" '
        f'src="data:image/png;base64,{base64.b64encode(calibration_png).decode("ascii")}">')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Run and data</h2><dl>{about}</dl>
<h2>Patients ({len(rows)}), worst first</h2>
<p>Click a heading to sort.</p>
<div class="scroll"><table id="patients"><thead><tr>{head}</tr></thead><tbody>
{body}
</tbody></table></div>
<h2>The worst patients first</h2>
<p>Through the tumour's centre; colours: red necrotic core, green oedema, yellow enhancing tumour.</p>
{pictures}
{calibration}<h2>Definitions</h2><p>{html.escape(definition)}</p>
<p id="pictures"></p>
<script>{SCRIPT}</script>
</body></html>
"""


def write_report(path: Path, title: str, settings: dict[str, Any], rows: list[dict[str, Any]],
                 views: dict[str, CaseViews], definition: str, calibration_png: bytes | None = None) -> Path:
    """``report_html`` written whole or not at all."""
    write_text(path, report_html(title, settings, rows, views, definition, calibration_png))
    return path

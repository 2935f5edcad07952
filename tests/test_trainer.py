"""The trainer end to end on a tiny synthetic artifact (CPU, small encoder, no pretrained weights)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from click.testing import CliRunner, Result
from torch.utils.data import DataLoader

from builder.format import FORMAT_VERSION, file_sha256
from trainer.cli import main
from trainer.data.loading import RowReader, SliceDataset
from trainer.training.model import load_model

from conftest import FAST, one_error_line, trainer_cli


def _fit(artifact: Path, out: Path, *extra: str) -> Result:
    return trainer_cli("fit", artifact, "--out", out, *FAST, *extra)


def test_dataset_rows_equal_the_file_and_survive_worker_processes(artifact: Path) -> None:
    with h5py.File(artifact) as f:
        rows = f["split/train"][()]
        expected_t2f = f["t2f"][int(rows[2])]
        expected_seg = f["seg"][int(rows[2])]
        expected_all = np.stack([f[m][int(rows[1])] for m in ("t1n", "t1c", "t2w", "t2f")])
    single = SliceDataset(RowReader(artifact, ["t2f"]), rows)
    image, seg, row = single[2]
    assert image.shape == (1, 240, 240) and image.dtype == torch.int16
    assert np.array_equal(image[0].numpy(), expected_t2f) and np.array_equal(seg.numpy(), expected_seg)
    assert row == rows[2]
    fused = SliceDataset(RowReader(artifact, ["t1n", "t1c", "t2w", "t2f"]), rows)
    assert np.array_equal(fused[1][0].numpy(), expected_all)
    # spawn-started workers must pickle the dataset: no h5py handle may travel with it
    fused[0]
    loader = DataLoader(fused, batch_size=2, num_workers=2, multiprocessing_context="spawn")
    seen = torch.cat([batch_rows for _, _, batch_rows in loader])
    assert sorted(seen.tolist()) == sorted(rows.tolist())


def test_tiny_run_leaves_every_artifact_and_evaluates(small_artifact: Path, tmp_path: Path) -> None:
    result = _fit(small_artifact, tmp_path, "--modality", "flair", "--epochs", "2")
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    assert run.name.startswith("t2f-")
    for name in ("config.json", "metrics.csv", "best.pt", "curves.png", "samples.png"):
        assert (run / name).is_file(), name
    assert not (run / "last.pt").exists()  # a finished run keeps what inference needs, not the optimiser state
    best = torch.load(run / "best.pt", weights_only=True)
    assert set(best) == {"model", "config"}
    config = json.loads((run / "config.json").read_text())
    assert config["modality"] == "t2f" and config["artifact"]["format_version"] == FORMAT_VERSION
    assert config["data_sha256"] == file_sha256(small_artifact) and config["axis_codes"] == ["L", "P", "S"]
    with open(run / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 2
    for row in rows:  # the epoch's wall time, split into training, validation and the rest
        parts = float(row["train_seconds"]) + float(row["val_seconds"]) + float(row["other_seconds"])
        assert parts == pytest.approx(float(row["seconds"]), abs=0.01) and float(row["train_images_per_s"]) > 0
    for split in ("train", "val"):
        for metric in ("loss", "pixel_accuracy", "mean_iou", "mse", "dice_WT", "dice_TC", "dice_ET", "dice_mean"):
            assert f"{split}_{metric}" in rows[0]
    checkpoint = torch.load(run / "best.pt", weights_only=True)  # loads without running code
    assert checkpoint["config"]["channels"] == ["t2f"]
    model, saved = load_model(run / "best.pt")
    assert saved["classes"] == 4 and not model.training

    result = CliRunner().invoke(main, ["evaluate", str(run), "--split", "test", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    metrics = json.loads((run / "test_metrics.json").read_text())
    assert metrics["slices"] == 3
    assert metrics["dice_mean"] == pytest.approx(np.mean([metrics[f"dice_{r}"] for r in ("WT", "TC", "ET")]), abs=1e-6)
    with open(run / "test_cases.csv") as handle:
        cases = list(csv.DictReader(handle))
    assert len(cases) == 3 and {"case_id", "dice_WT", "dice_TC", "dice_ET", "pixel_accuracy"} <= set(cases[0])
    # per-case Dice averages to the split's mean (one slice per case; same per-slice convention)
    assert np.mean([float(c["dice_WT"]) for c in cases]) == pytest.approx(metrics["dice_WT"], abs=1e-5)


def test_loss_falls(small_artifact: Path, tmp_path: Path) -> None:
    result = _fit(small_artifact, tmp_path, "--modality", "all", "--epochs", "6", "--no-augment", "--lr", "3e-3",
                  "--patience", "6")
    assert result.exit_code == 0, result.output
    (run,) = list(tmp_path.iterdir())
    with open(run / "metrics.csv") as handle:
        losses = [float(row["train_loss"]) for row in csv.DictReader(handle)]
    assert losses[-1] < 0.7 * losses[0], losses


# --- bad input: one clear line, exit 1 ---------------------------------------------------------------------------


def test_not_hdf5_other_version_and_missing_modality(artifact: Path, tmp_path: Path) -> None:
    junk = tmp_path / "junk.h5"
    junk.write_text("hello")
    assert "not an HDF5 file" in one_error_line(_fit(junk, tmp_path, "-m", "t1n"))
    other = tmp_path / "other.h5"
    shutil.copy(artifact, other)
    with h5py.File(other, "r+") as f:
        f.attrs["format_version"] = 99
    assert "format_version 99" in one_error_line(_fit(other, tmp_path, "-m", "t1n"))
    fewer = tmp_path / "fewer.h5"
    shutil.copy(artifact, fewer)
    with h5py.File(fewer, "r+") as f:
        del f["t1c"]
        f.attrs["modalities"] = json.dumps(["t1n", "t2w", "t2f"])
    assert "no modality t1c" in one_error_line(_fit(fewer, tmp_path, "-m", "t1ce"))
    plain = tmp_path / "plain.h5"
    with h5py.File(plain, "w") as f:
        f["x"] = [1]
    assert "not a brats2d artifact" in one_error_line(_fit(plain, tmp_path, "-m", "t1n"))


def test_empty_split_and_oversized_batch(artifact: Path, tmp_path: Path) -> None:
    no_val = tmp_path / "noval.h5"
    shutil.copy(artifact, no_val)
    with h5py.File(no_val, "r+") as f:
        del f["split/val"]
        f["split/val"] = np.zeros(0, dtype=np.int64)
    assert "val split has no rows" in one_error_line(_fit(no_val, tmp_path, "-m", "t1n"))
    args = [a if a != "3" else "64" for a in FAST]
    result = CliRunner().invoke(main, ["fit", str(artifact), "--out", str(tmp_path), *args, "-m", "t1n"])
    assert "larger than the train split" in one_error_line(result)


def test_unknown_names_list_the_valid_ones(artifact: Path, tmp_path: Path) -> None:
    result = _fit(artifact, tmp_path, "-m", "t1n", "--arch", "transformer9000")
    line = one_error_line(result)
    assert "unknown architecture" in line and "unet" in line and "deeplabv3plus" in line
    result = CliRunner().invoke(main, ["fit", str(artifact), "-m", "pd"])
    assert result.exit_code == 2 and "t1n" in result.output and "flair" in result.output


def test_a_narrower_decoder_trains_saves_and_loads_with_its_widths(small_artifact: Path, artifact: Path,
                                                                     tmp_path: Path) -> None:
    result = _fit(small_artifact, tmp_path, "-m", "t1n", "--decoder-channels", "64", "--name", "narrow", "--epochs", "1",
                  "--max-steps", "2")
    assert result.exit_code == 0, result.output
    run = next(tmp_path.glob("narrow-*"))
    model, config = load_model(run / "best.pt")
    assert config["decoder_channels"] == 64
    widths = [block.conv2[0].out_channels for block in model.decoder.blocks]
    assert widths == [64, 32, 16, 8, 4]  # halving block by block, as smp's default 256 does
    line = one_error_line(_fit(artifact, tmp_path / "fpn", "-m", "t1n", "--arch", "fpn", "--decoder-channels", "64"))
    assert "--decoder-channels" in line and "unet" in line and not (tmp_path / "fpn").exists()
    line = one_error_line(_fit(artifact, tmp_path / "tiny", "-m", "t1n", "--decoder-channels", "8"))
    assert "--decoder-channels 8" in line and "16 to 4096" in line


def test_weights_that_cannot_be_fetched(artifact: Path, tmp_path: Path, monkeypatch) -> None:
    import segmentation_models_pytorch as smp

    def offline(*args, **kwargs):
        if kwargs.get("encoder_weights"):
            raise OSError("[Errno -2] Name or service not known")
        return real(*args, **kwargs)

    real = smp.create_model
    monkeypatch.setattr(smp, "create_model", offline)
    args = [a if a != "none" else "imagenet" for a in FAST]
    result = CliRunner().invoke(main, ["fit", str(artifact), "--out", str(tmp_path), *args, "-m", "t1n"])
    line = one_error_line(result)
    assert "could not fetch imagenet weights" in line and "--encoder-weights none" in line


def test_damaged_chunk_is_reported_not_raised(artifact: Path, tmp_path: Path) -> None:
    damaged = tmp_path / "damaged.h5"
    shutil.copy(artifact, damaged)
    with h5py.File(damaged) as f:
        train_rows = f["split/train"][()]
        chunks = [f["t2w"].id.get_chunk_info(i) for i in range(f["t2w"].id.get_num_chunks())]
    target = next(c for c in chunks if c.chunk_offset[0] in train_rows)
    with open(damaged, "r+b") as handle:
        handle.seek(target.byte_offset + target.size // 2)
        handle.write(b"\x00\xff\x00\xff")
    line = one_error_line(_fit(damaged, tmp_path / "runs", "-m", "t2w", "--epochs", "1"))
    assert f"{damaged}: reading row {target.chunk_offset[0]} failed" in line and "damaged" in line
    assert "brats-build verify" in line and "replaced" not in line


@pytest.mark.parametrize("version", [1, 2, 3])
def test_older_versions_still_read(artifact: Path, tmp_path: Path, version: int) -> None:
    from builder.inspect import verify
    from trainer.data.artifact import Artifact

    old = tmp_path / f"v{version}.h5"
    with h5py.File(artifact) as source, h5py.File(old, "w") as f:  # the 1.8 format and text attributes, as before v4
        for name in source:
            source.copy(name, f)
        for key, value in source.attrs.items():
            f.attrs[key] = value.decode() if isinstance(value, bytes) else value
        for key in ("plane", "slice_axis", "context"):  # v3: axial rows, no neighbouring slices
            del f.attrs[key]
        case_ids = f["case_id"].asstr()[()]
        if version < 3:  # v2 and v1: variable-length ids without checksums, no build id
            del f["case_id"], f.attrs["data_id"]
            f.create_dataset("case_id", data=case_ids.astype(object), dtype=h5py.string_dtype("utf-8"))
        if version == 1:
            del f["background"]
            for key in ("axis_codes", "voxel_size", "background_slices", "label4", "split_unit"):
                del f.attrs[key]
        f.attrs["format_version"] = version
    assert verify(old) == []
    opened = Artifact.open(old)
    assert (opened.data_id is None) == (version < 3) and list(opened.case_ids) == list(case_ids)
    assert len(opened.background) == opened.rows and (opened.plane, opened.slice_axis, opened.context) == ("axial", 2, 0)
    assert opened.axis_codes == ("L", "P", "S") and opened.voxel_size == (1.0, 1.0, 1.0)


def test_unknown_device_and_zero_jobs_are_one_line(artifact: Path, tmp_path: Path) -> None:
    from builder.cli import main as build_main

    args = [a if a != "cpu" else "tpu" for a in FAST]
    assert "--device tpu" in one_error_line(CliRunner().invoke(main, ["fit", str(artifact), "-m", "t1n", "--out",
                                                                       str(tmp_path), *args]))
    built = CliRunner().invoke(build_main, ["build", str(tmp_path), str(tmp_path / "x.h5"), "--jobs", "0"])
    assert built.exit_code == 2 and "--jobs" in built.output and "Traceback" not in built.output

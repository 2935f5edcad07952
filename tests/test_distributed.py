"""Multi-process training with torch.distributed (gloo on this CPU machine), started by torchrun."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from trainer.data.artifact import Artifact
from trainer.data.loading import RowReader, SliceDataset, make_loader


def test_ranks_get_disjoint_rows_that_cover_the_split(artifact: Path) -> None:
    rows = Artifact.open(artifact).splits["train"]
    seen = []
    for rank in (0, 1):
        loader = make_loader(SliceDataset(RowReader(artifact, ["t1n"]), rows), 3, True, 0, seed=0, rank=rank, world_size=2)
        loader.sampler.set_epoch(3)
        seen.append({int(r) for _, _, batch in loader for r in batch})
    assert not (seen[0] & seen[1])
    assert seen[0] | seen[1] == set(rows.tolist())
    val = Artifact.open(artifact).splits["val"]
    shards = [list(make_loader(SliceDataset(RowReader(artifact, ["t1n"]), val), 2, False, 0, 0, rank, 2).sampler) for rank in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(len(val)))  # no padding: exact reduced metrics


@pytest.mark.slow
def test_torchrun_two_processes_match_single_process_evaluation(small_artifact: Path, tmp_path: Path) -> None:
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "trainer", "fit", str(small_artifact),
               "-m", "t2w", "--encoder", "resnet18", "--encoder-weights", "none", "--batch-size", "2", "--workers", "1",
               "--crop", "64", "--epochs", "1", "--device", "cpu", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = list(tmp_path.iterdir())
    for name in ("config.json", "metrics.csv", "best.pt", "curves.png", "samples.png"):
        assert (run / name).is_file(), name
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    with open(run / "metrics.csv") as handle:
        (row,) = list(csv.DictReader(handle))
    from click.testing import CliRunner

    from trainer.cli import main

    result = CliRunner().invoke(main, ["evaluate", str(run), "--split", "val", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    single = json.loads((run / "val_metrics.json").read_text())
    for key in ("loss", "pixel_accuracy", "mean_iou", "mse", "dice_WT", "dice_TC", "dice_ET", "dice_mean"):
        assert np.isclose(float(row[f"val_{key}"]), single[key], atol=1e-5), key

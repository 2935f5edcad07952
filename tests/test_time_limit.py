"""``fit --time-limit``: a run bounded by minutes instead of epochs ends at its budget with its last epoch validated,
its learning-rate schedule runs over the time, a killed run resumes with the minutes it has left, and a budget too
short for one step and one validation is one line."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from trainer.config import FitConfig
from trainer.training.clock import RunClock
from trainer.training.step import POLY_EXPONENT, Optimiser

from conftest import FAST, fit_killed, one_error_line, trainer_cli


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


def test_the_schedule_follows_the_share_of_the_budget_used() -> None:
    config = FitConfig(data="x.h5", modality="t1n", schedule="poly", lr=1e-3, time_limit=1.0)
    clock = RunClock(100.0)
    optimiser = Optimiser.create(torch.nn.Linear(2, 2), config, torch.device("cpu"), None, float("inf"), 10, clock)
    clock.start(used=50.0)  # half the budget used in earlier sessions
    optimiser.optimizer.step()
    optimiser.schedule.step()
    assert optimiser.lr == pytest.approx(1e-3 * 0.5 ** POLY_EXPONENT, rel=1e-3)
    clock.start(used=100.0)
    optimiser.schedule.step()
    assert optimiser.lr == 0.0 and clock.cannot_fit(0.001) and not RunClock(None).cannot_fit(1e9)


def test_a_time_limited_run_ends_validated_within_its_budget_and_resumes_with_what_is_left(
        small_artifact: Path, tmp_path: Path) -> None:
    minutes = 0.12
    run = fit_killed(small_artifact, tmp_path / "runs", 2, epochs=99, patience=99, keep_last=True, schedule="poly",
                     time_limit=minutes)  # killed once its third epoch was logged: the state of two is kept
    kept = torch.load(run / "last.pt", weights_only=True)
    assert kept["epoch"] == 1 and kept["seconds"] > 0  # what the resumed run counts on from
    resumed = trainer_cli("fit", "--resume", run)
    assert resumed.exit_code == 0, resumed.output
    rows = _rows(run)
    assert len(rows) >= 3 and [int(r["epoch"]) for r in rows] == list(range(len(rows)))
    # the first session's two epochs kept, their seconds counted (their checkpoint time aside)
    assert 0.9 * kept["seconds"] < float(rows[0]["seconds"]) + float(rows[1]["seconds"])
    assert all(r["val_dice_mean"] != "" for r in rows)  # every epoch validated, the cut last one too
    spent = sum(float(r["seconds"]) for r in rows)
    # within the budget, both sessions together (the second was not given the whole budget again); an epoch may run
    # a little past its estimate (it failed CI by 6 ms at a 5% allowance), never a whole epoch past
    longest = max(float(r["seconds"]) for r in rows)
    assert spent <= minutes * 60 + 0.25 * longest, (spent, longest)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.5 * lrs[0]  # poly decay over the time
    assert "time limit:" in (run / "log.txt").read_text()
    assert json.loads((run / "config.json").read_text())["time_limit"] == minutes
    assert torch.load(run / "last.pt", weights_only=True)["seconds"] == pytest.approx(spent, rel=0.1)


def test_a_budget_that_ends_before_the_time_says_so_and_one_too_short_is_one_line(small_artifact: Path,
                                                                                  tmp_path: Path) -> None:
    done = trainer_cli("fit", small_artifact, "-m", "t1n", "--out", tmp_path / "a", *FAST, "--epochs", "1",
                       "--time-limit", "30")
    assert done.exit_code == 0 and "ended at --epochs 1 after" in done.output and "raise it" in done.output
    line = one_error_line(trainer_cli("fit", small_artifact, "-m", "t1n", "--out", tmp_path / "b", *FAST,
                                      "--time-limit", "0.0001"))
    assert "one training step and one validation take about" in line and "give at least --time-limit" in line
    assert "--time-limit -1" in one_error_line(trainer_cli("fit", small_artifact, "-m", "t1n", "--out", tmp_path,
                                                           "--time-limit", "-1"))

"""Several runs as one segmenter: planes, folds or seeds, each segmenting a volume its own way (its plane, its
context, test-time mirroring if asked), with probabilities averaged before labels are drawn, then cleaned up by
the rule that goes with the lead run. One run alone is an ensemble of one: every whole-volume command uses this."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from builder.layout import Case
from trainer.cleanup import DEFAULT_CLEAN_UP, CleanUp, clean_up, load_choice
from trainer.config import FitConfig, FitError
from trainer.model import load_model
from trainer.volumes import CaseVolumes, Geometry, Segmentation, labels_of, read_case, segment


@dataclass(frozen=True)
class Member:
    run_dir: Path
    model: torch.nn.Module
    config: FitConfig


def runs_in(paths: Sequence[Path], checkpoint: str = "best.pt") -> list[Path]:
    """Run folders: each path that holds ``checkpoint`` itself, or else every subfolder that does (a folder of fold
    runs stands for all of them), in order."""
    runs: list[Path] = []
    for path in paths:
        if (path / checkpoint).is_file():
            runs.append(path)
            continue
        inside = sorted(p for p in path.iterdir() if (p / checkpoint).is_file()) if path.is_dir() else []
        if not inside:
            raise FitError(f"{path}: no checkpoint here ({checkpoint}) nor in its subfolders; train one with "
                           "`brats-train fit`")
        runs.extend(inside)
    return runs


def _incompatibility(lead: FitConfig, member: FitConfig) -> str | None:
    """Why two runs cannot be averaged, or None: their probabilities must mean the same thing (task), come from the
    same inputs (modalities) and be mapped into one volume (orientation and voxel size)."""
    for what, ours, theirs in (("task", lead.task, member.task), ("modalities", lead.channels, member.channels),
                               ("axis codes", lead.axis_codes, member.axis_codes),
                               ("voxel size", lead.voxel_size, member.voxel_size)):
        if ours != theirs:
            return f"its {what} {theirs} differ from the lead run's {ours}"
    return None


@dataclass
class Segmenter:
    """The runs to average, whether to mirror at test time, and the clean-up that follows."""

    members: list[Member]
    tta: bool = False
    rule: CleanUp | None = DEFAULT_CLEAN_UP
    rule_note: str = f"the default clean-up: {DEFAULT_CLEAN_UP.describe()}"
    brain_box: bool = True  # False: whole slices, the previous release's pass (benchmarks compare against it)

    @classmethod
    def load(cls, runs: Sequence[Path], checkpoint: str, device: torch.device, tta: bool = False,
             clean: bool = True) -> Segmenter:
        """Load every run (the first leads: its clean-up choice, if any, is used), refusing runs that cannot be
        averaged in one line that names the run and why."""
        members = []
        for run_dir in runs:
            model, saved = load_model(run_dir / checkpoint, device)
            members.append(Member(run_dir, model, FitConfig.from_dict({**saved, "device": str(device)})))
        lead = members[0]
        for member in members[1:]:
            problem = _incompatibility(lead.config, member.config)
            if problem:
                raise FitError(f"{member.run_dir}: cannot be ensembled with {lead.run_dir}: {problem}; ensemble runs "
                               "of one task, trained on the same modalities, orientation and voxel size")
        if not clean:
            return cls(members, tta, None, "no clean-up (--no-clean-up)")
        chosen = load_choice(lead.run_dir)
        if chosen is None:
            return cls(members, tta)
        return cls(members, tta, *chosen)

    @property
    def lead(self) -> Member:
        return self.members[0]

    @property
    def config(self) -> FitConfig:
        return self.lead.config

    def describe(self) -> str:
        runs = ", ".join(f"{m.run_dir.name} ({m.config.plane}, context {m.config.context})" for m in self.members)
        return f"{runs}{'; test-time mirroring' if self.tta else ''}"

    def read(self, case: Case) -> CaseVolumes:
        """The case in the lead run's orientation, checked against every member's slices (CaseError if not)."""
        volumes = read_case(case, self.config.channels, Geometry.of(self.config))
        for member in self.members[1:]:
            Geometry.of(member.config).check(case.case_id, volumes.images.shape[1:])
        return volumes

    def probabilities(self, volumes: CaseVolumes, device: torch.device, progress: bool = True) -> Segmentation:
        """The members' probabilities averaged (float32 sum, float16 result); brain slices counted per pass."""
        started = time.perf_counter()
        total, slices = None, 0
        for member in self.members:
            result = segment(member.model, member.config, volumes.images, device, progress=progress, tta=self.tta,
                             box=self.brain_box)
            total = result.probabilities.astype(np.float32) if total is None else total + result.probabilities
            slices += result.brain_slices
        assert total is not None
        mean = (total / len(self.members)).astype(np.float16)
        return Segmentation(mean, slices, time.perf_counter() - started)

    def segment(self, volumes: CaseVolumes, device: torch.device, progress: bool = True
                ) -> tuple[np.ndarray, np.ndarray, Segmentation]:
        """Labels of a whole case (training orientation): raw, and cleaned up by the rule (equal without one)."""
        result = self.probabilities(volumes, device, progress)
        raw = labels_of(result.probabilities, self.config.task)
        return raw, (raw if self.rule is None else clean_up(raw, self.rule)), result

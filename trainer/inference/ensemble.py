"""Several runs as one segmenter: planes, folds or seeds, each segmenting a volume its own way (its plane, its
context, test-time mirroring if asked), with probabilities averaged before labels are drawn, then cleaned up by
the rule that goes with the lead run. One run alone is an ensemble of one: every whole-volume path (evaluate,
predict, compare, cross-validate, the benchmarks) goes through ``Segmenter``, and each run's model is loaded once."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from builder.layout import Case
from trainer.config import FitConfig
from trainer.device import resolve_device
from trainer.errors import CommandError
from trainer.inference.cases import CaseVolumes, Geometry, labels_of, read_case
from trainer.inference.options import VolumeOptions
from trainer.inference.slices import VolumeProbabilities, network_probabilities
from trainer.scoring.calibration import Calibration, load_calibration
from trainer.scoring.cleanup import CleanUp, clean_up, rule_for
from trainer.tasks import region_confidence, uncertainty
from trainer.training.model import load_model


@dataclass(frozen=True)
class Member:
    """One run of an ensemble: its folder, its model (loaded once) and its configuration."""

    run_dir: Path
    model: torch.nn.Module
    config: FitConfig

    @classmethod
    def load(cls, run_dir: Path, checkpoint: str, device: torch.device) -> Member:
        model, saved = load_model(run_dir / checkpoint, device)
        return cls(run_dir, model, FitConfig.from_dict({**saved, "device": str(device)}))


@dataclass(frozen=True)
class CaseSegmentation:
    """A case segmented: its raw labels, the labels after clean-up (the same without a rule), the probabilities."""

    raw: np.ndarray  # (X, Y, Z) uint8 BraTS labels, in the training orientation
    labels: np.ndarray
    result: VolumeProbabilities
    confidence: np.ndarray  # (regions, X, Y, Z) uint8 region probabilities (0-255): what clean-up rules weigh
    uncertainty: np.ndarray | None = None  # (X, Y, Z) float32 normalised entropy of the mean (trainer.tasks), if asked
    disagreement: np.ndarray | None = None  # an ensemble's: that entropy less the members' mean entropy (mutual
    # information, 0 where the members agree), if asked


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
            raise CommandError(f"{path}: no checkpoint here ({checkpoint}) nor in its subfolders; train one with "
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
    """The runs to average, where, whether to mirror at test time, and the clean-up that follows."""

    members: list[Member]
    device: torch.device = torch.device("cpu")
    tta: bool = False
    rule: CleanUp | None = None
    rule_note: str = "no clean-up"
    calibration: Calibration | None = None  # the lead run's, fitted for these members (evaluate --calibrate)
    brain_box: bool = True  # False: whole slices, the previous release's pass (benchmarks compare against it)

    @classmethod
    def load(cls, runs: Sequence[Path], options: VolumeOptions) -> Segmenter:
        """Load every run (the first leads: its clean-up choice, if any, is used), refusing runs that cannot be
        averaged in one line that names the run and why."""
        device = resolve_device(options.device)
        return cls.of([Member.load(run_dir, options.checkpoint, device) for run_dir in runs], device, options.tta,
                      options.clean)

    @classmethod
    def of(cls, members: list[Member], device: torch.device, tta: bool = False, clean: bool = True) -> Segmenter:
        """Members already loaded, checked to average; with ``clean``, the lead run's rule (``rule_for``)."""
        lead = members[0]
        for member in members[1:]:
            problem = _incompatibility(lead.config, member.config)
            if problem:
                raise CommandError(f"{member.run_dir}: cannot be ensembled with {lead.run_dir}: {problem}; ensemble "
                                   "runs of one task, trained on the same modalities, orientation and voxel size")
        calibration = load_calibration(lead.run_dir, [str(m.run_dir) for m in members], tta)
        return cls(members, device, tta, *rule_for(clean, lead.run_dir), calibration=calibration)

    @property
    def lead(self) -> Member:
        return self.members[0]

    @property
    def config(self) -> FitConfig:
        return self.lead.config

    def describe(self) -> str:
        runs = ", ".join(f"{m.run_dir.name} ({m.config.plane}, context {m.config.context})" for m in self.members)
        calibrated = f"; probabilities calibrated: {self.calibration.describe()}" if self.calibration else ""
        return f"{runs}{'; test-time mirroring' if self.tta else ''}{calibrated}"

    def read(self, case: Case) -> CaseVolumes:
        """The case's channels in the lead run's orientation (checked by ``read_case`` against the lead's slices),
        checked against every other member's slices too (CaseError if not)."""
        volumes = read_case(case, self.config.channels, Geometry.of(self.config))
        for member in self.members[1:]:
            Geometry.of(member.config).check(volumes.case_id, volumes.images.shape[1:])
        return volumes

    def probabilities(self, volumes: CaseVolumes, progress: bool = True, members_uncertainty: bool = False
                      ) -> VolumeProbabilities:
        """The members' probabilities averaged (float32 sum, float16 result), each member fed its own channels of
        ``volumes``; brain slices counted per pass; with ``members_uncertainty`` (an ensemble), also the members' mean
        uncertainty, which the ensemble's disagreement is measured against."""
        started = time.perf_counter()
        total, slices, spread = None, 0, None
        for member in self.members:
            result = network_probabilities(member.model, member.config, volumes.of(member.config.channels),
                                           self.device, progress=progress, tta=self.tta, box=self.brain_box)
            total = result.probabilities.astype(np.float32) if total is None else total + result.probabilities
            slices += result.brain_slices
            if members_uncertainty and len(self.members) > 1:
                own = uncertainty(result.probabilities, self.config.task)
                spread = own if spread is None else spread + own
        assert total is not None
        mean = (total / len(self.members)).astype(np.float16)
        return VolumeProbabilities(mean, slices, time.perf_counter() - started,
                                   None if spread is None else spread / len(self.members))

    def segment(self, volumes: CaseVolumes, progress: bool = True, with_uncertainty: bool = False
                ) -> CaseSegmentation:
        """A whole case's labels (training orientation): raw, and cleaned up by the rule; with ``with_uncertainty``,
        its uncertainty map (and an ensemble's disagreement)."""
        result = self.probabilities(volumes, progress, members_uncertainty=with_uncertainty)
        raw = labels_of(result.probabilities, self.config.task)
        confidence = region_confidence(result.probabilities, self.config.task)  # what the clean-up was chosen on
        entropy = uncertainty(result.probabilities, self.config.task) if with_uncertainty else None
        disagreement = None if entropy is None or result.member_uncertainty is None else \
            np.clip(entropy - result.member_uncertainty, 0, 1)  # both of the network's own probabilities
        if self.calibration is not None:  # the probabilities handed on; labels never move (trainer.scoring.calibration)
            result = replace(result, probabilities=self.calibration.apply(result.probabilities).astype(np.float16))
            entropy = uncertainty(result.probabilities, self.config.task) if with_uncertainty else None
        return CaseSegmentation(raw, raw if self.rule is None else clean_up(raw, self.rule, confidence), result,
                                confidence, entropy, disagreement)

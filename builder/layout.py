"""Find BraTS case folders and the files of each case, in every naming a release has used.

- 2023 family: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` (also ``-MEN-``, ``-MET-``, ``-PED-``, ``-SSA-``)
- 2018 to 2021: ``Brats18_2013_11_1/Brats18_2013_11_1_flair.nii.gz``, ``BraTS20_Training_001/…_t1ce.nii``,
  ``BraTS2021_00000/BraTS2021_00000_seg.nii.gz``
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from builder.format import MODALITIES, SEG

#: layout name -> (separator between case id and suffix, file suffix for each canonical modality and the seg)
LAYOUTS: dict[str, tuple[str, dict[str, str]]] = {
    "brats2023": ("-", {"t1n": "t1n", "t1c": "t1c", "t2w": "t2w", "t2f": "t2f", SEG: "seg"}),
    "brats2021": ("_", {"t1n": "t1", "t1c": "t1ce", "t2w": "t2", "t2f": "flair", SEG: "seg"}),
}
_EXTENSIONS = (".nii.gz", ".nii")
#: A 2023-style case id: patient and time point (``BraTS-GLI-00000-001`` is patient ``BraTS-GLI-00000``).
_TIME_POINT = re.compile(r"^(BraTS-[A-Z]+-\d+)-\d+$")


def patient_of(case_id: str) -> str:
    """The patient a case belongs to: 2023-style ids drop the time point; older ids are one scan per patient."""
    match = _TIME_POINT.match(case_id)
    return match.group(1) if match else case_id


@dataclass(frozen=True)
class Case:
    """One case folder: its id, naming layout, and the path of each modality and the seg (maybe missing)."""

    case_id: str
    layout: str
    files: dict[str, Path]

    @property
    def legacy_naming(self) -> bool:
        """A pre-2023 naming, where label 4 means enhancing tumour."""
        return self.layout != "brats2023"

    def missing(self) -> list[str]:
        return [name for name in (*MODALITIES, SEG) if not self.files[name].is_file()]


def _file_for(folder: Path, case_id: str, separator: str, suffix: str, names: dict[str, str]) -> Path | None:
    for extension in _EXTENSIONS:
        name = f"{case_id}{separator}{suffix}{extension}".lower()
        if name in names:
            return folder / names[name]
    return None


def _as_case(folder: Path, files: list[str]) -> Case | None:
    """The folder as a case if it holds at least one file named after it in a known layout (file names matched
    without regard to case: ``X-t1n.NII.GZ`` is read like ``X-t1n.nii.gz``)."""
    names = {name.lower(): name for name in sorted(files)}
    case_id = folder.name
    for layout, (separator, suffixes) in LAYOUTS.items():
        found = {key: _file_for(folder, case_id, separator, suffix, names) for key, suffix in suffixes.items()}
        if any(found.values()):
            files = {
                key: path or folder / f"{case_id}{separator}{suffixes[key]}{_EXTENSIONS[0]}"
                for key, path in found.items()
            }
            return Case(case_id=case_id, layout=layout, files=files)
    return None


def find_cases(source: Path, unreadable: list[tuple[Path, str]] | None = None,
               notes: list[str] | None = None, empty: list[Path] | None = None) -> list[Case]:
    """Every case folder at or below ``source``, sorted by case id (independent of file-system order).

    Folders that cannot be listed (permissions) are appended to ``unreadable`` with the reason, when it is given.
    Links are followed (datasets are often assembled from links), but never into a folder already scanned: a link
    back up the tree would otherwise loop for ever; each such link is said once in ``notes``. Folders below
    ``source`` that hold no case and no folder (an unpacked case whose files are missing, say) go in ``empty``.
    """
    cases: list[Case] = []
    seen: set[tuple[int, int]] = set()

    def note(error: OSError) -> None:
        if unreadable is not None:
            unreadable.append((Path(error.filename), f"folder cannot be read ({error.strerror}): fix its permissions"))

    for root, dirs, files in os.walk(source, followlinks=True, onerror=note):
        try:
            status = os.stat(root)
        except OSError:
            dirs.clear()
            continue
        if (status.st_dev, status.st_ino) in seen:
            dirs.clear()
            if notes is not None:
                notes.append(f"{root}: a link to a folder already scanned; not scanned again")
            continue
        seen.add((status.st_dev, status.st_ino))
        case = _as_case(Path(root), files)
        if case is not None:
            cases.append(case)
            dirs.clear()  # a case folder holds no further cases
        elif not dirs and empty is not None and Path(root) != source:
            empty.append(Path(root))
        dirs.sort()
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{source}: case ids found in more than one folder: {', '.join(duplicates[:5])}")
    return sorted(cases, key=lambda case: case.case_id)

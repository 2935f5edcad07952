"""Find BraTS case folders and the files of each case, in every naming a release has used.

- 2023 family: ``BraTS-GLI-00000-000/BraTS-GLI-00000-000-t1n.nii.gz`` (also ``-MEN-``, ``-MET-``, ``-PED-``, ``-SSA-``)
- 2018 to 2021: ``Brats18_2013_11_1/Brats18_2013_11_1_flair.nii.gz``, ``BraTS20_Training_001/…_t1ce.nii``,
  ``BraTS2021_00000/BraTS2021_00000_seg.nii.gz``
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Sequence
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
        return [name for name in (*MODALITIES, SEG) if file_problem(self.files[name]) == MISSING]

    def problems(self, names: Sequence[str] = (*MODALITIES, SEG)) -> str | None:
        """Why the files ``names`` cannot all be read, in one phrase naming each (None when they can): missing
        ones first, then links, folders, FIFOs and devices as what they are."""
        found = {name: file_problem(self.files[name]) for name in names}
        missing = [self.files[n].name for n, problem in found.items() if problem == MISSING]
        others = [f"{self.files[n].name} is {problem}" for n, problem in found.items() if problem not in (None, MISSING)]
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + others
        return "; ".join(parts) or None


MISSING = "missing"


def file_problem(path: Path) -> str | None:
    """Why ``path`` is not a readable volume file, in words (None when it is a regular file, links followed):
    ``MISSING``, a broken link, or what it is instead (a folder, a FIFO, a device, a socket)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "a broken link" if os.path.islink(path) else MISSING
    except OSError as error:
        return f"unreadable ({error.strerror})"
    if stat.S_ISREG(mode):
        return None
    kinds = ((stat.S_ISDIR, "a folder"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
             (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))
    return next((f"{kind}, not a file" for test, kind in kinds if test(mode)), "not a regular file")


def safe_id(name: str) -> str:
    """A folder's name as a case id that every output (HDF5, CSV, JSON, file names) can hold: the name itself when
    it is valid UTF-8, as names almost always are; else its UTF-8 text with every other byte as ``%XX`` and ``%``
    as ``%25`` (an archive made on Windows: ``Caf\\udce9`` becomes ``Caf%E9``), which ``os_name`` turns back."""
    raw = os.fsencode(name)
    try:
        raw.decode("utf-8")
        return name
    except UnicodeDecodeError:
        pass
    out, rest = [], raw
    while rest:
        try:
            out.append(rest.decode("utf-8").replace("%", "%25"))
            break
        except UnicodeDecodeError as error:
            out.append(rest[: error.start].decode("utf-8").replace("%", "%25") + f"%{rest[error.start]:02X}")
            rest = rest[error.start + 1 :]
    return "".join(out)


def os_name(case_id: str) -> str:
    """The folder name a ``safe_id`` came from (as Python's os functions name it)."""
    return os.fsdecode(re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), case_id.encode("utf-8")))


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
    for layout, (separator, suffixes) in LAYOUTS.items():
        found = {key: _file_for(folder, folder.name, separator, suffix, names) for key, suffix in suffixes.items()}
        if any(found.values()):
            files = {
                key: path or folder / f"{folder.name}{separator}{suffixes[key]}{_EXTENSIONS[0]}"
                for key, path in found.items()
            }
            return Case(case_id=safe_id(folder.name), layout=layout, files=files)
    return None


#: Folders that never hold BraTS cases: the file system's root and its system trees (anything under the first three).
_SYSTEM_TREES = ("/proc", "/sys", "/dev", "/", "/etc", "/usr", "/bin", "/sbin", "/lib", "/lib64", "/boot")


def system_tree(folder: Path | str) -> str | None:
    """The system folder ``folder`` is, or lies in (links followed), or None."""
    real = os.path.realpath(folder)
    for tree in _SYSTEM_TREES:
        if real == tree or (tree in _SYSTEM_TREES[:3] and real.startswith(tree + "/")):
            return tree
    return None


def find_cases(source: Path, unreadable: list[tuple[Path, str]] | None = None,
               notes: list[str] | None = None, empty: list[Path] | None = None) -> list[Case]:
    """Every case folder at or below ``source``, sorted by case id (independent of file-system order).

    Folders that cannot be listed (permissions) are appended to ``unreadable`` with the reason, when it is given.
    Links are followed (datasets are often assembled from links), but never into a folder already scanned: a link
    back up the tree would otherwise loop for ever; each such link is said once in ``notes``, as is a link to a
    system folder (``/``, ``/usr``...), never scanned. A ``source`` that is or lies in one is refused (ValueError). Folders below
    ``source`` that hold no case and no folder (an unpacked case whose files are missing, say) go in ``empty``.
    """
    tree = system_tree(source)
    if tree is not None:
        raise ValueError(f"{source}: {'is' if os.path.realpath(source) == tree else 'lies in'} the system folder "
                         f"{tree}, not a folder of BraTS cases; give the folder that holds the case folders")
    cases: list[Case] = []
    seen: set[tuple[int, int]] = set()

    def note(error: OSError) -> None:
        if unreadable is None:
            return
        if error.errno == errno.ENAMETOOLONG:
            reason = (f"its path is longer than the system allows ({len(os.fsencode(error.filename))} bytes): move "
                      "or link the case nearer the top of the tree")
        else:
            reason = f"folder cannot be read ({error.strerror}): fix its permissions"
        unreadable.append((Path(error.filename), reason))

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
        if Path(root) != source and os.path.islink(root) and (tree := system_tree(root)) is not None:
            dirs.clear()
            if notes is not None:
                notes.append(f"{root}: a link to the system folder {tree}; not scanned")
            continue
        seen.add((status.st_dev, status.st_ino))
        case = _as_case(Path(root), files)
        if case is not None:
            cases.append(case)
            if notes is not None and case.case_id != Path(root).name:
                notes.append(f"{safe_id(root)}: the folder's name is not valid UTF-8; its case id is {case.case_id}")
            dirs.clear()  # a case folder holds no further cases
        elif not dirs and empty is not None and Path(root) != source:
            empty.append(Path(root))
        dirs.sort()
    ids = [case.case_id for case in cases]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"{source}: case ids found in more than one folder: {', '.join(duplicates[:5])}")
    return sorted(cases, key=lambda case: case.case_id)

"""Faults of the case folders builds and predictions read: unreadable files and folders, upper-case names, hostile
headers, links back up the tree, too few file descriptors. Each case is skipped with its reason, or the run ends in
one line, before any voxel of a hostile file is read."""

from __future__ import annotations

import gzip
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import h5py
import nibabel as nib
import numpy as np

from builder.build import BuildOptions, build

from conftest import builder_cli, limited, one_error_line, trainer_cli, unprivileged


def test_unreadable_files_and_folders_are_skipped_with_reasons(case_copy, tmp_path: Path) -> None:
    source = case_copy(4)
    cases = sorted(source.iterdir())
    (cases[0] / f"{cases[0].name}-t2w.nii.gz").chmod(0)
    cases[1].chmod(0)
    out = tmp_path / "out.h5"
    code = ("import sys; from builder.cli import main; "
            f"sys.argv = ['brats-build', 'build', '{source}', '{out}', '--jobs', '1']; main()")
    done = subprocess.run(unprivileged([sys.executable, "-c", code]), capture_output=True, text=True)
    cases[1].chmod(0o755)
    assert done.returncode == 0, done.stderr
    assert f"skipped {cases[0].name}:" in done.stdout and "-t2w.nii.gz: cannot be read (Permission denied)" in done.stdout
    assert f"skipped {cases[1].name}: folder cannot be read (Permission denied)" in done.stdout
    assert "from 2/4 cases" not in done.stdout and "from 2/3 cases" in done.stdout


def test_upper_case_extensions_are_read(case_copy, tmp_path: Path) -> None:
    source = case_copy(3)
    case = sorted(source.iterdir())[0]
    for path in case.iterdir():
        path.rename(path.with_name(path.name.replace(".nii.gz", ".NII.GZ")))
    summary = build(source, tmp_path / "x.h5", BuildOptions(jobs=1, progress=False))
    assert summary.cases_written == 3 and summary.skipped == []


def _huge_header(path: Path) -> None:
    """A NIfTI that claims 240 x 240 x 32767 int16 voxels (3.8 GB) over a few real bytes."""
    header = nib.Nifti1Header()
    header.set_data_shape((240, 240, 32767))
    header.set_data_dtype(np.int16)
    header.set_zooms((1.0, 1.0, 1.0))
    raw = header.binaryblock + b"\0" * (int(header["vox_offset"]) - 348) + b"\0" * 4096
    path.write_bytes(gzip.compress(raw))


def test_hostile_headers_are_skipped_before_any_voxel_is_read(small_cases: Path, small_run: Path,
                                                             tmp_path: Path) -> None:
    source = tmp_path / "source"
    cases = sorted(small_cases.iterdir())[:3]
    for case in cases:
        shutil.copytree(case, source / case.name)
    _huge_header(next((source / cases[0].name).glob("*-t2w.nii.gz")))
    flat = next((source / cases[1].name).glob("*-t1c.nii.gz"))  # pixdim[3] = 0, which nibabel would read as 1 mm
    raw = bytearray(gzip.decompress(flat.read_bytes()))
    struct.pack_into("<f", raw, 88, 0.0)
    flat.write_bytes(gzip.compress(bytes(raw)))
    summary = build(source, tmp_path / "x.h5", BuildOptions(jobs=1, progress=False, val_fraction=0, test_fraction=0))
    reasons = {s.case_id: s.reason for s in summary.skipped}
    assert "every dimension must be 1 to 1024" in reasons[cases[0].name]
    assert "voxel size (1.0, 1.0, 0.0) mm" in reasons[cases[1].name] and summary.cases_written == 1
    predicted = trainer_cli("predict", small_run, source, "--out", tmp_path / "out", "--device", "cpu")
    assert predicted.exit_code == 1 and "Traceback" not in predicted.output
    assert f"skipped {cases[0].name}:" in predicted.output and "every dimension must be 1 to 1024" in predicted.output
    assert (tmp_path / "out" / f"{cases[2].name}.nii.gz").is_file()


def test_links_back_up_the_tree_end_the_scan(small_cases: Path, tmp_path: Path) -> None:
    source = tmp_path / "source"
    for case in sorted(small_cases.iterdir())[:2]:
        shutil.copytree(case, source / case.name)
    (source / "again").symlink_to(source, target_is_directory=True)
    (source / "once more").symlink_to(source, target_is_directory=True)
    result = builder_cli("build", source, tmp_path / "x.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert result.exit_code == 0, result.output
    assert "from 2/2 cases" in result.output and result.output.count("not scanned again") == 2


def test_too_few_file_descriptors_for_a_build(small_cases: Path, tmp_path: Path) -> None:
    code = ("import sys; from builder.cli import main; sys.argv = ['brats-build', 'build', sys.argv[1], sys.argv[2], "
            "'--jobs', '2']; main()")
    done = limited("RLIMIT_NOFILE", 16, code, str(small_cases), str(tmp_path / "x.h5"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "ran out of open files" in done.stderr and "fewer --jobs" in done.stderr
    assert not list(tmp_path.iterdir())


def test_folders_that_hold_no_case_are_counted_and_named(case_copy, tmp_path: Path) -> None:
    """10,000 empty case folders beside 4 real ones (a broken download): the build says so, naming the first
    few, in bounded time; --strict makes it fatal and writes nothing."""
    source = case_copy(4)
    for n in range(10_000):
        (source / f"BraTS-GLI-{90000 + n:05d}-000").mkdir()
    started = time.perf_counter()
    built = builder_cli("build", source, tmp_path / "a.h5", "--jobs", "1")
    assert built.exit_code == 0, built.output
    assert time.perf_counter() - started < 60
    assert "10000 folder(s) under" in built.output and "held no case (first: BraTS-GLI-90000-000" in built.output
    assert "4 rows from 4/4 cases" in built.output
    line = one_error_line(builder_cli("build", source, tmp_path / "b.h5", "--jobs", "1", "--strict"))
    assert "--strict: 10000 folder(s)" in line and not (tmp_path / "b.h5").exists()


def test_a_case_name_that_is_not_utf8_is_built_and_predicted_under_a_safe_id(small_cases: Path, small_run: Path,
                                                                            tmp_path: Path) -> None:
    """A folder named in Latin-1 (an archive made on Windows) beside good cases: built and predicted under an id
    that names its odd byte, ``%E9``, and can be turned back into the folder's name; no case is lost."""
    from builder.layout import os_name

    source = tmp_path / "source"
    good, odd = sorted(small_cases.iterdir())[:2]
    shutil.copytree(good, source / good.name)
    name = os.fsdecode(os.fsencode(odd.name) + b"\xe9")
    (source / name).mkdir()
    for path in odd.iterdir():
        shutil.copy(path, source / name / os.fsdecode(os.fsencode(path.name).replace(
            os.fsencode(odd.name), os.fsencode(name))))
    case_id = f"{odd.name}%E9"
    built = builder_cli("build", source, tmp_path / "x.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert built.exit_code == 0, built.output
    assert "from 2/2 cases" in built.output and f"not valid UTF-8; its case id is {case_id}" in built.output
    with h5py.File(tmp_path / "x.h5") as f:
        assert sorted(v.decode() for v in f["case_id"][()]) == sorted([good.name, case_id])
    assert os_name(case_id) == name
    out = tmp_path / os.fsdecode(b"masks\xe9")  # an output folder named the same way
    predicted = trainer_cli("predict", small_run, source, "--out", out, "--device", "cpu")
    assert predicted.exit_code == 0, predicted.output
    table = (out / "predict_scores.csv").read_bytes()  # the folder's name as the OS gave it
    assert (out / f"{case_id}.nii.gz").is_file() and case_id.encode() in table and os.fsencode(out) in table
    assert np.array_equal(nib.load(out / f"{case_id}.nii.gz").affine, nib.load(next((source / name).iterdir())).affine)


def test_a_case_past_the_path_length_limit_is_skipped_with_one_line(small_cases: Path, small_run: Path,
                                                                    tmp_path: Path) -> None:
    """A case nested 18 folders of 240 bytes deep (over Linux's 4096-byte path limit): build and predict each
    name it in one line that says why, and go on with the other cases."""
    source = tmp_path / "source"
    good, deep = sorted(small_cases.iterdir())[:2]
    shutil.copytree(good, source / good.name)
    folder = os.open(source, os.O_RDONLY)
    for name in ["d" * 240] * 18 + [deep.name]:  # made through folder descriptors: no path is ever that long
        os.mkdir(name, dir_fd=folder)
        inner = os.open(name, os.O_RDONLY, dir_fd=folder)
        os.close(folder)
        folder = inner
    for path in deep.iterdir():
        with open(os.open(path.name, os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=folder), "wb") as handle:
            handle.write(path.read_bytes())
    os.close(folder)
    built = builder_cli("build", source, tmp_path / "x.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert built.exit_code == 0, built.output
    assert "from 1/1 cases" in built.output and "longer than the system allows" in built.output
    assert "permissions" not in built.output
    out = tmp_path / "out"
    predicted = trainer_cli("predict", small_run, source, "--out", out, "--device", "cpu")
    assert predicted.exit_code == 1 and predicted.output.count("longer than the system allows") == 1
    assert (out / f"{good.name}.nii.gz").is_file()


def test_a_fifo_a_device_or_a_folder_as_a_modality_is_named_as_what_it_is(small_cases: Path, small_run: Path,
                                                                          tmp_path: Path) -> None:
    source = tmp_path / "source"
    cases = sorted(small_cases.iterdir())[:4]
    for case in cases:
        shutil.copytree(case, source / case.name)
    fifo, device, folder = (source / c.name / f"{c.name}-{m}.nii.gz" for c, m in zip(cases[1:], ("t1c", "t2w", "t2f")))
    for path in (fifo, device, folder):
        path.unlink()
    os.mkfifo(fifo)
    device.symlink_to("/dev/zero")
    folder.mkdir()
    expected = (f"{fifo.name} is a FIFO (named pipe), not a file", f"{device.name} is a character device, not a file",
                f"{folder.name} is a folder, not a file")
    built = builder_cli("build", source, tmp_path / "x.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert built.exit_code == 0 and "from 1/4 cases" in built.output, built.output
    assert all(words in built.output for words in expected) and "missing" not in built.output
    predicted = trainer_cli("predict", small_run, source, "--out", tmp_path / "out", "--device", "cpu")
    assert predicted.exit_code == 1 and all(words in predicted.output for words in expected)
    assert "missing" not in predicted.output


def test_a_source_that_reaches_the_system_root_is_refused_at_once(small_cases: Path, small_run: Path,
                                                                  tmp_path: Path) -> None:
    """A source that is a link to ``/`` is refused in one line before any scan; a link to ``/usr`` among the cases is
    said and not scanned (walking it took seconds and ended in a misleading duplicate-id error)."""
    root = tmp_path / "everything"
    root.symlink_to("/", target_is_directory=True)
    started = time.perf_counter()
    for result in (builder_cli("build", root, tmp_path / "x.h5", "--jobs", "1"),
                   trainer_cli("predict", small_run, root, "--out", tmp_path / "out", "--device", "cpu")):
        line = one_error_line(result)
        assert "is the system folder /, not a folder of BraTS cases" in line and str(root) in line
    assert time.perf_counter() - started < 20 and not (tmp_path / "x.h5").exists()
    source = tmp_path / "source"
    shutil.copytree(sorted(small_cases.iterdir())[0], source / sorted(small_cases.iterdir())[0].name)
    (source / "tools").symlink_to("/usr", target_is_directory=True)
    built = builder_cli("build", source, tmp_path / "y.h5", "--jobs", "1", "--val-fraction", "0", "--test-fraction", "0")
    assert built.exit_code == 0 and "from 1/1 cases" in built.output
    assert "a link to the system folder /usr; not scanned" in built.output

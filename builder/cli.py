"""``brats-build``: make synthetic cases, build the HDF5 artifact, inspect and verify it."""

from __future__ import annotations

from pathlib import Path

import click
from joblib import Parallel, delayed

from builder import __version__
from builder.build import BuildError, BuildOptions, build
from builder.console import Commands
from builder.extract import SliceRule
from builder.format import MAX_CONTEXT, PLANES
from builder.inspect import describe, verify
from builder.labels import LABEL4_CHOICES
from builder.layout import LAYOUTS
from builder.progress import Progress
from builder.remote import ArtifactFile
from builder.synth import write_case
from builder.writer import COMPRESSIONS, DEFAULT_COMPRESSION


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="brats-build (brats2d)")
def main() -> None:
    """Turn a BraTS folder into one chunked HDF5 file of densest tumour slices (datasets/FORMAT.md)."""


@main.command()
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", default=60, show_default=True, type=click.IntRange(1), help="How many cases to write.")
@click.option("--seed", default=0, show_default=True, help="Same seed, same cases.")
@click.option("--first", default=0, show_default=True, type=click.IntRange(0), help="Index of the first case.")
@click.option("--jobs", default=-1, show_default=True, callback=lambda _c, _p, v: _jobs(v),
              help="Parallel processes (-1: all cores).")
@click.option("--layout", type=click.Choice(sorted(LAYOUTS)), default="brats2023", show_default=True,
              help="File naming: BraTS 2023 (-t1n ... -seg) or 2020/2021 (_t1 ... _seg, ET as label 4).")
@click.option("--uncompressed", is_flag=True, help="Write .nii instead of .nii.gz.")
def synth(out: Path, cases: int, seed: int, first: int, jobs: int, layout: str, uncompressed: bool) -> None:
    """Write synthetic cases in the exact BraTS layout under OUT (240x240x155, int16 images, uint8 seg)."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise click.ClickException(f"{out}: cannot create this folder ({error.strerror})") from None
    run = Parallel(n_jobs=jobs, return_as="generator_unordered")
    tasks = (delayed(write_case)(out, i, seed, layout, not uncompressed) for i in range(first, first + cases))
    for _ in Progress(run(tasks), "synthetic cases", cases, "case"):
        pass
    click.echo(f"wrote {cases} synthetic cases to {out}")


@main.command(name="build")
@click.argument("source", type=click.Path(path_type=Path))
@click.argument("out", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--jobs", default=-1, show_default=True, callback=lambda _c, _p, v: _jobs(v),
              help="Parallel processes (-1: all cores).")
@click.option("--seed", default=0, show_default=True, help="Seed of the train/val/test split.")
@click.option("--val-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1))
@click.option("--test-fraction", default=0.05, show_default=True, type=click.FloatRange(0, 1))
@click.option("--slices-per-case", default="1", show_default=True,
              help="How many of the densest tumour slices per case become rows, or 'all'.")
@click.option("--min-tumour-voxels", default=1, show_default=True, type=click.IntRange(1),
              help="A slice needs at least this many labelled voxels to become a row.")
@click.option("--background-slices", default=0, show_default=True, type=click.IntRange(0),
              help="Also keep this many tumour-free brain slices per case, evenly spaced (marked in /background), "
                   "so that models learn what no tumour looks like and predict fewer false lesions on whole volumes.")
@click.option("--label4", type=click.Choice(LABEL4_CHOICES), default="auto", show_default=True,
              help="What seg label 4 means: auto = enhancing tumour in pre-2023 names (Brats18_..., BraTS2021_...), "
                   "and a skipped case in 2023-style names (BraTS 2024 uses 4 for the resection cavity); "
                   "et = enhancing tumour; background = not tumour.")
@click.option("--plane", type=click.Choice(list(PLANES)), default="axial", show_default=True,
              help="Slice the volumes in this plane (of the volumes' own orientation, worked out from their axis codes): "
                   "build one file per plane to train a three-plane ensemble. Coronal and sagittal slices of BraTS "
                   "are 240x155 (the trainer pads them).")
@click.option("--context", default=0, show_default=True, type=click.IntRange(0, MAX_CONTEXT),
              help="Also store the K slices on each side of every row (zeros beyond the volume's edge), so that models "
                   "can see what lies above and below (2.5D: `brats-train fit --context K`, at most this K).")
@click.option("--compression", type=click.Choice(sorted(COMPRESSIONS)), default=DEFAULT_COMPRESSION, show_default=True,
              help="blosc-lz4: smallest and fastest, but readers need the Blosc plugin (Python: hdf5plugin); "
                   "gzip: HDF5's built-in deflate, readable by any HDF5 tool (h5py alone, h5ls, HDFView, MATLAB); "
                   "none: largest, readable anywhere.")
@click.option("--strict", is_flag=True,
              help="Fail on the first bad case instead of skipping it, and on folders that hold no case.")
@click.option("--backend", type=click.Choice(["loky", "dask"]), default="loky", show_default=True,
              help="joblib backend: local processes, or a Dask cluster.")
@click.option("--scheduler", default=None, help="Dask scheduler address (tcp://HOST:PORT); default: a local cluster.")
def build_command(source: Path, out: Path, jobs: int, seed: int, val_fraction: float, test_fraction: float,
                  slices_per_case: str, min_tumour_voxels: int, background_slices: int, label4: str, plane: str,
                  context: int, compression: str, strict: bool, backend: str, scheduler: str | None) -> None:
    """Build OUT (an .h5 file) from the BraTS case folders under SOURCE.

    Reads each case's seg in full, picks its densest slice(s) in --plane (axial by default), reads just those slices
    (and their --context neighbours) of the four modalities, and streams the rows into OUT with split indices by patient (all scans of a patient in one
    split). Bad cases, and cases whose orientation or voxel size differs from the rest, are skipped and listed.

    OUT appears only when complete: a failed, killed or interrupted (Ctrl-C, SIGTERM) build leaves the previous
    OUT as it was and no partial file (partials of builds killed with -9 are removed by the next build).
    """
    per_case = None if slices_per_case == "all" else _positive_int(slices_per_case)
    options = BuildOptions(
        jobs=jobs, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction,
        rule=SliceRule(per_case=per_case, min_tumour_voxels=min_tumour_voxels, background=background_slices,
                       label4=label4, plane=plane, context=context),
        strict=strict, backend=backend, scheduler=scheduler, compression=compression,
    )
    try:
        summary = build(source, out, options)
    except BuildError as error:
        raise click.ClickException(str(error)) from None
    for partial in summary.removed_partials:
        click.echo(f"removed {partial}, left by a build that no longer runs")
    for note in summary.notes:
        click.echo(note)
    splits = ", ".join(f"{name} {n}" for name, n in summary.split_rows.items())
    click.echo(
        f"wrote {summary.out}: {summary.rows} rows from {summary.cases_written}/{summary.cases_scanned} cases "
        f"({splits}) in {summary.seconds:.1f} s"
    )
    for skipped in summary.skipped:
        click.echo(f"skipped {skipped.case_id}: {skipped.reason}")


def _jobs(value: int) -> int:
    if value == 0 or value < -1:
        raise click.BadParameter(f"{value}: use a positive number of processes, or -1 for all cores", param_hint="--jobs")
    return value


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise click.BadParameter(f"{text!r} is neither a positive whole number nor 'all'", param_hint="--slices-per-case")
    return int(text)


def _existing_file(path: Path) -> None:
    if not path.is_file():
        raise click.ClickException(f"{path}: no such file (build one with `make dataset` or `make demo`)")


@main.command()
@click.argument("file", type=ArtifactFile())
def info(file: Path) -> None:
    """Print a summary of an artifact (FILE, or its address: https://, s3://, hf://... with #sha256=<hex>, fetched
    once into the cache): rows, splits, modalities, provenance, skipped cases."""
    _existing_file(file)
    try:
        summary = describe(file)
    except Exception as error:  # whatever a damaged or foreign file makes h5py raise: never a traceback
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise click.ClickException(f"{file}: not a readable brats2d artifact ({reason}); run `brats-build verify {file}`"
                                   ) from None
    click.echo(summary)


@main.command()
@click.argument("file", type=click.Path(dir_okay=False, path_type=Path))
@click.argument("folder", type=click.Path(file_okay=False, path_type=Path))
@click.option("--repository", default="ORG/NAME", show_default=True,
              help="The dataset repository it will be pushed to (Hugging Face Hub ORG/NAME), for the card's commands.")
def publish(file: Path, folder: Path, repository: str) -> None:
    """Write what a dataset repository holds into FOLDER: FILE, FILE.sha256 (which `brats-train` checks a download
    against), README.md (a dataset card the Hugging Face Hub reads: splits, provenance, SHA-256, citations) and
    DATA_USE.md (the terms to check before sharing BraTS-derived data). Then push FOLDER with your own tools, e.g.
    `huggingface-cli upload ORG/NAME FOLDER --repo-type dataset` or `aws s3 cp --recursive FOLDER s3://BUCKET/`."""
    from builder.publish import PublishError
    from builder.publish import publish as write_publication

    _existing_file(file)
    try:
        written = write_publication(file, folder, repository)
    except PublishError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"{folder}: {', '.join(p.name for p in written)}. Read {written[-1]} before you push it anywhere.")


@main.command(name="verify")
@click.argument("file", type=ArtifactFile())
def verify_command(file: Path) -> None:
    """Check shapes, labels, splits and every chunk's checksum; exit 1 naming each problem."""
    _existing_file(file)
    problems = verify(file)
    if problems:
        for problem in problems:
            click.echo(f"{file}: {problem}", err=True)
        raise SystemExit(1)
    click.echo(f"{file}: OK")



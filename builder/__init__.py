"""brats2d builder: BraTS case folders -> one chunked, checksummed HDF5 artifact (see datasets/FORMAT.md)."""

__version__ = "0.6.0"  # the one place: pyproject.toml, both CLIs' --version and every file and run read it

"""Read only the bytes of a NIfTI volume that the build needs.

A .nii.gz can only be decoded from its start, so the cost of reading axial slice z grows with z. We decode
the stream piece by piece (ISA-L's inflate when python-isal is installed, else zlib), keep the header and
the wanted slices, drop every skipped piece at once, and stop right after the last wanted slice. Values come out as
``np.asanyarray(nib.load(path).dataobj)[:, :, z]`` would give them: same dtype, same scaling.
"""

from __future__ import annotations

import errno
import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

try:  # ISA-L inflates 2-3x faster than zlib; same API.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - exercised only where python-isal is missing
    import zlib as _zlib

_PIECE = 16 * 1024 * 1024  # most decoded bytes per call: few calls; one volume's worth at most
_READ = 256 * 1024  # compressed bytes fed per call: the decoder copies its unconsumed input each call
_NIFTI2_HEADER = 540


#: Errors that are the machine's limits (open files, memory), never a case's fault.
LIMITS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)


class NiftiReadError(Exception):
    """The file is missing, truncated, corrupt or not a 3D NIfTI volume within bounds."""


#: Bounds on what a header may declare before any voxel is read (BraTS: 240 x 240 x 155 at 1 mm, 18 MB as int16):
#: a crafted or broken header (240 x 240 x 32767, a gzip bomb) is refused instead of exhausting memory.
MAX_DIMENSION = 1024
MAX_VOLUME_BYTES = 1 << 30


def header_problem(header: nib.Nifti1Header) -> str | None:
    """Why a NIfTI header cannot be read as one volume within bounds, or None: 3D (a trailing axis of 1 allowed),
    every dimension from 1 to MAX_DIMENSION, voxel sizes positive and finite, and the decoded values (as float64
    when scaled, as nibabel gives them) within MAX_VOLUME_BYTES."""
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        return f"expected a 3D volume, got shape {shape}"
    if not all(1 <= n <= MAX_DIMENSION for n in shape):
        return f"shape {shape} in the header: every dimension must be 1 to {MAX_DIMENSION} (BraTS is 240x240x155)"
    zooms = tuple(float(z) for z in header.get_zooms()[:3])
    if not all(0 < z < float("inf") for z in zooms):
        return f"voxel size {zooms} mm in the header: not positive and finite; fix its pixdim fields"
    itemsize = max(header.get_data_dtype().itemsize, 8 if header.get_slope_inter()[0] is not None else 0)
    decoded = int(np.prod(shape)) * itemsize
    if decoded > MAX_VOLUME_BYTES:
        return (f"shape {shape} would decode to {decoded / 2**30:.1f} GiB, over the {MAX_VOLUME_BYTES / 2**30:.0f} GiB "
                "a volume may take")
    return None


@dataclass(frozen=True)
class VolumeHeader:
    """What the build needs from a NIfTI header."""

    shape: tuple[int, int, int]
    disk_dtype: np.dtype
    slope: float | None
    inter: float | None
    vox_offset: int
    header: nib.Nifti1Header

    @property
    def slice_shape(self) -> tuple[int, int]:
        return self.shape[0], self.shape[1]

    @property
    def slice_bytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.disk_dtype.itemsize

    @property
    def value_dtype(self) -> np.dtype:
        """The dtype nibabel's ``dataobj`` yields (a float type when the header scales values)."""
        return self.scale(np.zeros(1, self.disk_dtype)).dtype

    def scale(self, raw: np.ndarray) -> np.ndarray:
        if self.slope is None:
            return raw
        return apply_read_scaling(raw, self.slope, self.inter)


class _Stream:
    """Decoded bytes of a (possibly gzipped) file, pulled on demand; skipped bytes are never kept."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._file = open(path, "rb")
        except OSError as error:
            if error.errno in LIMITS:  # the machine's limit, not the case's fault: stop the build, do not skip
                raise
            raise NiftiReadError(f"{path}: cannot be read ({error.strerror}); fix its permissions") from None
        self._decoder = _zlib.decompressobj(31) if path.name.lower().endswith(".gz") else None
        self._pending = b""  # compressed bytes read but not yet decoded
        self._buffer = memoryview(b"")  # decoded bytes not yet consumed
        self.position = 0  # offset of the next decoded byte in the file's content

    def _more(self, wanted: int) -> bool:
        """Decode up to ``wanted`` more bytes (at most _PIECE); False at the end of the data."""
        limit = max(1, min(wanted, _PIECE))
        if self._decoder is None:
            piece = self._read(limit)
        else:
            piece = b""
            while not piece:
                if not self._pending:
                    self._pending = self._read(_READ)
                    if not self._pending:
                        return False
                try:
                    piece = self._decoder.decompress(self._pending, limit)
                except (_zlib.error, OSError) as error:
                    raise NiftiReadError(f"{self.path}: corrupt compressed data ({error})") from None
                self._pending = self._decoder.unconsumed_tail
                if self._decoder.eof:  # a further gzip member may follow (concatenated .gz files are legal)
                    self._pending = self._decoder.unused_data + self._pending
                    self._decoder = _zlib.decompressobj(31)
        self._buffer = memoryview(piece)
        return bool(piece)

    def _read(self, n: int) -> bytes:
        try:
            return self._file.read(n)
        except OSError as error:  # a failing disk or network file system
            raise NiftiReadError(f"{self.path}: reading failed ({error.strerror or error})") from None

    def _ends_early(self) -> NiftiReadError:
        return NiftiReadError(f"{self.path}: file ends early (truncated?) at byte {self.position}")

    def read_into(self, out: memoryview) -> None:
        filled = 0
        while filled < len(out):
            if not self._buffer and not self._more(len(out) - filled):
                raise self._ends_early()
            n = min(len(out) - filled, len(self._buffer))
            out[filled : filled + n] = self._buffer[:n]
            self._buffer = self._buffer[n:]
            filled += n
            self.position += n

    def read(self, n: int) -> bytes:
        out = bytearray(n)
        self.read_into(memoryview(out))
        return bytes(out)

    def skip_to(self, offset: int) -> None:
        while self.position < offset:
            if not self._buffer and not self._more(offset - self.position):
                raise self._ends_early()
            n = min(offset - self.position, len(self._buffer))
            self._buffer = self._buffer[n:]
            self.position += n

    def close(self) -> None:
        self._file.close()


def _parse_header(stream: _Stream) -> VolumeHeader:
    block = stream.read(348)
    size_le, size_be = int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")
    if 348 in (size_le, size_be):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(block), check=False)
    elif _NIFTI2_HEADER in (size_le, size_be):
        header = nib.Nifti2Header.from_fileobj(io.BytesIO(block + stream.read(_NIFTI2_HEADER - 348)), check=False)
    else:
        raise NiftiReadError(f"{stream.path}: not a NIfTI file (header size field is {size_le})")
    problem = header_problem(header)
    if problem:
        raise NiftiReadError(f"{stream.path}: {problem}")
    shape = tuple(int(n) for n in header.get_data_shape())[:3]
    slope, inter = header.get_slope_inter()
    if slope is not None and (slope, inter or 0.0) == (1.0, 0.0):
        slope = inter = None
    return VolumeHeader(
        shape=shape,  # type: ignore[arg-type]
        disk_dtype=header.get_data_dtype(),
        slope=slope,
        inter=inter,
        vox_offset=int(header.get_data_offset()),
        header=header,
    )


def read_header(path: Path) -> VolumeHeader:
    """Decode just the header of a NIfTI file."""
    stream = _open(path)
    try:
        return _parse_header(stream)
    finally:
        stream.close()


def _open(path: Path) -> _Stream:
    if not path.is_file():
        raise NiftiReadError(f"{path}: missing")
    return _Stream(path)


def read_raw_slices(path: Path, zs: Iterable[int] | None, reuse: bool = False) -> tuple[np.ndarray, VolumeHeader]:
    """Unscaled axial slices as stored, one (k, Y, X) array (a Fortran-order slice is C-order (Y, X)).

    ``zs=None`` means every slice. Decodes the file only up to the end of the last wanted slice and keeps
    only the wanted slices. With ``reuse`` the result lives in a per-process buffer that the next such call
    overwrites (a fresh 9-18 MB array costs milliseconds of page faults): copy what you keep.
    """
    stream = _open(path)
    try:
        info = _parse_header(stream)
        wanted = sorted(zs) if zs is not None else list(range(info.shape[2]))
        if wanted and not 0 <= wanted[0] <= wanted[-1] < info.shape[2]:
            raise NiftiReadError(f"{path}: slice {wanted[-1]} is outside the volume's {info.shape[2]} slices")
        x, y = info.slice_shape
        raw = _buffer((len(wanted), y, x), info.disk_dtype) if reuse else np.empty((len(wanted), y, x), info.disk_dtype)
        view = memoryview(raw.reshape(-1).view(np.uint8))
        for i, z in enumerate(wanted):
            stream.skip_to(info.vox_offset + z * info.slice_bytes)
            stream.read_into(view[i * info.slice_bytes : (i + 1) * info.slice_bytes])
    finally:
        stream.close()
    return raw, info


def read_slices(path: Path, zs: Iterable[int]) -> tuple[np.ndarray, VolumeHeader]:
    """Axial slices ``vol[:, :, z]`` for each z in ``zs`` (ascending), as one (k, X, Y) array of values."""
    raw, info = read_raw_slices(path, zs)
    return np.ascontiguousarray(info.scale(raw).transpose(0, 2, 1)), info


def read_all_raw_slices(path: Path) -> tuple[np.ndarray, VolumeHeader]:
    """Every axial slice, unscaled, as (Z, Y, X), in the reused buffer: slice z transposed is ``vol[:, :, z]``."""
    return read_raw_slices(path, None, reuse=True)


_buffers: dict[tuple[tuple[int, ...], str], np.ndarray] = {}


def _buffer(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    key = (shape, dtype.str)
    if key not in _buffers:
        _buffers.clear()  # keep one: volumes of one dataset share a shape
        _buffers[key] = np.empty(shape, dtype)
    return _buffers[key]

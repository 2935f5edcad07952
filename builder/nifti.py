"""Read only the bytes of a NIfTI volume that the build needs.

A .nii.gz can only be decoded from its start, so the cost of reading axial slice z grows with z. We decode
the stream in small pieces (ISA-L's inflate when python-isal is installed, else zlib), keep the header and
the wanted slices, drop everything else, and stop right after the last wanted slice. Values come out as
``np.asanyarray(nib.load(path).dataobj)[:, :, z]`` would give them: same dtype, same scaling.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.volumeutils import apply_read_scaling

try:  # ISA-L inflates 2-3x faster than zlib; same API.
    from isal import isal_zlib as _zlib
except ImportError:  # pragma: no cover - exercised only where python-isal is missing
    import zlib as _zlib

_PIECE = 256 * 1024  # decoded bytes per step: small enough for the allocator to reuse, big enough to be cheap
_READ = 1 << 20  # compressed bytes read from disk per step
_NIFTI2_HEADER = 540


class NiftiReadError(Exception):
    """The file is missing, truncated, corrupt or not a 3D NIfTI volume."""


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


def _decoded_pieces(path: Path) -> Iterator[bytes]:
    """Yield the file's decoded bytes in pieces of at most _PIECE bytes, lazily."""
    with open(path, "rb") as f:
        if not path.name.endswith(".gz"):
            while piece := f.read(_PIECE):
                yield piece
            return
        decoder = _zlib.decompressobj(31)
        pending = b""
        while True:
            if not pending:
                pending = f.read(_READ)
                if not pending:
                    return
            piece = decoder.decompress(pending, _PIECE)
            pending = decoder.unconsumed_tail
            if decoder.eof:  # a further gzip member may follow (concatenated .gz files are legal)
                pending = decoder.unused_data + pending
                decoder = _zlib.decompressobj(31)
            if piece:
                yield piece


class _Stream:
    """Pull-based reader over decoded pieces that can skip bytes without keeping them."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._pieces = _decoded_pieces(path)
        self._buffer = memoryview(b"")
        self.position = 0

    def _more(self) -> bool:
        try:
            self._buffer = memoryview(next(self._pieces))
        except StopIteration:
            return False
        except (OSError, EOFError, _zlib.error) as error:
            raise NiftiReadError(f"{self.path}: corrupt compressed data ({error})") from None
        return True

    def read_into(self, out: memoryview) -> None:
        filled = 0
        while filled < len(out):
            if not self._buffer and not self._more():
                raise NiftiReadError(f"{self.path}: file ends early (truncated?) at byte {self.position}")
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
            if not self._buffer and not self._more():
                raise NiftiReadError(f"{self.path}: file ends early (truncated?) at byte {self.position}")
            n = min(offset - self.position, len(self._buffer))
            self._buffer = self._buffer[n:]
            self.position += n

    def close(self) -> None:
        self._pieces.close()


def _parse_header(stream: _Stream) -> VolumeHeader:
    block = stream.read(348)
    size_le, size_be = int.from_bytes(block[:4], "little"), int.from_bytes(block[:4], "big")
    if 348 in (size_le, size_be):
        header = nib.Nifti1Header.from_fileobj(io.BytesIO(block), check=False)
    elif _NIFTI2_HEADER in (size_le, size_be):
        header = nib.Nifti2Header.from_fileobj(io.BytesIO(block + stream.read(_NIFTI2_HEADER - 348)), check=False)
    else:
        raise NiftiReadError(f"{stream.path}: not a NIfTI file (header size field is {size_le})")
    shape = tuple(int(n) for n in header.get_data_shape())
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        raise NiftiReadError(f"{stream.path}: expected a 3D volume, got shape {shape}")
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


def read_raw_slices(path: Path, zs: Iterable[int]) -> tuple[np.ndarray, VolumeHeader]:
    """Unscaled axial slices as stored, one (k, Y, X) array (a Fortran-order slice is C-order (Y, X)).

    Decodes the file only up to the end of the last wanted slice and keeps only the wanted slices.
    """
    wanted = sorted(zs)
    stream = _open(path)
    try:
        info = _parse_header(stream)
        if wanted and not 0 <= wanted[0] <= wanted[-1] < info.shape[2]:
            raise NiftiReadError(f"{path}: slice {wanted[-1]} is outside the volume's {info.shape[2]} slices")
        x, y = info.slice_shape
        raw = np.empty((len(wanted), y, x), dtype=info.disk_dtype)
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
    """Every axial slice, unscaled, as (Z, Y, X): slice z transposed is ``vol[:, :, z]``."""
    return read_raw_slices(path, range(read_header(path).shape[2]))

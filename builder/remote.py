"""Artifacts by address: DATA given as ``https://``, ``s3://``, ``hf://`` or any fsspec URL is fetched once into a
local cache, verified against the SHA-256 its publisher gave, and read from there as a local file; or, with
``--stream``, read in place by range requests (``open_h5``), for files larger than the disk.

The SHA-256 comes from the address (``...file.h5#sha256=<64 hex digits>``) or, without one, from a sidecar the
publisher put beside the file (``file.h5.sha256``, as ``sha256sum`` writes it). A cache entry is used only while it
is the file that was verified (its size and modification time as recorded then; a changed entry is hashed again and,
if it fails, fetched again); a download is written under a partial name and renamed only once its bytes check, so a
cut connection or a wrong checksum leaves nothing in the cache. A streamed file is never hashed whole (that would
read every byte): its metadata and every chunk carry HDF5 checksums, checked as they are read, and runs record the
publisher's SHA-256 as given. fsspec and the protocol packages are the optional extra ``brats2d[remote]``; nothing
here imports them until an address is given.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import re
import sys
import uuid
import weakref
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import h5py

from builder.format import file_sha256

#: ``scheme://`` at the start: an address, never a local path (a local file named so is given as ./scheme:/...).
SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
FRAGMENT = re.compile(r"#sha256=([0-9a-fA-F]{64})$")
CACHE_VARIABLE = "BRATS2D_CACHE"
EXTRA = "pip install 'brats2d[remote]'"
#: What a streamed read asks for at a time (one range request) and keeps, per handle: about three rows of the recipe's
#: file (each row's chunks lie together: builder.writer), or its metadata (builder.writer.META_BLOCK). 1 MiB took 1.2
#: requests a row; 512 KiB more requests for fewer bytes (benchmarks/bench_remote.py).
STREAM_BLOCK = 1 << 20
STREAM_BLOCKS_KEPT = 64
#: Seconds a streamed read may wait for the server (connect, then each read) before it fails in one line.
STREAM_TIMEOUT_S = 60.0
#: ``ctx.meta`` key set by a command's ``--stream`` (eager, so that DATA is converted knowing it).
STREAM_KEY = "brats2d.stream"


class RemoteError(click.ClickException):
    """An address that could not be fetched or verified: one line naming the URL and what to do."""


@dataclass(frozen=True)
class Address:
    """A file's address and the SHA-256 it must have."""

    url: str  # without the #sha256= fragment
    sha256: str | None  # from the fragment; None: read the publisher's sidecar

    @classmethod
    def parse(cls, text: str) -> Address:
        found = FRAGMENT.search(text)
        if found:
            return cls(text[: found.start()], found.group(1).lower())
        if "#" in text:
            raise RemoteError(f"{text}: the part after # must be sha256=<64 hex digits> (the file's SHA-256)")
        return cls(text, None)

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1] or "artifact.h5"

    def pinned(self, sha256: str) -> str:
        """The address with its SHA-256, as runs record it."""
        return f"{self.url}#sha256={sha256}"


def is_address(text: object) -> bool:
    return isinstance(text, str) and SCHEME.match(text) is not None


def cache_root() -> Path:
    """Where fetched artifacts are kept: $BRATS2D_CACHE, else ~/.cache/brats2d."""
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "brats2d") / "artifacts"


def local_copy(text: str, progress: bool = True) -> tuple[Path, str]:
    """The verified local copy of the artifact at address ``text`` (fetched once), and the address pinned to its
    SHA-256 (``url#sha256=...``), for runs to record."""
    address = Address.parse(text)
    filesystem, remote_path = _filesystem(address.url)
    expected = address.sha256 or _sidecar_sha256(filesystem, remote_path, address)
    entry = cache_root() / expected / address.name
    if entry.is_file():
        if _verified(entry, expected):
            return entry, address.pinned(expected)
        print(f"{entry}: this cache entry is not the file that was verified (its SHA-256 differs); fetching "
              f"{address.url} again", file=sys.stderr)
        _remove(entry)
    _download(filesystem, remote_path, address, expected, entry, progress)
    return entry, address.pinned(expected)


def _filesystem(url: str) -> tuple[Any, str]:
    scheme = SCHEME.match(url).group(1)  # type: ignore[union-attr]
    try:
        import fsspec
    except ImportError:
        raise RemoteError(f"{url}: reading an artifact from an address needs fsspec: {EXTRA}") from None
    try:
        return fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as error:  # an unknown protocol, or its package missing (s3fs, aiohttp, ...)
        raise RemoteError(f"{url}: the {scheme}:// protocol is not available here ({_reason(error)}); {EXTRA}, or "
                          "download the file and give its local path") from None


def _sidecar_sha256(filesystem: Any, remote_path: str, address: Address) -> str:
    """The publisher's ``NAME.sha256`` beside the file (``sha256sum`` format: the digest first)."""
    try:
        with filesystem.open(remote_path + ".sha256", "rb") as handle:
            text = handle.read(4096).decode("ascii", "replace")
    except FileNotFoundError:
        raise RemoteError(f"{address.url}: no SHA-256 to check it against: add #sha256=<hex> to the address (the "
                          f"publisher's dataset card gives it), or publish {address.name}.sha256 beside the file"
                          ) from None
    except Exception as error:  # noqa: BLE001  (whatever the protocol raises: one line)
        raise _unreachable(address.url + ".sha256", error) from None
    digest = text.split()[0].lower() if text.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", digest):
        raise RemoteError(f"{address.url}.sha256: not a SHA-256 (it should start with 64 hex digits, as sha256sum "
                          "writes it); give #sha256=<hex> in the address instead")
    return digest


def _download(filesystem: Any, remote_path: str, address: Address, expected: str, entry: Path,
              progress: bool) -> None:
    """Fetch into a partial file, check size and SHA-256, then rename into the cache: whole or nothing."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    partial = entry.with_name(f".{entry.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.partial")
    try:
        filesystem.get_file(remote_path, str(partial), callback=_callback(address, progress))
        got, size = partial.stat().st_size, _size(filesystem, remote_path)
        if size is not None and got != size:
            raise RemoteError(f"{address.url}: the download was cut short ({got} of {size} bytes); nothing was kept: "
                              "try again")
        digest = file_sha256(partial)
        if digest != expected:
            raise RemoteError(f"{address.url}: its SHA-256 is {digest[:16]}..., the address says {expected[:16]}...; "
                              "the file changed or the address is wrong: nothing was kept (ask its publisher for the "
                              "current SHA-256)")
        os.replace(partial, entry)
        _record_verified(entry)
    except RemoteError:
        raise
    except FileNotFoundError:
        raise _not_found(address.url) from None
    except Exception as error:  # noqa: BLE001  (a dropped connection, a timeout, a refused one: one line)
        raise _unreachable(address.url, error) from None
    finally:
        _remove(partial)
        if entry.parent.is_dir() and not any(entry.parent.iterdir()):
            entry.parent.rmdir()


def _size(filesystem: Any, remote_path: str) -> int | None:
    """The size the server gives, if it gives one (asked after the download: fsspec takes a refused connection
    for a missing file when it asks first)."""
    try:
        size = filesystem.size(remote_path)
    except Exception:  # noqa: BLE001  (some servers answer no HEAD)
        return None
    return int(size) if size is not None else None


def _callback(address: Address, progress: bool) -> Any:
    """A progress bar in a terminal (fsspec sets its total from the response)."""
    from fsspec.callbacks import NoOpCallback, TqdmCallback

    if not (progress and sys.stderr.isatty()):
        return NoOpCallback()
    return TqdmCallback(tqdm_kwargs={"desc": f"fetching {address.name}", "unit": "B", "unit_scale": True,
                                     "leave": False})


def _not_found(url: str) -> RemoteError:
    return RemoteError(f"{url}: not found there (404 or no such object); check the address")


def _unreachable(url: str, error: Exception) -> RemoteError:
    return RemoteError(f"{url}: could not be fetched ({_reason(error)}); check the network and the address, or "
                       "download the file and give its local path")


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0][:160] if str(error) else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _stamp_file(entry: Path) -> Path:
    return entry.with_name(entry.name + ".verified")


def _record_verified(entry: Path) -> None:
    status = entry.stat()
    _stamp_file(entry).write_text(json.dumps({"size": status.st_size, "mtime_ns": status.st_mtime_ns}))


def _verified(entry: Path, expected: str) -> bool:
    """True while ``entry`` is the file verified on download; a changed one is hashed again."""
    status = entry.stat()
    try:
        stamp = json.loads(_stamp_file(entry).read_text())
        if stamp == {"size": status.st_size, "mtime_ns": status.st_mtime_ns}:
            return True
    except (OSError, ValueError):
        pass
    if file_sha256(entry) != expected:
        return False
    _record_verified(entry)
    return True


def _remove(path: Path) -> None:
    for leftover in (path, _stamp_file(path)):
        try:
            leftover.unlink()
        except FileNotFoundError:
            pass


def stream_address(text: str) -> str:
    """The address to stream, pinned to the SHA-256 its publisher gave (the fragment, or the sidecar), and checked to
    be reachable; nothing is downloaded."""
    address = Address.parse(text)
    filesystem, remote_path = _filesystem(address.url)
    expected = address.sha256 or _sidecar_sha256(filesystem, remote_path, address)
    remote_stamp(address.pinned(expected))
    return address.pinned(expected)


def address_sha256(text: str) -> str | None:
    """The SHA-256 an address is pinned to (``#sha256=``), if any."""
    return Address.parse(text).sha256


def _stream_filesystem(address: Address) -> tuple[Any, str]:
    """The filesystem of a streamed address, with bounded waits where the protocol takes them (http, https)."""
    found = _filesystem(address.url)  # fsspec and the protocol's package are there (or one line says what to install)
    if SCHEME.match(address.url).group(1) not in ("http", "https"):  # type: ignore[union-attr]
        return found
    import aiohttp
    import fsspec

    timeout = aiohttp.ClientTimeout(total=None, sock_connect=STREAM_TIMEOUT_S, sock_read=STREAM_TIMEOUT_S)
    return fsspec.core.url_to_fs(address.url, client_kwargs={"timeout": timeout})


def remote_stamp(text: str) -> tuple[int, int, int, int]:
    """What changes when the file at an address is replaced: its size and its ETag (or checksum), as the server
    gives them; the shape of ``trainer.data.artifact.file_stamp``."""
    address = Address.parse(text)
    filesystem, remote_path = _stream_filesystem(address)
    try:
        info = filesystem.info(remote_path)
    except FileNotFoundError:
        raise _not_found(address.url) from None
    except Exception as error:  # noqa: BLE001
        raise _unreachable(address.url, error) from None
    tag = next((str(info[k]) for k in ("ETag", "etag", "Content-MD5", "Digest", "LastModified") if info.get(k)), "")
    return 0, 0, int(info.get("size") or 0), zlib.crc32(tag.encode())


_streamed: weakref.WeakSet[h5py.File] = weakref.WeakSet()


@atexit.register
def _close_streamed() -> None:
    """HDF5 crashes at interpreter exit on a file still open over a Python file object: close them first."""
    for handle in list(_streamed):
        handle.close()


def open_h5(location: str | Path, **options: Any) -> h5py.File:
    """An artifact opened read-only: a local file, or an address read in place by range requests (this process's
    own handle: each DataLoader worker opens its own). ``options`` go to ``h5py.File``."""
    if not is_address(str(location)):
        return h5py.File(location, "r", **options)
    address = Address.parse(str(location))
    filesystem, remote_path = _stream_filesystem(address)
    try:
        handle = StreamedFile(filesystem.open(remote_path, "rb", block_size=STREAM_BLOCK, cache_type="blockcache",
                                              cache_options={"maxblocks": STREAM_BLOCKS_KEPT}), address.url)
    except FileNotFoundError:
        raise _not_found(address.url) from None
    except Exception as error:  # noqa: BLE001
        raise _unreachable(address.url, error) from None
    try:
        opened = h5py.File(handle, "r", **options)
    except RemoteError:
        handle.close()
        raise
    except OSError as error:
        handle.close()
        raise RemoteError(f"{address.url}: not an HDF5 file ({_reason(error)}); check the address") from None
    _streamed.add(opened)
    return opened


def stream_failure(url: str, error: BaseException) -> RemoteError:
    """A streamed read that failed (no range support, a dropped connection, a timeout, a server gone): one line."""
    if "range requests" in str(error).lower():  # fsspec: "The HTTP server doesn't appear to support range requests"
        return RemoteError(f"{url}: the server does not answer range requests, which --stream needs; drop --stream "
                           "to fetch the file once")
    return RemoteError(f"{url}: a read failed ({_reason(error)}); the connection dropped or timed out: run again "
                       "(fit --resume RUN continues a run), or drop --stream to fetch the file once")


class StreamedFile(io.RawIOBase):
    """The remote file h5py reads (fsspec's, by range requests), with whatever the protocol raises said as one line
    (``stream_failure``): h5py hands a file object's exception on as it is, wherever the read happened."""

    def __init__(self, handle: Any, url: str) -> None:
        super().__init__()
        self._handle, self.url = handle, url

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._call(self._handle.seek, offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readinto(self, buffer: Any) -> int:
        data = self._call(self._handle.read, len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def close(self) -> None:
        self._handle.close()
        super().close()

    def _call(self, method: Any, *args: Any) -> Any:
        try:
            return method(*args)
        except Exception as error:  # noqa: BLE001  (aiohttp's, fsspec's, a socket's: one line)
            raise stream_failure(self.url, error) from None


def stream_option(command: Any) -> Any:
    """``--stream``: DATA given as an address is read in place instead of fetched (eager, so that DATA's conversion
    knows; kept in ``ctx.meta``, not handed to the command)."""
    def remember(ctx: click.Context, param: click.Parameter, value: bool) -> bool:
        if value:
            ctx.meta[STREAM_KEY] = True
        return value

    return click.option("--stream", is_flag=True, is_eager=True, expose_value=False, callback=remember,
                        help="With DATA given as an address: read it in place by range requests (each DataLoader "
                             "worker its own connection) instead of fetching it once into the cache, for a file "
                             "larger than the disk. Chunks and metadata are checked by their HDF5 checksums as read; "
                             "the whole file is never hashed.")(command)


class ArtifactFile(click.ParamType):
    """A DATA argument: a local .h5 path, or an address fetched into the cache (the command gets the local path;
    ``pinned`` maps it back to the address, for runs to record), or with ``--stream`` the address itself, pinned to
    its SHA-256 (``stream_address``)."""

    name = "FILE_OR_URL"
    #: local copy -> the address it was fetched from, pinned to its SHA-256 (per process: the command's arguments).
    pinned: dict[Path, str] = {}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Path | str:
        if isinstance(value, Path) or not is_address(value):
            return Path(value)
        if ctx is not None and ctx.meta.get(STREAM_KEY):
            return stream_address(value)  # the address itself, pinned: read in place
        local, pinned = local_copy(value)
        ArtifactFile.pinned[local] = pinned
        return local


def address_of(path: Path | str) -> str | None:
    """The address DATA came from (pinned to its SHA-256): a streamed address itself, or the address a local copy
    was fetched from in this process; else None."""
    if is_address(str(path)):
        return str(path)
    return ArtifactFile.pinned.get(Path(path))


def run_data(data: str, address: str | None) -> str:
    """A run's artifact: the local file it recorded, the address it streamed from (streamed again), else its
    recorded address fetched again (another machine, a cleared cache), checked against the SHA-256 the run recorded
    with it."""
    if address is None or is_address(data) or Path(data).is_file():
        return data
    return str(local_copy(address)[0])

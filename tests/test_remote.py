"""Artifacts by address (builder.remote) against a local HTTP server the tests start: the same results as the local
file, one download per file, a damaged cache entry fetched again, every fault one line leaving nothing behind; and
streamed (--stream): the same run read in place by range requests, nothing downloaded.

Code paths: http:// goes through fsspec's HTTPFileSystem (aiohttp), as https:// does; memory:// through fsspec's
generic filesystem interface, the path s3:// (s3fs) and hf:// (huggingface_hub) take; those two need the network
and are not exercised here."""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from ranged_server import Server, serving

from conftest import FAST, builder_cli, one_error_line, trainer_cli, writable_copy


@pytest.fixture(scope="module")
def server(small_artifact: Path) -> Iterator[Server]:
    data = small_artifact.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    with serving({"small.h5": data, "small.h5.sha256": f"{sha256}  small.h5\n".encode(), "cut.h5": data,
                  "nosidecar.h5": data, "bad.h5": data, "bad.h5.sha256": b"not a digest\n", "noranges.h5": data,
                  "stalls.h5": data}) as state:
        state.truncated.add("cut.h5")
        state.no_ranges.add("noranges.h5")
        yield state


#: The tiny run every run by address is held to (weights and metrics to the digit).
FIT = ["-m", "t1n", *FAST, "--epochs", "1", "--max-steps", "2", "--keep-last"]


@pytest.fixture(scope="module")
def local_run(small_artifact: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``FIT`` on the local file, once; read-only (``writable_copy`` to write into it)."""
    out = tmp_path_factory.mktemp("local")
    result = trainer_cli("fit", small_artifact, *FIT, "--out", out)
    assert result.exit_code == 0, result.output
    return next(out.iterdir())


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv("BRATS2D_CACHE", str(folder))
    return folder


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def test_info_fit_and_evaluate_from_an_address_equal_the_local_file(server: Server, small_artifact: Path,
                                                                    local_run: Path, cache: Path,
                                                                    tmp_path: Path) -> None:
    address = server.address("small.h5", _sha256(small_artifact))
    remote, local = builder_cli("info", address), builder_cli("info", small_artifact)
    assert remote.exit_code == 0 and local.exit_code == 0, remote.output
    assert remote.output.splitlines()[1:] == local.output.splitlines()[1:]  # all but the first line, the path
    result = trainer_cli("fit", address, *FIT, "--out", tmp_path / "remote")
    assert result.exit_code == 0, result.output
    runs = {"remote": next((tmp_path / "remote").iterdir()), "local": writable_copy(local_run, tmp_path)}
    weights = {k: torch.load(r / "best.pt", weights_only=True)["model"] for k, r in runs.items()}
    assert weights["remote"].keys() == weights["local"].keys()
    assert all(torch.equal(weights["remote"][k], weights["local"][k]) for k in weights["local"])
    columns = [c for c in csv.DictReader(open(runs["local"] / "metrics.csv")).fieldnames or [] if "loss" in c
               or "dice" in c]
    rows = {k: list(csv.DictReader(open(r / "metrics.csv"))) for k, r in runs.items()}
    assert [[r[c] for c in columns] for r in rows["remote"]] == [[r[c] for c in columns] for r in rows["local"]]
    config = json.loads((runs["remote"] / "config.json").read_text())
    assert config["data_url"] == address and config["data_sha256"] == _sha256(small_artifact)
    assert server.gets["small.h5"] == 1
    shutil.rmtree(cache)  # another machine, or a cleared cache: the run fetches its file again from its address
    result = trainer_cli("evaluate", runs["remote"], "--device", "cpu")
    assert result.exit_code == 0, result.output
    assert server.gets["small.h5"] == 2 and len(_files(cache)) == 2  # the file and its verified stamp
    result = trainer_cli("evaluate", runs["local"], "--device", "cpu", "--data", address)  # the same file by address
    assert result.exit_code == 0, result.output
    assert server.gets["small.h5"] == 2


def test_the_cache_is_reused_and_a_damaged_entry_is_fetched_again(server: Server, small_artifact: Path,
                                                                  cache: Path) -> None:
    before = server.gets["small.h5"]
    address = server.address("small.h5")  # no #sha256: the publisher's sidecar small.h5.sha256 gives it
    for _ in range(2):
        assert builder_cli("info", address).exit_code == 0
    assert server.gets["small.h5"] == before + 1
    entry = next(p for p in _files(cache) if p.suffix == ".h5")
    data = bytearray(entry.read_bytes())
    data[len(data) // 2] ^= 0xFF
    entry.write_bytes(bytes(data))
    result = builder_cli("verify", address)
    assert result.exit_code == 0, result.output
    assert "fetching" in result.output and server.gets["small.h5"] == before + 2
    assert _sha256(entry) == _sha256(small_artifact)


def test_any_fsspec_address_is_read_through_its_filesystem(small_artifact: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """memory:// goes through fsspec's generic interface (the path of s3:// and hf://)."""
    import fsspec

    monkeypatch.setenv("BRATS2D_CACHE", str(tmp_path / "cache"))
    fsspec.filesystem("memory").pipe("/bucket/small.h5", small_artifact.read_bytes())
    result = builder_cli("info", f"memory://bucket/small.h5#sha256={_sha256(small_artifact)}")
    assert result.exit_code == 0, result.output
    assert f"sha256: {_sha256(small_artifact)}" in result.output


@pytest.mark.parametrize(("name", "fragment", "said"), [
    ("missing.h5", "ok", "not found there"),
    ("cut.h5", "ok", "could not be fetched"),
    ("small.h5", "wrong", "the address says"),
    ("nosidecar.h5", None, "no SHA-256 to check it against"),
    ("bad.h5", None, "not a SHA-256"),
    ("small.h5", "md5", "must be sha256="),
    ("unreachable", "ok", "could not be fetched"),
])
def test_each_fault_is_one_line_and_leaves_nothing(server: Server, small_artifact: Path, cache: Path, name: str,
                                                   fragment: str | None, said: str) -> None:
    sha256 = {"ok": _sha256(small_artifact), "wrong": "0" * 64, None: None, "md5": None}[fragment]
    address = server.address(name, sha256)
    if fragment == "md5":
        address += "#md5=0123"
    if name == "unreachable":
        with socket.socket() as probe:  # a port nothing listens on
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        address = f"http://127.0.0.1:{port}/small.h5#sha256={sha256}"
    for result in (builder_cli("info", address), trainer_cli("fit", address, "-m", "t1n", "--out", cache.parent)):
        line = one_error_line(result)
        assert result.exit_code == 1 and said in line and address.split("#")[0] in line, result.output
    assert _files(cache) == []


def test_a_published_folder_is_what_an_address_needs(server: Server, small_artifact: Path, cache: Path,
                                                      tmp_path: Path) -> None:
    """publish: the file, its sidecar, a card whose YAML header the Hub reads and whose split table equals the
    file's, and the data-use terms; served as it is, its address needs no #sha256; a second publish is refused."""
    import h5py
    import yaml

    folder = tmp_path / "published"
    result = builder_cli("publish", small_artifact, folder, "--repository", "lab/brats-small")
    assert result.exit_code == 0, result.output
    assert {p.name for p in folder.iterdir()} == {"small.h5", "small.h5.sha256", "README.md", "DATA_USE.md"}
    assert (folder / "small.h5").read_bytes() == small_artifact.read_bytes()
    card = (folder / "README.md").read_text()
    header = yaml.safe_load(card.split("---\n")[1])
    assert header["license"] == "other" and "brats" in header["tags"] and header["size_categories"] == ["n<1K"]
    assert _sha256(small_artifact) in card and "hf://datasets/lab/brats-small@main/small.h5" in card
    with h5py.File(small_artifact) as f:
        ids = f["case_id"].asstr()[()]
        for split in ("train", "val", "test"):
            rows = f["split"][split][()]
            patients = len({str(c).rsplit("-", 1)[0] for c in ids[rows]})  # BraTS-GLI-00000-000: patient 00000
            assert f"| {split} | {rows.size} | {patients} |" in card
    for path in folder.iterdir():
        server.files[f"published/{path.name}"] = path.read_bytes()
    result = builder_cli("info", server.address("published/small.h5"))
    assert result.exit_code == 0 and f"sha256: {_sha256(small_artifact)}" in result.output, result.output
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "already there" in one_error_line(builder_cli("publish", small_artifact, folder))
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    broken = tmp_path / "broken.h5"
    broken.write_bytes(small_artifact.read_bytes()[:4096])
    assert "broken.h5" in one_error_line(builder_cli("publish", broken, tmp_path / "never"))
    assert not (tmp_path / "never").exists()


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / "best.pt", weights_only=True)["model"]


def test_a_streamed_run_equals_the_local_one_and_downloads_nothing(server: Server, small_artifact: Path,
                                                                   local_run: Path, cache: Path,
                                                                   tmp_path: Path) -> None:
    """fit --stream with two DataLoader workers (each its own connection) trains the same weights as the local file
    with none; its run records the address, and evaluate and --resume stream it again; nothing enters the cache."""
    address = server.address("small.h5", _sha256(small_artifact))
    before = server.gets["small.h5"]
    streamed = trainer_cli("fit", address, "--stream", *FIT, "--workers", "2", "--out", tmp_path / "streamed")
    assert streamed.exit_code == 0, streamed.output
    runs = {"local": local_run, "streamed": next((tmp_path / "streamed").iterdir())}
    assert all(torch.equal(_weights(runs["streamed"])[k], v) for k, v in _weights(runs["local"]).items())
    assert server.gets["small.h5"] - before > 3  # range requests, from the main process and both workers
    config = json.loads((runs["streamed"] / "config.json").read_text())
    assert config["data"] == config["data_url"] == address and config["data_sha256"] == _sha256(small_artifact)
    evaluated = trainer_cli("evaluate", runs["streamed"], "--device", "cpu")
    assert evaluated.exit_code == 0, evaluated.output
    resumed = trainer_cli("fit", "--resume", runs["streamed"], "--epochs", "2", "--workers", "0")
    assert resumed.exit_code == 0, resumed.output
    assert _files(cache) == []


@pytest.mark.parametrize(("fault", "said"), [("noranges.h5", "does not answer range requests"),
                                             ("cut.h5", "drop --stream")])
def test_each_streaming_fault_is_one_line(server: Server, small_artifact: Path, cache: Path, tmp_path: Path,
                                          fault: str, said: str) -> None:
    """A server without range support and a body cut short each end the run in one line naming the address, and
    nothing enters the cache."""
    address = server.address(fault, _sha256(small_artifact))
    result = trainer_cli("fit", address, "--stream", "-m", "t1n", *FAST, "--epochs", "1", "--out", tmp_path / "runs")
    line = one_error_line(result)
    assert said in line and address.split("#")[0] in line, result.output
    assert _files(cache) == []


def test_a_read_that_stalls_mid_epoch_is_one_line(server: Server, small_artifact: Path, cache: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A run that reads in 64 KiB blocks is counted once whole; then the same run meets a server that stops
    answering half-way through those requests (the file long opened, training under way) and, its wait cut to a
    second here (60 s by default), ends in one line; the run folder keeps the epochs it finished."""
    import builder.remote

    monkeypatch.setattr(builder.remote, "STREAM_BLOCK", 64 << 10)
    monkeypatch.setattr(builder.remote, "STREAM_TIMEOUT_S", 1.0)
    address = server.address("stalls.h5", _sha256(small_artifact))
    args = ["fit", address, "--stream", "-m", "t1n", *FAST, "--epochs", "2"]
    before = server.gets["stalls.h5"]
    assert trainer_cli(*args, "--out", tmp_path / "whole").exit_code == 0
    whole = server.gets["stalls.h5"] - before
    assert whole > 20  # requests all along the run, not just to open it
    server.stall, server.stalled["stalls.h5"] = 3.0, server.gets["stalls.h5"] + whole // 2
    line = one_error_line(trainer_cli(*args, "--out", tmp_path / "stalled"))
    assert "a read failed" in line and "timed out" in line and address.split("#")[0] in line
    assert _files(cache) == []

"""Fetching models over real HTTP: a server on 127.0.0.1 started by the test, never a mocked client.

Covers success (archive and card + weights), resume after a cut transfer, checksum rejection,
server errors, a refused connection, cancel, and archives that try to write outside the cache.
"""

from __future__ import annotations

import hashlib
import io
import socket
import tarfile
import zipfile
from pathlib import Path

import pytest
from deepmri.errors import Cancelled, FetchError
from deepmri.models import ModelStore
from deepmri.models.fetch import DOWNLOADS_DIR, fetch_model
from deepmri.progress import CancelToken
from deepmri.settings import Settings
from models_fixtures import loopback_server, make_model


def zip_model(folder: Path, inside: str = "") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for item in sorted(folder.iterdir()):
            archive.write(item, f"{inside}{item.name}")
    return buffer.getvalue()


@pytest.fixture
def model_zip(tmp_path: Path) -> tuple[bytes, str]:
    """A real model (fp16 safetensors, ~7 kB) zipped inside a top folder, and its sha256."""
    model = make_model(tmp_path / "source" / "fetched-net", "fetched-net")
    data = zip_model(model.path, inside="fetched-net/")
    return data, hashlib.sha256(data).hexdigest()


def partial_files(cache: Path) -> list[Path]:
    return sorted((cache / DOWNLOADS_DIR).glob("*.partial"))


def test_fetch_archive_installs_a_verified_model_with_progress(tmp_path, model_zip):
    data, digest = model_zip
    cache = tmp_path / "home" / "models"
    reports = []
    with loopback_server() as server:
        server.files["/fetched-net.zip"] = data
        model = fetch_model(
            server.url("fetched-net.zip"),
            cache,
            sha256=digest,
            progress=lambda fraction, message: reports.append((fraction, message)),
        )
    assert model.path == cache / "fetched-net"
    assert model.card.id == "fetched-net"
    model.load_network()  # verifies size and sha256 of the weights against the card
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("Downloading" in message for _, message in reports)
    assert partial_files(cache) == []
    assert [p.name for p in cache.iterdir() if p.name.startswith(".staging")] == []
    store = ModelStore(Settings(home=tmp_path / "home"))
    assert "fetched-net" in [info.id for info in store.list()]


def test_fetch_card_url_downloads_the_weights_beside_it(tmp_path):
    model = make_model(tmp_path / "source", "card-net")
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/models/card-net/card.json"] = (model.path / "card.json").read_bytes()
        server.files["/models/card-net/weights.safetensors"] = model.weights_path.read_bytes()
        fetched = fetch_model(server.url("models/card-net/card.json"), cache)
        paths = [request["path"] for request in server.requests]
    assert paths == ["/models/card-net/card.json", "/models/card-net/weights.safetensors"]
    assert fetched.card.to_dict() == model.card.to_dict()
    fetched.load_network()


def test_a_cut_transfer_keeps_the_partial_file_and_the_next_fetch_resumes(tmp_path, model_zip):
    data, digest = model_zip
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/net.zip"] = data
        server.fail_next("net.zip", "truncate")
        with pytest.raises(FetchError, match="resume"):
            fetch_model(server.url("net.zip"), cache, sha256=digest, retries=0)
        [partial] = partial_files(cache)
        kept = partial.stat().st_size
        assert 0 < kept < len(data)
        model = fetch_model(server.url("net.zip"), cache, sha256=digest, retries=0)
        assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert model.card.id == "fetched-net"
    assert partial_files(cache) == []


def test_one_fetch_survives_a_cut_transfer_and_a_server_error_by_resuming(tmp_path, model_zip):
    data, digest = model_zip
    with loopback_server() as server:
        server.files["/net.zip"] = data
        server.fail_next("net.zip", "truncate", "error")
        model = fetch_model(
            server.url("net.zip"), tmp_path / "cache", sha256=digest, retries=2, backoff=0.0
        )
        ranges = [request["range"] for request in server.requests]
    assert model.card.id == "fetched-net"
    assert ranges[0] is None and ranges[1] is not None and ranges[2] == ranges[1]


def test_a_server_error_is_reported_and_leaves_nothing_installed(tmp_path, model_zip):
    data, digest = model_zip
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/net.zip"] = data
        server.fail_next("net.zip", "error")
        with pytest.raises(FetchError, match="500"):
            fetch_model(server.url("net.zip"), cache, sha256=digest, retries=0)
        assert not (cache / "fetched-net").exists()
        model = fetch_model(server.url("net.zip"), cache, sha256=digest, retries=0)
    assert model.path == cache / "fetched-net"


def test_a_wrong_checksum_deletes_the_download_and_says_so(tmp_path, model_zip):
    data, _ = model_zip
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/net.zip"] = data
        with pytest.raises(FetchError, match="sha256.*deleted"):
            fetch_model(server.url("net.zip"), cache, sha256="ab" * 32)
    assert partial_files(cache) == []
    assert list((cache / DOWNLOADS_DIR).iterdir()) == []
    assert not (cache / "fetched-net").exists()


def test_weights_that_do_not_match_the_fetched_card_are_deleted(tmp_path):
    model = make_model(tmp_path / "source", "card-net")
    other = make_model(tmp_path / "other", "card-net", seed=1)
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/card.json"] = (model.path / "card.json").read_bytes()
        server.files["/weights.safetensors"] = other.weights_path.read_bytes()
        with pytest.raises(FetchError, match="deleted"):
            fetch_model(server.url("card.json"), cache)
    assert not (cache / "card-net").exists()
    assert partial_files(cache) == []


def test_a_server_that_ignores_range_restarts_from_zero(tmp_path, model_zip):
    data, digest = model_zip
    with loopback_server() as server:
        server.files["/net.zip"] = data
        server.fail_next("net.zip", "truncate", "ignore-range")
        model = fetch_model(
            server.url("net.zip"), tmp_path / "cache", sha256=digest, retries=1, backoff=0.0
        )
    assert model.card.id == "fetched-net"


def test_a_file_changed_on_the_server_is_downloaded_again_not_spliced(tmp_path, model_zip):
    data, _ = model_zip
    newer = make_model(tmp_path / "newer" / "fetched-net", "fetched-net", seed=5)
    newer_zip = zip_model(newer.path, inside="fetched-net/")
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/net.zip"] = data
        server.fail_next("net.zip", "truncate")
        with pytest.raises(FetchError, match="resume"):
            fetch_model(server.url("net.zip"), cache, retries=0)
        server.files["/net.zip"] = newer_zip  # a new release under the same address
        model = fetch_model(
            server.url("net.zip"), cache, sha256=hashlib.sha256(newer_zip).hexdigest()
        )
        last = server.requests[-1]
    assert last["range"] is not None and last["status"] == 200  # If-Range: sent whole
    assert model.card.weights["sha256"] == newer.card.weights["sha256"]


def test_missing_file_is_a_clear_error_without_retries(tmp_path):
    with loopback_server() as server:
        with pytest.raises(FetchError, match="404.*Check the address"):
            fetch_model(server.url("nothing.zip"), tmp_path / "cache", retries=3)
        assert len(server.requests) == 1


def test_an_unreachable_server_is_a_clear_error(tmp_path):
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(FetchError, match="refused the connection"):
        fetch_model(f"http://127.0.0.1:{port}/net.zip", tmp_path / "cache")


def test_cancel_keeps_the_partial_download_for_a_later_resume(tmp_path):
    model = make_model(tmp_path / "source" / "big-net", "big-net")
    (model.path / "notes.txt").write_bytes(bytes(range(256)) * 1200)  # several chunks long
    data = zip_model(model.path)
    digest = hashlib.sha256(data).hexdigest()
    cache = tmp_path / "cache"
    token = CancelToken()
    with loopback_server() as server:
        server.files["/net.zip"] = data
        with pytest.raises(Cancelled):
            fetch_model(
                server.url("net.zip"),
                cache,
                sha256=digest,
                progress=lambda fraction, message: token.cancel(),
                cancel=token,
            )
        [partial] = partial_files(cache)
        kept = partial.stat().st_size
        assert 0 < kept < len(data)
        fetched = fetch_model(server.url("net.zip"), cache, sha256=digest)
        assert server.requests[-1]["range"] == f"bytes={kept}-"
    assert fetched.card.id == "big-net"


def test_fetching_the_same_model_again_keeps_it_and_a_different_one_needs_force(tmp_path):
    first = make_model(tmp_path / "a" / "same-id", "same-id", seed=0)
    second = make_model(tmp_path / "b" / "same-id", "same-id", seed=1)
    cache = tmp_path / "cache"
    with loopback_server() as server:
        server.files["/a.zip"] = zip_model(first.path)
        server.files["/b.zip"] = zip_model(second.path)
        fetch_model(server.url("a.zip"), cache)
        assert fetch_model(server.url("a.zip"), cache).path == cache / "same-id"
        with pytest.raises(FetchError, match="already in the cache"):
            fetch_model(server.url("b.zip"), cache)
        replaced = fetch_model(server.url("b.zip"), cache, force=True)
    assert replaced.card.weights["sha256"] == second.card.weights["sha256"]


@pytest.mark.parametrize("member", ["../escape/card.json", "/abs/card.json"])
def test_archives_with_paths_outside_the_cache_are_refused(tmp_path, member):
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        info = tarfile.TarInfo(member)
        info.size = 2
        archive.addfile(info, io.BytesIO(b"{}"))
    with loopback_server() as server:
        server.files["/evil.tar.gz"] = buffer.getvalue()
        with pytest.raises(FetchError, match="unsafe path"):
            fetch_model(server.url("evil.tar.gz"), tmp_path / "cache")
    assert not (tmp_path / "escape").exists()


def test_a_url_of_unknown_kind_is_refused_before_downloading(tmp_path):
    with pytest.raises(FetchError, match=r"\.zip.*\.json"):
        fetch_model("http://127.0.0.1:9/model.bin", tmp_path / "cache")

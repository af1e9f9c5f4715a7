"""Downloading models into the user's cache: resumable, checksum-verified, installed atomically.

A URL names either a model archive (`.zip`, `.tar.gz`/`.tgz` holding `card.json` and the weights)
or a `card.json` whose weights are fetched from `weights.url` or from beside the card.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import shutil
import socket
import tarfile
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

from deepmri.errors import CardError, FetchError
from deepmri.io import new_file_mode
from deepmri.models.card import CARD_FILE, ModelCard, sha256_of
from deepmri.models.model import Model
from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress, sub_progress

DOWNLOADS_DIR = ".downloads"
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
_CHUNK = 1 << 16
_USER_AGENT = "deepmri-model-fetch"


def fetch_model(
    url: str,
    cache: str | os.PathLike,
    *,
    sha256: str | None = None,
    model_id: str | None = None,
    force: bool = False,
    retries: int = 2,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> Model:
    """Download the model at `url` into `cache/<id>` and return it, verified.

    `sha256` is the checksum of the file the URL names (archive or card), as published by the
    model's authors. Interrupted downloads leave a `.partial` file that the next call resumes with
    an HTTP Range request; a checksum mismatch deletes it. An identical model already installed is
    returned as is; a different one with the same id is replaced only with `force=True`.
    `model_id` installs the model under that id instead of the one its card gives.

    Examples:
        >>> fetch_model("https://example.org/brain.zip", "~/.deepmri/models")  # doctest: +SKIP
    """
    progress = progress or no_progress
    cache = Path(cache).expanduser()
    downloads = cache / DOWNLOADS_DIR
    downloads.mkdir(parents=True, exist_ok=True)
    name = _file_name(url)
    options = {"retries": retries, "backoff": backoff, "timeout": timeout, "cancel": cancel}
    if name.lower().endswith(ARCHIVE_SUFFIXES):
        archive = download(
            url,
            downloads / _download_name(url),
            sha256=sha256,
            progress=sub_progress(progress, 0.0, 0.9),
            **options,
        )
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
        try:
            folder = _extract_model(archive, staging)
            model = install_model_folder(folder, cache, force, model_id)
        finally:  # a finished archive is never resumed: keep no stale copy after a failure
            shutil.rmtree(staging, ignore_errors=True)
            archive.unlink(missing_ok=True)
    elif name.lower().endswith(".json"):
        model = _fetch_card_and_weights(
            url, cache, downloads, sha256, force, progress, options, model_id
        )
    else:
        raise FetchError(
            f"Cannot tell what {url} is: a model URL must end in .zip, .tar.gz, .tgz or .tar "
            "(a model archive) or .json (its card.json, with the weights beside it)."
        )
    progress(1.0, f"Model '{model.card.id}' installed in {model.path}")
    return model


def download(
    url: str,
    destination: str | os.PathLike,
    *,
    sha256: str | None = None,
    expected_size: int | None = None,
    retries: int = 2,
    backoff: float = 1.0,
    timeout: float = 30.0,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> Path:
    """Download `url` to `destination`, resuming `destination.partial`, then verify and rename.

    Server errors (5xx) and cut transfers are retried `retries` times, resuming each time; the
    FetchError after the last try says the next call resumes. Client errors (404...) are not
    retried. On a size or sha256 mismatch the partial file is deleted and the error says so.
    """
    progress = progress or no_progress
    destination = Path(destination)
    partial = destination.with_name(destination.name + ".partial")
    attempt = 0
    while True:
        try:
            _transfer(url, partial, timeout, progress, cancel)
            break
        except _Retryable as error:
            attempt += 1
            if attempt > retries:
                kept = partial.stat().st_size if partial.exists() else 0
                raise FetchError(
                    f"Download of {url} failed: {error}. "
                    + (
                        f"{kept} bytes were kept; run the same fetch again to resume."
                        if kept
                        else "Try again later."
                    )
                ) from None
            progress(0.0, f"{error}; retrying ({attempt} of {retries})")
            time.sleep(backoff * attempt)
    partial.with_name(partial.name + ".validator").unlink(missing_ok=True)
    _verify_download(url, partial, sha256, expected_size)
    partial.replace(destination)
    return destination


class _Retryable(Exception):
    """A failure worth another try: a server error or a transfer cut short."""


def _transfer(
    url: str,
    partial: Path,
    timeout: float,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> None:
    """One HTTP request that appends to `partial` from where it stops."""
    check_cancel(cancel)
    have = partial.stat().st_size if partial.exists() else 0
    validator_file = partial.with_name(partial.name + ".validator")
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    if have:
        request.add_header("Range", f"bytes={have}-")
        if validator_file.exists():  # resume only if the server's file is still the same one
            request.add_header("If-Range", validator_file.read_text(encoding="utf-8"))
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        if error.code == 416 and have:
            return  # the partial file is already complete; the checksum decides
        if error.code >= 500:
            raise _Retryable(f"the server answered {error.code} {error.reason}") from None
        raise FetchError(
            f"Download of {url} failed: the server answered {error.code} {error.reason}. "
            "Check the address."
        ) from None
    except (urllib.error.URLError, OSError) as error:
        raise FetchError(_unreachable_message(url, error)) from None
    with response:
        if have and response.status == 206:
            start = _range_start(response.headers.get("Content-Range", ""))
            if start != have:  # cannot append safely: drop the partial file, try again whole
                partial.unlink()
                raise _Retryable(f"the server resumed at byte {start}, not {have}")
            mode = "ab"
        else:
            have, mode = 0, "wb"  # the server ignored the Range, or its file changed: start over
            validator = response.headers.get("ETag") or response.headers.get("Last-Modified")
            if validator:
                validator_file.write_text(validator, encoding="utf-8")
            else:
                validator_file.unlink(missing_ok=True)
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        received = _copy(response, partial, mode, have, total, url, progress, cancel)
    if total is not None and received < total:
        raise _Retryable(f"the transfer stopped after {received} of {total} bytes")


def _copy(
    response: Any,
    partial: Path,
    mode: str,
    have: int,
    total: int | None,
    url: str,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> int:
    """Append the body to `partial`; a cut connection is retryable, the bytes so far are kept."""
    received = have
    name = _file_name(url)
    with open(partial, mode) as handle:
        while True:
            check_cancel(cancel)
            try:
                chunk = response.read(_CHUNK)
            except (TimeoutError, http.client.IncompleteRead, ConnectionError) as error:
                handle.flush()
                raise _Retryable(
                    f"the transfer stopped after {received} bytes ({type(error).__name__})"
                ) from None
            if not chunk:
                return received
            handle.write(chunk)
            received += len(chunk)
            if total:
                progress(received / total, f"Downloading {name}: {_megabytes(received, total)}")
            else:
                progress(0.0, f"Downloading {name}: {received / 1e6:.1f} MB")


def _verify_download(
    url: str, partial: Path, sha256: str | None, expected_size: int | None
) -> None:
    if not partial.exists():
        raise FetchError(f"Download of {url} produced no file.")
    size = partial.stat().st_size
    if expected_size is not None and size != expected_size:
        partial.unlink()
        raise FetchError(
            f"Download of {url} is {size} bytes but should be {expected_size}; the partial file "
            "was deleted. Fetch again; if it happens again the server holds a different file."
        )
    if sha256:
        actual = sha256_of(partial)
        if actual != sha256.strip().lower():
            partial.unlink()
            raise FetchError(
                f"Download of {url} has sha256 {actual}, not the expected {sha256.strip().lower()}; "
                "the downloaded file was deleted. Check the checksum you were given, or the "
                "server sent a different (or tampered) file."
            )


def _fetch_card_and_weights(
    url: str,
    cache: Path,
    downloads: Path,
    sha256: str | None,
    force: bool,
    progress: ProgressCallback,
    options: dict[str, Any],
    model_id: str | None = None,
) -> Model:
    card_path = download(url, downloads / _download_name(url), sha256=sha256, **options)
    try:
        card = ModelCard.from_file(card_path)
    except CardError as error:
        card_path.unlink(missing_ok=True)
        raise FetchError(f"The card at {url} is not a valid model card: {error}") from None
    weights_url = card.weights.get("url") or urllib.parse.urljoin(url, card.weights["file"])
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=cache))
    try:
        weights = download(
            weights_url,
            downloads / _download_name(weights_url),
            sha256=card.weights["sha256"],
            expected_size=card.weights["size"],
            progress=sub_progress(progress, 0.0, 0.9),
            **options,
        )
        shutil.move(str(weights), staging / card.weights["file"])
        shutil.move(str(card_path), staging / CARD_FILE)
        return install_model_folder(staging, cache, force, model_id)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract_model(archive: Path, staging: Path) -> Path:
    """Unpack a model archive and find its model folder (the shallowest card.json)."""
    unpacked = staging / "unpacked"
    extract_archive(archive, unpacked)
    cards = sorted(unpacked.rglob(CARD_FILE), key=lambda path: len(path.parts))
    if not cards:
        raise FetchError(
            f"{archive.name} holds no {CARD_FILE}; a model archive holds a model folder "
            f"({CARD_FILE} and its weights)."
        )
    return cards[0].parent


def extract_archive(archive: str | os.PathLike, destination: str | os.PathLike) -> Path:
    """Unpack a .zip or .tar(.gz) refusing absolute paths, '..' and links (no writes outside)."""
    archive, destination = Path(archive), Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as bundle:
                for member in bundle.infolist():
                    _check_member_name(member.filename, archive)
                bundle.extractall(destination)
        else:
            with tarfile.open(archive) as bundle:
                for member in bundle.getmembers():
                    _check_member_name(member.name, archive)
                    if not (member.isfile() or member.isdir()):
                        raise FetchError(
                            f"{archive.name} holds a link or device file ({member.name}); "
                            "model archives hold only plain files."
                        )
                if hasattr(tarfile, "data_filter"):  # Python >= 3.11.4: refuse what we missed
                    bundle.extractall(destination, filter="data")
                else:
                    bundle.extractall(destination)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError) as error:
        raise FetchError(f"{archive.name} is not a readable archive ({error}).") from None
    return destination


def _check_member_name(name: str, archive: Path) -> None:
    parts = Path(name).parts
    if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]):
        raise FetchError(f"{archive.name} holds an unsafe path ({name}); it was not unpacked.")


def install_model_folder(
    folder: Path, cache: Path, force: bool, model_id: str | None = None
) -> Model:
    """Verify the model in `folder`, then move it to `cache/<id>` in one rename."""
    try:
        model = Model(folder)
        if model_id and model.card.id != model_id:
            data = model.card.to_dict()
            data["id"] = model_id
            model = Model(folder, ModelCard.from_dict(data))
            model.card.save(folder / CARD_FILE)
    except CardError as error:
        raise FetchError(f"The model's card is invalid: {error}") from None
    model.verify()
    target = cache / model.card.id
    if (target / CARD_FILE).exists():
        existing = _existing_card(target)
        if (
            existing is not None
            and existing.get("weights", {}).get("sha256") == (model.card.weights["sha256"])
        ):
            return Model(target)
        if not force:
            raise FetchError(
                f"A different model '{model.card.id}' is already in the cache ({target}); remove "
                "it first, or fetch with force to replace it."
            )
    final = Path(tempfile.mkdtemp(prefix=f".{model.card.id}-", dir=cache))
    final.chmod(new_file_mode(directory=True))  # mkdtemp makes it private; a model is shared
    for item in folder.iterdir():
        shutil.move(str(item), final / item.name)
    if target.exists():
        retired = target.with_name(f".{target.name}.old-{os.getpid()}")
        target.rename(retired)
        final.rename(target)
        shutil.rmtree(retired, ignore_errors=True)
    else:
        final.rename(target)
    return Model(target)


def _existing_card(folder: Path) -> dict[str, Any] | None:
    try:
        return json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _unreachable_message(url: str, error: BaseException) -> str:
    reason = getattr(error, "reason", error)
    host = urllib.parse.urlsplit(url).hostname or url
    if isinstance(reason, socket.gaierror):
        return (
            f"Cannot look up {host}: this computer seems to be offline (or the address is wrong). "
            "Connect to the network and fetch again; an interrupted download resumes."
        )
    if isinstance(reason, ConnectionRefusedError):
        return f"{host} refused the connection ({url}); the server is down or the port is wrong."
    if isinstance(reason, TimeoutError):
        return f"{host} did not answer in time; check the network and fetch again to resume."
    return f"Cannot reach {host} ({reason}); check the network connection and the address."


def _range_start(content_range: str) -> int | None:
    match = re.match(r"bytes (\d+)-", content_range.strip())
    return int(match.group(1)) if match else None


def _file_name(url: str) -> str:
    return Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"


def _download_name(url: str) -> str:
    """A stable name per URL, so the next call finds (and resumes) the same partial file."""
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return f"{digest}-{_file_name(url)}"


def _megabytes(received: int, total: int) -> str:
    return f"{received / 1e6:.1f} of {total / 1e6:.1f} MB"

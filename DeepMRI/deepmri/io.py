"""Reading and writing images (NIfTI, NRRD, MHA, DICOM series) with geometry intact.

The public image type of DeepMRI is `SimpleITK.Image`; these helpers add clear errors and
atomic writes so that a failed run never leaves a half-written file behind.
"""

from __future__ import annotations

import gzip
import json
import os
import struct
import tempfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from deepmri.errors import ImageIOError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")


def _suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def read_image(path: str | os.PathLike) -> sitk.Image:
    """Read a NIfTI/NRRD/MHA file, or a DICOM series from a folder, as a SimpleITK image."""
    path = Path(path)
    if not path.exists():
        raise ImageIOError(f"The file or folder '{path}' does not exist.")
    try:
        if path.is_dir():
            return read_dicom_series(path)
        check_complete(path)
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageIOError(f"Could not read '{path}' as an image ({first_line}).") from error


def check_complete(path: str | os.PathLike) -> None:
    """Refuse a NIfTI file cut short (an interrupted copy or download) before it is read.

    ITK reads a truncated NIfTI without complaint and fills the missing voxels with zeros (NRRD
    and MetaImage readers fail by themselves). An uncompressed .nii must be as long as its header
    says (vox_offset + voxels x bytes per voxel); a .nii.gz must decompress to its end-of-stream
    marker and to that length.
    """
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in (".nii", ".nii.gz"):
        return
    cut_short = (
        f"'{path.name}' is damaged: the file ends before the image does (an interrupted copy or "
        "download?). Copy it again from its source."
    )
    if suffix == ".nii":
        with path.open("rb") as handle:
            expected = _nifti_length(handle.read(540))
        if expected is not None and path.stat().st_size < expected:
            raise ImageIOError(cut_short)
        return
    length = 0
    header = b""
    try:
        with gzip.open(path, "rb") as stream:
            while chunk := stream.read(1 << 20):
                if len(header) < 540:
                    header += chunk[: 540 - len(header)]
                length += len(chunk)
    except EOFError:
        raise ImageIOError(cut_short) from None
    except (OSError, zlib.error) as error:
        raise ImageIOError(f"Could not read '{path}' as an image ({error}).") from error
    expected = _nifti_length(header)
    if expected is not None and length < expected:
        raise ImageIOError(cut_short)


def _nifti_length(header: bytes) -> int | None:
    """Bytes a NIfTI-1 or NIfTI-2 single file (.nii) needs, from its header; None if not one."""
    for order in ("<", ">"):
        if len(header) >= 348 and struct.unpack(order + "i", header[:4])[0] == 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if len(header) >= 540 and struct.unpack(order + "i", header[:4])[0] == 540:
            dims = struct.unpack(order + "8q", header[16:80])
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    count = int(dims[0])
    if not 1 <= count <= 7 or bitpix <= 0:
        return None
    voxels = 1
    for size in dims[1 : count + 1]:
        voxels *= max(int(size), 1)
    return max(offset, 348) + voxels * bitpix // 8


def read_dicom_series(folder: str | os.PathLike) -> sitk.Image:
    """Read the first (largest) DICOM series in a folder, slices sorted by position."""
    folder = str(folder)
    series_ids = sitk.ImageSeriesReader.GetGDCMSeriesIDs(folder)
    if not series_ids:
        raise ImageIOError(f"No DICOM series found in '{folder}'.")
    files_per_series = [
        sitk.ImageSeriesReader.GetGDCMSeriesFileNames(folder, series_id) for series_id in series_ids
    ]
    files = max(files_per_series, key=len)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(files)
    return reader.Execute()


def check_image_path(path: str | os.PathLike) -> Path:
    """Refuse an output file name no image writer knows, before any work is done."""
    path = Path(path)
    if _suffix(path) not in IMAGE_SUFFIXES:
        raise ImageIOError(
            f"Cannot write '{path.name}': use one of {', '.join(IMAGE_SUFFIXES)} as the file ending."
        )
    return path


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write an image atomically: to a temporary file in the same folder, then renamed."""
    path = check_image_path(path)
    suffix = _suffix(path)
    return _write_with(path, suffix, lambda name: sitk.WriteImage(image, name, compress), "image")


TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """A temporary path beside `path` that replaces it only if the block finishes.

    The one atomic-write helper: a failed or interrupted write never leaves a half-written
    file under the final name. The file gets the permissions the user's umask gives a new
    file (mkstemp alone would leave it readable by its owner only).

    Examples:
        >>> import tempfile, pathlib
        >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
        >>> with atomic_path(target) as partial:
        ...     _ = partial.write_text("done")
        >>> target.read_text()
        'done'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, new_file_mode())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def _umask() -> int:
    """The process umask, read without changing it where the system allows (Linux).

    os.umask can only be read by setting it, and for that moment every file another thread
    creates (a download in the Slicer GUI, say) would be world-writable; /proc has it read-only.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    current = os.umask(0)
    os.umask(current)
    return current


def new_file_mode(directory: bool = False) -> int:
    """The mode the user's umask gives a new file (or folder): for temporaries made private by
    mkstemp/mkdtemp that become a user's results or models."""
    return (0o777 if directory else 0o666) & ~_umask()


def _write_with(path: Path, suffix: str, write: Callable[[str], Any], what: str) -> Path:
    try:
        with atomic_path(path, suffix) as partial:
            write(str(partial))
    except RuntimeError as error:
        raise ImageIOError(f"Could not write the {what} '{path}': {error}") from error
    return path


def write_json(data: Any, path: str | os.PathLike) -> Path:
    """Write JSON atomically (indented, UTF-8)."""
    path = Path(path)
    text = json.dumps(data, indent=2, default=str)
    return _write_with(path, ".json", lambda name: Path(name).write_text(text, "utf-8"), "file")


def check_transform_path(path: str | os.PathLike) -> Path:
    """Refuse a transform file name SimpleITK cannot write, before any work is done."""
    path = Path(path)
    if path.suffix.lower() not in TRANSFORM_SUFFIXES:
        raise ImageIOError(
            f"Cannot write the transform '{path.name}': use one of "
            f"{', '.join(TRANSFORM_SUFFIXES)} as the file ending."
        )
    return path


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write a SimpleITK transform (.h5 keeps displacement fields; .tfm/.txt for linear ones)."""
    path = check_transform_path(path)
    suffix = path.suffix.lower()
    return _write_with(path, suffix, lambda name: sitk.WriteTransform(transform, name), "transform")


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read a SimpleITK transform file, with a clear error if it is missing or damaged."""
    path = Path(path)
    if not path.is_file():
        raise ImageIOError(f"The transform file '{path}' does not exist.")
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise ImageIOError(f"Could not read '{path}' as a transform.") from error
    # A file holding one transform comes back wrapped in a composite; unwrap it.
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        if composite.GetNumberOfTransforms() == 1:
            return composite.GetNthTransform(0)
    return transform

"""Reading and writing images (NIfTI, NRRD, MHA, DICOM series) with geometry intact.

The public image type of DeepMRI is `SimpleITK.Image`; these helpers add clear errors and
atomic writes so that a failed run never leaves a half-written file behind.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else "unknown error"
        raise ImageIOError(f"Could not read '{path}' as an image ({first_line}).") from error


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


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    """Write an image atomically: to a temporary file in the same folder, then renamed."""
    path = Path(path)
    suffix = _suffix(path)
    if suffix not in IMAGE_SUFFIXES:
        raise ImageIOError(
            f"Cannot write '{path.name}': use one of {', '.join(IMAGE_SUFFIXES)} as the file ending."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=".partial-", suffix=suffix, dir=path.parent)
    os.close(handle)
    try:
        sitk.WriteImage(image, temporary, compress)
        os.replace(temporary, path)
    except RuntimeError as error:
        raise ImageIOError(f"Could not write '{path}': {error}") from error
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    return path

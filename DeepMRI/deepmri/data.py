"""Real MRI that can be had offline, from installed packages, with geometry intact.

Sources (licences and citations in Docs/data.md):
- MNI ICBM152 2009a symmetric T1 (skull-stripped) and GM/WM probability maps, shipped in `nilearn`.
- Colin27 whole head (`ch2`), its brain extraction (`ch2bet`) and atlases, from Debian `mricron-data`.
- The pydeface whole-head mean T1, from the `pydeface` wheel when it is unpacked somewhere known.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError
from deepmri.io import read_image

MRICRON_TEMPLATES = Path(os.environ.get("DEEPMRI_MRICRON_DIR", "/usr/share/mricron/templates"))
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}
COLIN_FILES = {
    "t1": "ch2.nii.gz",
    "brain": "ch2bet.nii.gz",
    "t1_0.5mm": "ch2better.nii.gz",
    "aal": "aal.nii.gz",
}


class SampleDataMissing(DeepMRIError):
    """A sample data set is not installed; the message says how to install it."""


def _nilearn_data_dir() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SampleDataMissing(
            "The MNI152 sample needs the 'nilearn' package: pip install nilearn"
        )
    return Path(spec.origin).parent / "datasets" / "data"


def mni152_path(kind: str = "t1") -> Path:
    """Path of the MNI ICBM152 2009a T1 ('t1') or GM/WM probability map ('gm', 'wm')."""
    if kind not in MNI_FILES:
        raise ValueError(f"kind must be one of {sorted(MNI_FILES)}, not {kind!r}")
    path = _nilearn_data_dir() / MNI_FILES[kind]
    if not path.exists():
        raise SampleDataMissing(f"{path} is missing; reinstall nilearn.")
    return path


def load_mni152(kind: str = "t1") -> sitk.Image:
    """The MNI ICBM152 2009a T1 (skull-stripped) or a GM/WM probability map (0-255)."""
    return read_image(mni152_path(kind))


def colin27_path(kind: str = "t1") -> Path:
    """Path of a Colin27 file ('t1' whole head, 'brain' extracted, 't1_0.5mm', 'aal')."""
    if kind not in COLIN_FILES:
        raise ValueError(f"kind must be one of {sorted(COLIN_FILES)}, not {kind!r}")
    path = MRICRON_TEMPLATES / COLIN_FILES[kind]
    if not path.exists():
        raise SampleDataMissing(
            f"Colin27 ({path}) is not installed; install it with: apt-get install -y mricron-data"
        )
    return path


def load_colin27(kind: str = "t1") -> sitk.Image:
    """Colin27 from Debian's mricron-data: held out, never used for training or tuning."""
    return read_image(colin27_path(kind))


def colin27_available() -> bool:
    return (MRICRON_TEMPLATES / COLIN_FILES["t1"]).exists()


def mni152_tissue_labels() -> sitk.Image:
    """Hard tissue labels on the MNI152 grid: 0 background, 1 CSF, 2 grey matter, 3 white matter.

    GM and WM are the template's probability maps; CSF is the rest of the non-zero (skull-stripped)
    T1. Each voxel takes the most probable class, so the three classes tile the brain exactly.
    """
    t1 = sitk.GetArrayFromImage(load_mni152("t1")).astype("float32")
    grey = sitk.GetArrayFromImage(load_mni152("gm")).astype("float32") / 255.0
    white = sitk.GetArrayFromImage(load_mni152("wm")).astype("float32") / 255.0
    inside = t1 > 0
    csf = (1.0 - grey - white).clip(0.0, 1.0)
    stacked = np.stack([csf, grey, white])
    labels = (np.argmax(stacked, axis=0) + 1).astype("uint8")
    labels[~inside] = 0
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(load_mni152("t1"))
    return image

"""Shared pytest fixtures: real sample MRI from packages, and small images with oblique geometry."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from deepmri import data

# Two cores on CI: keep torch from oversubscribing them (and from fighting other processes).
torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


@pytest.fixture(scope="session")
def mni_t1() -> sitk.Image:
    """The real MNI ICBM152 2009a T1 (skull-stripped, 1 mm) shipped in nilearn."""
    return data.load_mni152("t1")


@pytest.fixture(scope="session")
def colin27_t1() -> sitk.Image:
    """Colin27 whole head (held out): skipped with the install command where it is absent."""
    if not data.colin27_available():
        pytest.skip("Colin27 is not installed: apt-get install -y mricron-data")
    return data.load_colin27("t1")


def make_oblique_image(
    size: tuple[int, int, int] = (40, 36, 24),
    spacing: tuple[float, float, float] = (0.9, 1.1, 2.5),
    seed: int = 0,
) -> sitk.Image:
    """A small float image with anisotropic spacing, an off-zero origin and an oblique direction."""
    rng = np.random.default_rng(seed)
    array = rng.normal(100.0, 20.0, size=size[::-1]).astype(np.float32)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing(spacing)
    image.SetOrigin((-12.5, 30.25, 7.0))
    rotation = sitk.VersorTransform((0.3, -0.5, 0.8), np.deg2rad(23.0))
    image.SetDirection(rotation.GetMatrix())
    return image


@pytest.fixture
def oblique_image() -> sitk.Image:
    return make_oblique_image()


def thick_oblique(spacing=(0.9, 1.1, 4.0), size=(40, 36, 12)) -> sitk.Image:
    """A thick-slice volume on an oblique grid (the super-resolution tests' input)."""
    return make_oblique_image(size=size, spacing=spacing, seed=3)


def corners(image: sitk.Image) -> np.ndarray:
    """Physical positions of the outer corners of the first and last voxels (the box covered)."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    spacing = np.asarray(image.GetSpacing())
    first = np.asarray(image.GetOrigin()) - direction @ (spacing / 2)
    last = first + direction @ (np.asarray(image.GetSize()) * spacing)
    return np.stack([first, last])

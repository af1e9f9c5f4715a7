"""Label maps for synthetic training: the MNI brain, and the pydeface whole head with a brain pseudo-label.

Everything is built from packages (nilearn's MNI ICBM152 2009a, the pydeface wheel) and cached as NIfTI,
so a fresh machine rebuilds the same maps with one call. Colin27 is never touched here.
"""

from __future__ import annotations

import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from deepmri.data import load_mni152, mni152_tissue_labels
from deepmri.errors import DeepMRIError
from deepmri.geometry import reorient
from deepmri.progress import ProgressCallback, no_progress

PYDEFACE_VERSION = "2.1.0"
PYDEFACE_HEAD = "pydeface/data/mean_reg2mean.nii.gz"
ORIENTATION = "RAS"

# Label values shared by all label maps (the generator draws one intensity per value).
BACKGROUND, CSF, GREY, WHITE = 0, 1, 2, 3
BRAIN_LABELS = (CSF, GREY, WHITE)
HEAD_CLUSTERS_FIRST = 4  # 4.. : k-means classes of the real pydeface head outside the brain
HEAD_CLUSTERS = 5
SHELL_FIRST = 10  # 10.. : synthetic shells around the MNI brain (SynthStrip-like)
SHELL_NAMES = ("outer CSF", "inner table", "diploe", "outer table", "scalp", "fat")
NUM_LABELS = SHELL_FIRST + len(SHELL_NAMES)


class TrainingDataError(DeepMRIError):
    """Training data could not be fetched or built; the message says what to install or check."""


@dataclass
class LabelSource:
    """One anatomy to synthesise from, all arrays on `grid` (RAS-oriented, ~1 mm).

    labels: uint8 label values above; tissue: float32 (3, ...) CSF/GM/WM probabilities (brain only);
    image: the real T1 on the same grid (for mixing real images into training); distance: signed
    distance in mm to the brain surface (positive outside), used to draw random shells.
    """

    name: str
    grid: sitk.Image
    labels: np.ndarray
    tissue: np.ndarray
    image: np.ndarray
    distance: np.ndarray


def fetch_pydeface_head(cache_dir: Path) -> Path:
    """Download the pydeface wheel (no dependencies) with pip and unpack its mean whole-head T1."""
    target = Path(cache_dir) / "pydeface" / PYDEFACE_HEAD
    if target.exists():
        return target
    wheel_dir = Path(cache_dir) / "pip"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = sorted(wheel_dir.glob(f"pydeface-{PYDEFACE_VERSION}-*.whl"))
    if not wheels:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d"]
        command += [str(wheel_dir), f"pydeface=={PYDEFACE_VERSION}"]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = sorted(wheel_dir.glob(f"pydeface-{PYDEFACE_VERSION}-*.whl"))
        if result.returncode != 0 or not wheels:
            raise TrainingDataError(
                "Could not download the pydeface wheel (the whole-head training image): "
                f"{result.stderr.strip()[-300:]} — check access to PyPI or put the wheel in {wheel_dir}."
            )
    with zipfile.ZipFile(wheels[0]) as archive:
        archive.extract(PYDEFACE_HEAD, Path(cache_dir) / "pydeface")
    return target


def register_mni_brain_to_head(
    head: sitk.Image, progress: ProgressCallback = no_progress
) -> sitk.Transform:
    """Affine registration of the skull-stripped MNI T1 onto a whole-head T1 (mutual information).

    Checked by eye, two tempting set-ups go wrong: a moving mask on the MNI brain lets the metric
    ignore whatever falls outside it, so the brain shrinks into the head's brain interior; and a
    thresholded brain mask of this blurred mean head leaks into the face and neck. What works: no
    moving mask (the MNI's zero surround must meet the head's dark CSF and skull, not its brain),
    a fixed mask of the head above the skull base (the neck and lower face have no MNI
    counterpart), and a start that puts the top and back of the brain 8 mm inside the head's.
    Returns the head->MNI transform (ITK's fixed-to-moving convention).
    """
    fixed = sitk.Cast(head, sitk.sitkFloat32)
    moving = _mni_pseudo_head()
    head_mask = sitk.BinaryFillhole(sitk.OtsuThreshold(fixed, 0, 1))
    low, high = _physical_box(head_mask)
    region = sitk.GetArrayFromImage(head_mask).astype(np.uint8)
    region[_physical_heights(fixed) < high[2] - 175.0] = 0
    fixed_mask = sitk.GetImageFromArray(region)
    fixed_mask.CopyInformation(fixed)
    brain_low, brain_high = _physical_box(_padded(load_mni152("t1")) > 0)
    offset = (
        (brain_low[0] + brain_high[0]) / 2 - (low[0] + high[0]) / 2,
        brain_high[1] - (high[1] - 8.0),  # LPS: +y is posterior
        brain_high[2] - (high[2] - 8.0),  # +z is superior
    )
    centre = tuple(float(v) for v in (brain_low + brain_high) / 2 - np.asarray(offset))
    similarity = sitk.Similarity3DTransform()
    similarity.SetCenter(centre)
    similarity.SetTranslation(offset)
    progress(0.1, "Similarity registration")
    method = _registration([4, 2, 1], [2.0, 1.0, 0.0], 200)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInitialTransform(similarity, inPlace=True)
    method.Execute(fixed, moving)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(similarity.GetCenter())
    affine.SetMatrix(similarity.GetMatrix())
    affine.SetTranslation(similarity.GetTranslation())
    progress(0.6, "Affine registration")
    method = _registration([2, 1], [1.0, 0.0], 150)
    method.SetMetricFixedMask(fixed_mask)
    method.SetInitialTransform(affine, inPlace=True)
    method.Execute(fixed, moving)
    progress(0.8, "B-spline refinement")
    # The affine matches the inner anatomy; a coarse B-spline lets the brain edge meet the skull.
    bspline = sitk.BSplineTransformInitializer(fixed, [4, 4, 4], order=3)
    method = _registration([4, 2], [2.0, 1.0], 40)
    method.SetMetricFixedMask(fixed_mask)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-5, numberOfIterations=40)
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    return sitk.CompositeTransform([affine, bspline])


def _mni_pseudo_head(skull_mm: float = 6.0, scalp_mm: float = 6.0) -> sitk.Image:
    """The MNI T1 wrapped in a dark skull band and a bright scalp band, on the padded grid.

    Mutual information between the bare skull-stripped MNI and a whole head shrinks the brain
    (the blurred cortex of a mean head passes for the MNI's zero surround); the bright scalp ring,
    the strongest edge of a T1 head, pins the scale.
    """
    t1 = _padded(sitk.Cast(load_mni152("t1"), sitk.sitkFloat32))
    values = sitk.GetArrayFromImage(t1)
    distance = _outside_distance(values > 0, t1.GetSpacing())
    bright = float(np.percentile(values[values > 0], 99))
    values = np.where((distance > 0) & (distance <= skull_mm), 0.1 * bright, values)
    scalp = (distance > skull_mm) & (distance <= skull_mm + scalp_mm)
    values = np.where(scalp, 0.9 * bright, values)
    head = sitk.GetImageFromArray(values.astype(np.float32))
    head.CopyInformation(t1)
    return head


def _physical_heights(image: sitk.Image) -> np.ndarray:
    """LPS z (superior) coordinate of every voxel, in array order (k, j, i)."""
    k, j, i = np.meshgrid(*(np.arange(n) for n in image.GetSize()[::-1]), indexing="ij")
    row = np.asarray(image.GetDirection()).reshape(3, 3)[2] * np.asarray(image.GetSpacing())
    return image.GetOrigin()[2] + row[0] * i + row[1] * j + row[2] * k


def _physical_box(mask: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Min/max LPS corner of a mask's voxels (all 8 corners mapped, so any direction works)."""
    index = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)
    low, high = index.min(0)[::-1], index.max(0)[::-1]
    corners = [
        mask.TransformIndexToPhysicalPoint([int(c) for c in (x, y, z)])
        for x in (low[0], high[0])
        for y in (low[1], high[1])
        for z in (low[2], high[2])
    ]
    points = np.asarray(corners)
    return points.min(0), points.max(0)


def _registration(shrink, smooth, iterations) -> sitk.ImageRegistrationMethod:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=48)
    method.SetMetricSamplingStrategy(method.RANDOM)
    method.SetMetricSamplingPercentage(0.1, seed=13)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel(smooth)
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0, minStep=1e-4, numberOfIterations=iterations, relaxationFactor=0.6
    )
    method.SetOptimizerScalesFromPhysicalShift()
    return method


MNI_PAD_VOXELS = 24  # room around the MNI brain for synthetic shells and large rotations


def mni_source() -> LabelSource:
    """The MNI brain (RAS, 1 mm, padded): tissue labels, GM/WM/CSF probabilities, T1, distances."""
    t1 = _padded(reorient(sitk.Cast(load_mni152("t1"), sitk.sitkFloat32), ORIENTATION))
    labels = _padded(reorient(mni152_tissue_labels(), ORIENTATION))
    grey = sitk.GetArrayFromImage(_padded(reorient(load_mni152("gm"), ORIENTATION)))
    white = sitk.GetArrayFromImage(_padded(reorient(load_mni152("wm"), ORIENTATION)))
    label_array = sitk.GetArrayFromImage(labels).astype(np.uint8)
    inside = label_array > 0
    grey = grey.astype(np.float32) / 255.0 * inside
    white = white.astype(np.float32) / 255.0 * inside
    csf = np.clip(1.0 - grey - white, 0.0, 1.0) * inside
    return LabelSource(
        name="mni",
        grid=t1,
        labels=label_array,
        tissue=np.stack([csf, grey, white]).astype(np.float32),
        image=sitk.GetArrayFromImage(t1).astype(np.float32),
        distance=_outside_distance(inside, t1.GetSpacing()),
    )


def _padded(image: sitk.Image) -> sitk.Image:
    pad = [MNI_PAD_VOXELS] * 3
    return sitk.ConstantPad(image, pad, pad, 0)


def _outside_distance(inside: np.ndarray, spacing) -> np.ndarray:
    from scipy import ndimage

    return ndimage.distance_transform_edt(~inside, sampling=spacing[::-1]).astype(np.float32)


def head_source(
    head: sitk.Image, head_to_mni: sitk.Transform, clusters: int = HEAD_CLUSTERS, seed: int = 0
) -> LabelSource:
    """The pydeface whole head (RAS): registered MNI tissue as brain, k-means classes elsewhere.

    The brain labels are a pseudo-label (MNI warped by `head_to_mni`); outside it the head
    (Otsu foreground, holes filled) is split into `clusters` intensity classes so the generator can
    re-contrast real scalp, skull, face, eyes and neck.
    """
    from sklearn.cluster import KMeans

    head = reorient(sitk.Cast(head, sitk.sitkFloat32), ORIENTATION)
    brain = sitk.Resample(mni152_tissue_labels(), head, head_to_mni, sitk.sitkNearestNeighbor)
    brain_array = sitk.GetArrayFromImage(brain).astype(np.uint8)
    image = sitk.GetArrayFromImage(head).astype(np.float32)
    grown = _grow_to_skull(brain_array > 0, image)
    brain_array[grown & (brain_array == 0)] = CSF
    foreground = sitk.BinaryFillhole(sitk.OtsuThreshold(head, 0, 1))
    foreground = sitk.BinaryMorphologicalClosing(foreground, [3, 3, 3])
    outside_brain = (sitk.GetArrayFromImage(foreground) > 0) & (brain_array == 0)
    values = image[outside_brain][:, None]
    sample = np.random.default_rng(seed).choice(len(values), min(len(values), 200_000), False)
    kmeans = KMeans(n_clusters=clusters, n_init=4, random_state=seed).fit(values[sample])
    order = np.argsort(kmeans.cluster_centers_[:, 0])
    rank = np.empty_like(order)
    rank[order] = np.arange(clusters)
    labels = brain_array.copy()
    labels[outside_brain] = HEAD_CLUSTERS_FIRST + rank[kmeans.predict(values)]
    return LabelSource(
        name="head",
        grid=head,
        labels=labels,
        tissue=np.zeros((3, 1, 1, 1), dtype=np.float32),
        image=image,
        distance=np.zeros((1, 1, 1), dtype=np.float32),
    )


def _grow_to_skull(brain: np.ndarray, image: np.ndarray, steps: int = 8) -> np.ndarray:
    """Grow the registered brain, 1 voxel per step, into tissue brighter than the skull band.

    Mutual information aligns the MNI's inner anatomy, but on this mean head it leaves the brain
    edge 5-8 mm short of the inner skull (intensity profiles and overlays, checked by eye); the dark
    skull stops the growth, and `steps` bounds any leak where the band is faint.
    """
    from scipy import ndimage

    threshold = 0.5 * float(np.median(image[brain]))
    allowed = image > threshold
    structure = ndimage.generate_binary_structure(3, 1)
    grown = brain.copy()
    for _ in range(steps):
        grown = grown | (ndimage.binary_dilation(grown, structure) & allowed)
    return ndimage.binary_fill_holes(grown)


def build_sources(
    cache_dir: Path, task: str, progress: ProgressCallback = no_progress
) -> dict[str, LabelSource]:
    """All label sources for `task`, building (and caching) the head registration on first use."""
    sources = {"mni": mni_source()}
    if task == "brain-extraction":
        head_path = fetch_pydeface_head(cache_dir)
        head = sitk.ReadImage(str(head_path), sitk.sitkFloat32)
        transform_path = Path(cache_dir) / "pydeface_head_to_mni152.tfm"
        if transform_path.exists():
            transform = sitk.ReadTransform(str(transform_path))
        else:
            transform = register_mni_brain_to_head(head, progress)
            sitk.WriteTransform(transform, str(transform_path))
        sources["head"] = head_source(head, transform)
    return sources

"""Label maps for synthetic training: the MNI brain, and the pydeface whole head with a brain pseudo-label.

Everything is built from packages (nilearn's MNI ICBM152 2009a, the pydeface wheel) and cached as NIfTI,
so a fresh machine rebuilds the same maps with one call. Colin27 is never touched here.

The pydeface head's brain mask is a pseudo-label made once by deepbet (MIT; Fisch et al. 2024, a
3D network trained on thousands of real T1 scans) and cached as `pydeface_deepbet_mask.nii.gz`:
deepbet is needed only to make that file (the `train` extra), never to train from it or at run time.
It replaced an affine + B-spline registration of the MNI brain whose lower edge stopped at the
MNI template's own field of view (z = -72 mm in MNI space), well above the head's real lower
cerebellum and brainstem: the network learned that flat edge (Docs/training.md).
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
from deepmri.geometry import distance_outside_mm, reorient
from deepmri.progress import ProgressCallback, no_progress

PYDEFACE_VERSION = "2.1.0"
PYDEFACE_HEAD = "pydeface/data/mean_reg2mean.nii.gz"
ORIENTATION = "RAS"

# Label values shared by all label maps (the generator draws one intensity per value).
BACKGROUND, CSF, GREY, WHITE = 0, 1, 2, 3
TIGHT_LABELS = (CSF, GREY, WHITE)  # the brain without the CSF around it (ventricles included)
HEAD_CLUSTERS_FIRST = 4  # 4.. : k-means classes of the real pydeface head outside the brain
HEAD_CLUSTERS = 5
OUTER_CSF = 9  # CSF within CSF_BORDER_MM of the tight brain (inside the default mask)
BRAIN_LABELS = (*TIGHT_LABELS, OUTER_CSF)  # the default mask: brain and the CSF around it
TIGHT_CLOSING_MM = 3.0  # the tight brain: grey + white closed by this radius, holes filled
# The default mask's convention: the brain plus the CSF up to this distance from it. Wide
# extra-cerebral CSF (the pydeface head's deepbet mask holds a rim of up to 11 mm, median 2.8 mm,
# 90th percentile 6 mm) beyond it is background, so the mask's edge sits a fixed, stated distance
# from the brain (like SynthStrip's border) instead of wherever a teacher's dura happened to be.
CSF_BORDER_MM = 3.0
FAR_CSF = 16  # CSF beyond CSF_BORDER_MM: outside the mask, drawn with OUTER_CSF's intensity
DEEPBET_MASK = "pydeface_deepbet_mask.nii.gz"
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


MNI_PAD_VOXELS = 24  # room around the MNI brain for synthetic shells and large rotations


def mni_source() -> LabelSource:
    """The MNI brain (RAS, 1 mm, padded): tissue labels, GM/WM/CSF probabilities, T1, distances."""
    t1 = _padded(reorient(sitk.Cast(load_mni152("t1"), sitk.sitkFloat32), ORIENTATION))
    labels = _padded(reorient(mni152_tissue_labels(), ORIENTATION))
    grey = sitk.GetArrayFromImage(_padded(reorient(load_mni152("gm"), ORIENTATION)))
    white = sitk.GetArrayFromImage(_padded(reorient(load_mni152("wm"), ORIENTATION)))
    label_array = sitk.GetArrayFromImage(labels).astype(np.uint8)
    inside = label_array > 0
    label_array = split_outer_csf(label_array, t1.GetSpacing())
    grey = grey.astype(np.float32) / 255.0 * inside
    white = white.astype(np.float32) / 255.0 * inside
    csf = np.clip(1.0 - grey - white, 0.0, 1.0) * inside
    return LabelSource(
        name="mni",
        grid=t1,
        labels=label_array,
        tissue=np.stack([csf, grey, white]).astype(np.float32),
        image=sitk.GetArrayFromImage(t1).astype(np.float32),
        distance=distance_outside_mm(inside, t1.GetSpacing()).astype(np.float32),
    )


def _padded(image: sitk.Image) -> sitk.Image:
    pad = [MNI_PAD_VOXELS] * 3
    return sitk.ConstantPad(image, pad, pad, 0)


def ranked_kmeans(
    values: np.ndarray, count: int, rng: np.random.Generator, seed: int = 0
) -> np.ndarray:
    """Each value's class 0..count-1 by k-means on intensity, ranked dark to bright.

    The fit uses at most 200,000 values drawn with `rng`; every value is then assigned. On a T1
    brain three classes stand for CSF < grey < white matter.
    """
    from sklearn.cluster import KMeans

    sample = rng.choice(len(values), min(len(values), 200_000), False)
    kmeans = KMeans(n_clusters=count, n_init=4, random_state=seed).fit(values[sample, None])
    order = np.argsort(kmeans.cluster_centers_[:, 0])
    rank = np.empty_like(order)
    rank[order] = np.arange(count)
    return rank[kmeans.predict(values[:, None])]


def head_source(
    head: sitk.Image, brain_mask: sitk.Image, clusters: int = HEAD_CLUSTERS, seed: int = 0
) -> LabelSource:
    """The pydeface whole head (RAS): `brain_mask` (deepbet) as brain, k-means classes elsewhere.

    Inside the mask, three intensity classes stand for CSF, grey and white matter (the generator
    re-contrasts them); the tight brain is the non-CSF part closed by TIGHT_CLOSING_MM with holes
    filled, and the CSF outside it becomes OUTER_CSF. Outside the mask the head (Otsu foreground,
    holes filled) is split into `clusters` intensity classes so the generator can re-contrast real
    scalp, skull, face, eyes and neck.
    """
    head = reorient(sitk.Cast(head, sitk.sitkFloat32), ORIENTATION)
    mask = sitk.Resample(brain_mask, head, sitk.Transform(), sitk.sitkNearestNeighbor)
    inside = sitk.GetArrayFromImage(mask) > 0
    image = sitk.GetArrayFromImage(head).astype(np.float32)
    rng = np.random.default_rng(seed)
    brain_array = np.zeros(image.shape, dtype=np.uint8)
    brain_array[inside] = CSF + ranked_kmeans(image[inside], 3, rng, seed)  # CSF < grey < white
    brain_array = split_outer_csf(brain_array, head.GetSpacing())
    foreground = sitk.BinaryFillhole(sitk.OtsuThreshold(head, 0, 1))
    foreground = sitk.BinaryMorphologicalClosing(foreground, [3, 3, 3])
    outside_brain = (sitk.GetArrayFromImage(foreground) > 0) & ~inside
    labels = brain_array.copy()
    labels[outside_brain] = HEAD_CLUSTERS_FIRST + ranked_kmeans(
        image[outside_brain], clusters, rng, seed
    )
    return LabelSource(
        name="head",
        grid=head,
        labels=labels,
        tissue=np.zeros((3, 1, 1, 1), dtype=np.float32),
        image=image,
        distance=np.zeros((1, 1, 1), dtype=np.float32),
    )


def split_outer_csf(labels: np.ndarray, spacing) -> np.ndarray:
    """Relabel the CSF outside the tight brain (grey + white, closed, holes filled) as OUTER_CSF.

    The tight brain follows the cortex and keeps the ventricles and narrow sulci; what is left of
    the mask is the CSF around the brain, which the default mask includes and `--no-csf` drops:
    OUTER_CSF up to CSF_BORDER_MM from the tight brain, FAR_CSF (background) beyond it.
    """
    from scipy import ndimage

    tissue = np.isin(labels, (GREY, WHITE))
    radius = np.maximum(np.round(TIGHT_CLOSING_MM / np.asarray(spacing[::-1])), 1).astype(int)
    zz, yy, xx = np.meshgrid(*(np.arange(-r, r + 1) for r in radius), indexing="ij")
    ball = (zz / radius[0]) ** 2 + (yy / radius[1]) ** 2 + (xx / radius[2]) ** 2 <= 1.0
    pad = [(r, r) for r in radius]
    closed = ndimage.binary_closing(np.pad(tissue, pad), ball)[tuple(slice(r, -r) for r in radius)]
    tight = ndimage.binary_fill_holes(closed | tissue)
    components, count = ndimage.label(tight)
    if count > 1:
        sizes = ndimage.sum(tight, components, range(1, count + 1))
        tight = components == (int(np.argmax(sizes)) + 1)
    outside_csf = (labels == CSF) & ~tight
    within_border = distance_outside_mm(tight, spacing).astype(np.float32) <= CSF_BORDER_MM
    output = labels.copy()
    output[outside_csf & within_border] = OUTER_CSF
    output[outside_csf & ~within_border] = FAR_CSF
    return output


def deepbet_head_mask(head_path: Path, cache_dir: Path) -> sitk.Image:
    """The pydeface head's brain mask from deepbet, made once and cached as NIfTI.

    deepbet (MIT, PyPI `deepbet`, TorchScript weights in the wheel) is a peer brain extractor;
    here it only makes this pseudo-label. Its mask includes the CSF around the brain, like the
    default DeepMRI mask; the tight brain inside it is derived from intensities (head_source).
    """
    path = Path(cache_dir) / DEEPBET_MASK
    if not path.exists():
        try:
            from deepbet import BrainExtraction
        except ImportError as error:
            raise TrainingDataError(
                "The pydeface head's brain label is made once by deepbet: pip install --no-deps "
                "deepbet connected-components-3d fill_voids nibabel pandas tqdm (the 'train' "
                f"extra), or put a cached {DEEPBET_MASK} in {cache_dir} ({error})."
            ) from error
        import torch

        threads = torch.get_num_threads()
        extractor = BrainExtraction(no_gpu=True)
        _, mask, _ = extractor.run(str(head_path), mask_path=str(path))
        torch.set_num_threads(threads)
    return sitk.ReadImage(str(path), sitk.sitkUInt8)


def build_sources(
    cache_dir: Path, task: str, progress: ProgressCallback = no_progress
) -> dict[str, LabelSource]:
    """All label sources for `task`, making (and caching) the head's deepbet mask on first use."""
    sources = {"mni": mni_source()}
    if task == "brain-extraction":
        head_path = fetch_pydeface_head(cache_dir)
        head = sitk.ReadImage(str(head_path), sitk.sitkFloat32)
        progress(0.05, "Brain label of the pydeface head (deepbet, cached)")
        sources["head"] = head_source(head, deepbet_head_mask(head_path, cache_dir))
    return sources

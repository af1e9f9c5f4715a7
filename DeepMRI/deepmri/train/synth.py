"""Synthetic training images from label maps: sampled parameters, applied deterministically.

Follows TorchIO's split of a random transform into a sampler and a deterministic twin:
`sample_parameters` draws every random choice into a `GeneratorParameters`; `generate` turns those
parameters (plus the label sources) into an image and its target, always the same for the same
parameters, so any training image can be made again from its logged parameters.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from deepmri.intensity import normalize_percentile
from deepmri.train.labels import (
    BRAIN_LABELS,
    CSF,
    CSF_BORDER_MM,
    FAR_CSF,
    NUM_LABELS,
    OUTER_CSF,
    SHELL_FIRST,
    SHELL_NAMES,
    TIGHT_LABELS,
    LabelSource,
)

BRAIN_EXTRACTION = "brain-extraction"
BRAIN_TISSUE = "brain-tissue"


@dataclass
class GridSpec:
    """The training grid: array shape (z, y, x) at `spacing` mm, RAS-oriented like inference."""

    shape: tuple[int, int, int]
    spacing: float


# Log-amplitude of the smooth bias field: control points N(0, strength), strength up to this.
# Real heads can be darker still: the lower cerebellum of ROBEX's reference head is at a third of
# the mid-brain's intensity (recipes may widen it with `bias_max`).
DEFAULT_BIAS_MAX = 0.5


@dataclass
class GeneratorParameters:
    """Every random choice behind one training image (JSON-serialisable with `asdict`)."""

    seed: int
    task: str
    source: str
    mode: str  # "synthetic", "real" or "hybrid" (real brain, synthetic surroundings)
    shells_mm: list[float]  # thickness of each synthetic shell; empty = stripped brain
    shell_wobble_mm: float
    rotation_deg: list[float]
    scaling: list[float]
    shear: list[float]
    translation_mm: list[float]
    deformation_mm: float
    means: list[float]
    stds: list[float]
    blur_voxels: float
    bias_strength: float
    thick_axis: int  # -1 = none; else array axis (0 = z) with thick slices
    thickness_mm: float
    noise: float
    gamma: float
    invert: bool
    crop_mm: list[
        float
    ]  # air crop of the field of view: z-low, z-high, y-low, y-high, x-low, x-high
    mask_margin_voxels: int  # tissue: brain mask eroded (<0) or dilated (>0) to mimic extraction
    extras: dict[str, Any] = field(default_factory=dict)
    # How much the CSF rim's thickness varies around the brain (mm, a smooth field; 0: even).
    csf_variation_mm: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def sample_parameters(
    seed: int,
    task: str,
    sources: dict[str, LabelSource],
    spacing: float,
    bias_max: float = DEFAULT_BIAS_MAX,
    csf_variation_max: float = 0.0,
    mni152_head_share: float = 0.0,
) -> GeneratorParameters:
    """Draw one image's parameters; the only place with randomness besides seeded noise fields.

    `bias_max` bounds the bias field's log-amplitude (per-image strength drawn from [0, bias_max]);
    a wider range changes no other draw, so the same seed keeps its anatomy, pose and contrast.
    `csf_variation_max` (mm) bounds how much the synthetic CSF rim's thickness varies around the
    brain (`_add_shells`); it is drawn from a generator of its own, so it too changes no other draw.
    `mni152_head_share` is the share of the whole-head images drawn from FSL's MNI152 head instead
    of the pydeface head, also from a generator of its own.
    """
    rng = np.random.default_rng(seed)
    if task == BRAIN_EXTRACTION:
        source = "head" if rng.random() < 0.5 else "mni"
    else:
        source = "mni"
    if source == "head" and np.random.default_rng([seed, 7]).random() < mni152_head_share:
        source = "mni152-head"
    mode = rng.choice(["synthetic", "real", "hybrid"], p=[0.55, 0.3, 0.15])
    shells: list[float] = []
    if task == BRAIN_EXTRACTION and source == "mni" and rng.random() < 0.75:
        shells = draw_shells(rng)
    if task == BRAIN_EXTRACTION and source == "mni" and mode == "hybrid" and not shells:
        mode = "real"
    if source != "mni" and mode == "hybrid":
        mode = "real"
    means = rng.uniform(0.0, 1.0, NUM_LABELS)
    if rng.random() < 0.7:
        means[0] = rng.uniform(0.0, 0.05)  # air is dark in most MRI
    stds = rng.uniform(0.0, 0.08, NUM_LABELS)
    # CSF is one fluid: around the brain it looks as in the ventricles (a little darker or not).
    means[OUTER_CSF] = means[CSF] * rng.uniform(0.85, 1.0)
    stds[OUTER_CSF] = stds[CSF]
    rotation_limit = 25.0 if task == BRAIN_EXTRACTION else 15.0
    crop = [0.0] * 6
    if task == BRAIN_EXTRACTION and rng.random() < 0.35:
        side = int(rng.integers(0, 6))
        crop[side] = float(rng.uniform(10.0, 60.0))
    thick_axis = int(rng.integers(0, 3)) if rng.random() < 0.35 else -1
    if thick_axis >= 0 and rng.random() < 0.6:
        thick_axis = 0  # axial thick slices are the common clinical case
    return GeneratorParameters(
        seed=seed,
        task=task,
        source=source,
        mode=str(mode),
        shells_mm=shells,
        shell_wobble_mm=float(rng.uniform(0.0, 2.5)),
        rotation_deg=rng.uniform(-rotation_limit, rotation_limit, 3).tolist(),
        scaling=np.exp(rng.normal(0.0, 0.07, 3)).tolist(),
        shear=rng.uniform(-0.05, 0.05, 3).tolist(),
        translation_mm=(rng.uniform(-1.0, 1.0, 3) * _shift_range(task, rng)).tolist(),
        deformation_mm=float(rng.uniform(0.0, 4.0)),
        means=means.tolist(),
        stds=stds.tolist(),
        blur_voxels=float(rng.uniform(0.0, 1.0)),
        bias_strength=float(rng.uniform(0.0, bias_max)),
        thick_axis=thick_axis,
        thickness_mm=float(rng.uniform(3.0, 7.0)),
        noise=float(rng.uniform(0.0, 0.06)),
        gamma=float(np.exp(rng.normal(0.0, 0.3))),
        invert=bool(rng.random() < 0.25),
        crop_mm=crop,
        mask_margin_voxels=int(rng.choice([-2, -1, 0, 0, 0, 1, 2])),
        csf_variation_mm=_draw_csf_variation(seed, csf_variation_max),
    )


def _draw_csf_variation(seed: int, largest: float) -> float:
    """The image's CSF-rim variation in [0, largest] mm, from a generator of its own."""
    if largest <= 0:
        return 0.0
    return float(np.random.default_rng([seed, 2]).uniform(0.0, largest))


def draw_shells(rng: np.random.Generator) -> list[float]:
    """Random thicknesses (mm) of the layers around a stripped brain, inside out."""
    return [
        float(rng.uniform(1.0, CSF_BORDER_MM)),  # outer CSF: inside the default mask (label 2)
        float(rng.uniform(1.0, 3.0)),  # inner table
        float(rng.uniform(1.0, 5.0)),  # diploe
        float(rng.uniform(1.0, 3.0)),  # outer table
        float(rng.uniform(2.0, 7.0)),  # scalp
        float(rng.uniform(0.0, 5.0)),  # fat
    ]


def _shift_range(task: str, rng) -> np.ndarray:
    """Translation limits (z, y, x) in mm: tissue patches roam the brain; whole heads move a little
    (half the images) or far enough that the brain meets and crosses the patch border.

    With +-20 mm only, the brain never came near the patch's lower border in training, and the
    zero-padded convolutions learned where in the patch brain may be: at inference an image whose
    brain sits low in the window (Colin27, the MNI T1, whose brain touches its field of view's
    lower edge) lost everything below a flat plane ~30 mm above the window's lower border.
    """
    if task == BRAIN_TISSUE:
        return np.array([50.0, 65.0, 55.0])
    if rng.random() < 0.5:
        return np.array([20.0, 20.0, 20.0])
    return np.array([55.0, 50.0, 45.0])


def generate(
    params: GeneratorParameters, sources: dict[str, LabelSource], grid: GridSpec
) -> tuple[np.ndarray, np.ndarray]:
    """Image (float32, normalised as at inference) and target labels (uint8) on `grid`.

    Targets: brain-extraction 0 background, 1 brain (tight: grey, white, ventricles and narrow
    sulci), 2 the CSF around it (the default mask is 1 + 2); brain-tissue 0-3.
    """
    source = sources[params.source]
    rng = np.random.default_rng([params.seed, 1])
    sampling = _sampling_grid(params, source, grid, rng)
    labels = _warp(_float_labels(source), sampling, "nearest")[0]
    labels = labels.round().astype(np.uint8)
    if params.task == BRAIN_EXTRACTION:
        image, target = _brain_extraction_image(params, source, sampling, labels, grid, rng)
    else:
        image, target = _tissue_image(params, source, sampling, labels, grid, rng)
    return image, target


def _brain_extraction_image(params, source, sampling, labels, grid, rng):
    if params.shells_mm:
        distance = _warp(source.distance[None], sampling, "bilinear", padding="border")[0]
        labels = _add_shells(labels, distance, params, grid, rng)
    brain = np.isin(labels, BRAIN_LABELS)
    classes = np.where(np.isin(labels, TIGHT_LABELS), 1, np.where(labels == OUTER_CSF, 2, 0))
    if params.shells_mm and source.tight_distance is not None:
        classes[_beyond_the_csf_border(labels, source, sampling)] = 0
    head = labels > 0
    synthetic = _synthetic_intensities(labels, params, rng)
    if params.mode == "synthetic":
        image = synthetic
    else:
        real = _warp(source.image[None], sampling, "bilinear")[0]
        real = real / max(float(np.percentile(real[real > 0], 99.5)), 1e-6) if real.any() else real
        if params.mode == "hybrid":
            image = np.where(brain, real * params.means[2] / 0.6, synthetic)
        else:
            image = real
    image = _finish(image, head, params, grid, rng)
    image = normalize_percentile(_crop_field_of_view(image, params, grid))
    target = _crop_field_of_view(classes.astype(np.uint8), params, grid)
    return image, target


def _beyond_the_csf_border(labels, source, sampling) -> np.ndarray:
    """The shell's CSF farther than CSF_BORDER_MM from the tight brain: fluid, but not the mask's.

    The shells start at the MNI mask's edge, which lies 1-2 mm outside the tight brain (median
    1.4 mm), and the wobble moves them by up to 2.5 mm more; without this cap the CSF label of
    an image with a 3 mm CSF shell and the widest wobble reached 8-10 mm from the brain on the
    2 mm grid, where the mask's own CSF and the real heads' stop at CSF_BORDER_MM
    (`split_outer_csf`). The image is unchanged: only the label stops.
    """
    tight_distance = _warp(source.tight_distance[None], sampling, "bilinear", padding="border")[0]
    return (labels == OUTER_CSF) & (tight_distance > CSF_BORDER_MM)


def _tissue_image(params, source, sampling, labels, grid, rng):
    labels = np.where(np.isin(labels, (OUTER_CSF, FAR_CSF)), CSF, labels).astype(np.uint8)
    brain = labels > 0
    if params.mask_margin_voxels:
        structure = ndimage.generate_binary_structure(3, 1)
        operation = (
            ndimage.binary_dilation if params.mask_margin_voxels > 0 else ndimage.binary_erosion
        )
        mask = operation(brain, structure, iterations=abs(params.mask_margin_voxels))
    else:
        mask = brain
    if params.mode == "synthetic":
        tissue = _warp(source.tissue, sampling, "bilinear")
        csf, grey, white = params.means[1:4]
        image = tissue[0] * csf + tissue[1] * grey + tissue[2] * white
        image = image + rng.normal(0.0, 1.0, image.shape).astype(np.float32) * np.choose(
            labels.clip(0, 3), [0.0, *params.stds[1:4]]
        ).astype(np.float32)
    else:
        image = _warp(source.image[None], sampling, "bilinear")[0]
        image = image / max(float(np.percentile(image[brain], 99.5)), 1e-6)
    image = _finish(image, mask, params, grid, rng)
    image = np.where(mask, image, 0.0).astype(np.float32)
    image = normalize_percentile(image)
    target = np.where(mask, labels, 0).astype(np.uint8)
    return image, target


def _finish(image, region, params, grid, rng) -> np.ndarray:
    """Blur, bias, gamma, inversion, thick slices, noise, then the inference normalisation."""
    image = image.astype(np.float32)
    if params.blur_voxels > 0.05:
        image = ndimage.gaussian_filter(image, params.blur_voxels)
    image = np.clip(image, 0.0, None) * _bias_field(image.shape, params.bias_strength, rng)
    scale = max(float(np.percentile(image[region], 99.5)), 1e-6) if region.any() else 1.0
    image = np.clip(image / scale, 0.0, None) ** params.gamma
    if params.invert:
        # The T2-like evaluation: high - value inside the head/brain, background stays dark.
        high = float(np.percentile(image[region], 99.5)) if region.any() else 1.0
        image = np.where(region, np.clip(high - image, 0.0, None) + 0.05 * high, image * 0.1)
    if params.thick_axis >= 0:
        image = _thick_slices(image, params.thick_axis, params.thickness_mm / grid.spacing)
    noise = rng.normal(0.0, params.noise, (2, *image.shape)).astype(np.float32)
    image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)  # Rician magnitude noise
    return image.astype(np.float32)


def _thick_slices(image: np.ndarray, axis: int, thickness_voxels: float) -> np.ndarray:
    """Gaussian slice profile along `axis`, one sample per slice, linearly interpolated back."""
    sigma = [0.0, 0.0, 0.0]
    sigma[axis] = thickness_voxels / 2.355
    blurred = np.moveaxis(ndimage.gaussian_filter(image, sigma), axis, -1)
    length = blurred.shape[-1]
    slices = max(int(round((length - 1) / thickness_voxels)) + 1, 2)
    tensor = torch.from_numpy(np.ascontiguousarray(blurred)).reshape(1, -1, length)
    coarse = F.interpolate(tensor, size=slices, mode="linear", align_corners=True)
    fine = F.interpolate(coarse, size=length, mode="linear", align_corners=True)
    return np.moveaxis(fine.reshape(blurred.shape).numpy(), -1, axis).astype(np.float32)


def _bias_field(shape, strength: float, rng) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(0.0, strength, (1, 1, 4, 4, 4)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    return np.exp(field[0, 0].numpy())


def _synthetic_intensities(labels: np.ndarray, params, rng) -> np.ndarray:
    means = np.asarray(params.means, dtype=np.float32)
    stds = np.asarray(params.stds, dtype=np.float32)
    labels = np.where(labels == FAR_CSF, OUTER_CSF, labels)  # one fluid, one intensity
    noise = rng.normal(0.0, 1.0, labels.shape).astype(np.float32)
    return means[labels] + stds[labels] * noise


def _add_shells(labels, distance, params, grid, rng) -> np.ndarray:
    """Label voxels outside the brain by their (wobbled) distance: CSF rim, skull, scalp, fat.

    The CSF rim becomes OUTER_CSF, at most CSF_BORDER_MM thick: inside the default mask, as the CSF
    near the pydeface head's brain is (the MNI template's own mask holds 1-2 mm of CSF; where the
    rim reaches farther than CSF_BORDER_MM from the tight brain, `_beyond_the_csf_border` takes it
    out of the target, not out of the image). The wobble moves every boundary together; with
    `csf_variation_mm` the rim's own thickness also varies around the brain (0.5 mm to
    CSF_BORDER_MM), as real fluid is thin over the convexity and wide in the posterior fossa, so a
    network cannot learn the rim as a band of one width. Its field comes from a generator of its
    own: the image's other noise stays what the seed gives.
    """
    wobble = _smooth_noise(labels.shape, params.shell_wobble_mm, rng)
    distance = distance + wobble
    output = labels.copy()
    outside = labels == 0
    edge: float | np.ndarray = 0.0
    for index, thickness in enumerate(params.shells_mm[: len(SHELL_NAMES)]):
        if index == 0 and params.csf_variation_mm > 0:
            own = np.random.default_rng([params.seed, 3])
            varied = thickness + _smooth_noise(labels.shape, params.csf_variation_mm, own)
            thickness = np.clip(varied, 0.5, CSF_BORDER_MM)
        shell = outside & (distance > edge) & (distance <= edge + thickness)
        output[shell] = OUTER_CSF if index == 0 else SHELL_FIRST + index
        edge = edge + thickness
    return output


def _smooth_noise(shape, amplitude: float, rng) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(0.0, amplitude, (1, 1, 6, 6, 6)).astype(np.float32))
    field = F.interpolate(coarse, size=tuple(shape), mode="trilinear", align_corners=True)
    return field[0, 0].numpy()


def _sampling_grid(params, source: LabelSource, grid: GridSpec, rng) -> torch.Tensor:
    """grid_sample coordinates mapping each training voxel to the source, via affine + smooth warp.

    Both grids are RAS-oriented arrays (z, y, x); work in the source's voxel-aligned mm frame.
    float32 torch throughout (a float64 numpy grid took a third of the generator's time); the
    coordinates stay within 0.001 mm of the float64 ones.
    """
    shape = tuple(int(n) for n in grid.shape)
    source_spacing = np.asarray(source.spacing)[::-1]  # (z, y, x)
    source_shape = np.asarray(source.labels.shape)
    centre = _brain_centre_mm(source) + np.asarray(params.translation_mm)
    axes = [(torch.arange(n, dtype=torch.float32) - (n - 1) / 2) * grid.spacing for n in shape]
    points = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    matrix = torch.from_numpy(_affine_matrix(params).T.astype(np.float32))
    moved = points.reshape(-1, 3) @ matrix
    moved += torch.from_numpy(centre.astype(np.float32))
    moved = moved.reshape(*shape, 3)
    if params.deformation_mm > 0:
        coarse = rng.normal(0.0, params.deformation_mm, (1, 3, 5, 5, 5)).astype(np.float32)
        field = F.interpolate(
            torch.from_numpy(coarse), size=shape, mode="trilinear", align_corners=True
        )
        moved += field[0].permute(1, 2, 3, 0)
    scale = 2.0 / (source_spacing * np.maximum(source_shape - 1, 1))
    moved *= torch.from_numpy(scale.astype(np.float32))
    moved -= 1.0
    # grid_sample wants (x, y, z) order in the last dimension.
    return moved.flip(-1)[None].contiguous()


_CACHE: dict[tuple[int, str], Any] = {}


def _cached(source: LabelSource, key: str, compute) -> Any:
    """Per-source derived arrays, computed once per process (sources are read-only)."""
    entry = (id(source), key)
    if entry not in _CACHE:
        _CACHE[entry] = compute()
    return _CACHE[entry]


def _float_labels(source: LabelSource) -> np.ndarray:
    return _cached(source, "labels", lambda: source.labels[None].astype(np.float32))


def _brain_centre_mm(source: LabelSource) -> np.ndarray:
    def compute() -> np.ndarray:
        index = np.argwhere(np.isin(source.labels, BRAIN_LABELS))
        centre = (index.min(0) + index.max(0)) / 2.0
        return centre * np.asarray(source.spacing)[::-1]

    return _cached(source, "centre", compute)


def euler_matrix(angle_x: float, angle_y: float, angle_z: float) -> np.ndarray:
    """The rotation SimpleITK's Euler3DTransform makes of these angles (radians): Rz @ Rx @ Ry.

    Written out so the generator needs no SimpleITK (the GPU machine has none); a test holds it
    to SimpleITK's matrix.
    """
    cx, sx = np.cos(angle_x), np.sin(angle_x)
    cy, sy = np.cos(angle_y), np.sin(angle_y)
    cz, sz = np.cos(angle_z), np.sin(angle_z)
    rotate_x = np.array([[1.0, 0.0, 0.0], [0.0, cx, -sx], [0.0, sx, cx]])
    rotate_y = np.array([[cy, 0.0, sy], [0.0, 1.0, 0.0], [-sy, 0.0, cy]])
    rotate_z = np.array([[cz, -sz, 0.0], [sz, cz, 0.0], [0.0, 0.0, 1.0]])
    return rotate_z @ rotate_x @ rotate_y


def _affine_matrix(params: GeneratorParameters) -> np.ndarray:
    """Rotation x shear x scaling acting on (z, y, x) millimetre offsets from the brain centre."""
    matrix = euler_matrix(*np.deg2rad(params.rotation_deg))
    shear = np.eye(3)
    shear[0, 1], shear[0, 2], shear[1, 2] = params.shear
    return matrix @ shear @ np.diag(params.scaling)


def _warp(
    volume: np.ndarray, sampling: torch.Tensor, mode: str, padding: str = "zeros"
) -> np.ndarray:
    """Sample (C, z, y, x) `volume` at `sampling`; outside the source is 0 (air) by default.

    Distances pass padding="border": outside the source they stay far from the brain (zero padding
    had put a CSF rim and skull shells in rotated-in corners, far from any brain).
    """
    tensor = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None]
    warped = F.grid_sample(tensor, sampling, mode=mode, padding_mode=padding, align_corners=True)
    return warped[0].numpy()


def _crop_field_of_view(array: np.ndarray, params, grid: GridSpec) -> np.ndarray:
    """Zero slabs at the border, so partial heads and tight fields of view are seen in training."""
    output = array.copy()
    for axis in range(3):
        low = int(params.crop_mm[2 * axis] / grid.spacing)
        high = int(params.crop_mm[2 * axis + 1] / grid.spacing)
        if low:
            index = [slice(None)] * 3
            index[axis] = slice(0, low)
            output[tuple(index)] = 0
        if high:
            index = [slice(None)] * 3
            index[axis] = slice(array.shape[axis] - high, None)
            output[tuple(index)] = 0
    return output

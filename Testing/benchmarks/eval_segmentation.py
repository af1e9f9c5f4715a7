"""Held-out evaluation of the segmentation models against the classical baseline.

Brain extraction on Colin27 (never used in training or tuning): as is, rigidly moved, T2-like and
1x1x5 mm thick. Tissue on MNI152 versions with deformation, contrast and resolution seeds that
training never used (a robustness test: the anatomy is the training anatomy). Last line: JSON.

    python Testing/benchmarks/eval_segmentation.py [--device cpu] [--write-docs Docs/evaluation-segmentation.md]
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
from deepmri.tasks.segment import BRAIN_EXTRACTION, BRAIN_TISSUE, segment
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


def t2_like(image: sitk.Image, region: np.ndarray) -> sitk.Image:
    """Invert intensities inside `region` (CSF bright, WM dark), background stays dark."""
    values = array(image).astype(np.float32)
    high = np.percentile(values[region], 99.5)
    inverted = np.where(region, np.clip(high - values, 0, None) + 0.05 * high, 0.0)
    output = sitk.GetImageFromArray(inverted.astype(np.float32))
    output.CopyInformation(image)
    return output


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
        "colin27_t2like": (t2_like(head, head_region(head)), array(mask) > 0),
        "colin27_thick": (thick, array(thick_mask) > 0),
    }


def tissue_cases() -> dict[str, tuple[sitk.Image, sitk.Image, bool]]:
    """MNI152 variants with held-out seeds: (image, reference labels, is_t2_like)."""
    t1 = data.load_mni152("t1")
    labels = data.mni152_tissue_labels()
    plain, plain_labels = deformed(t1, labels, EVALUATION_SEEDS["deformed"], contrast=True)
    t2_base, t2_labels = deformed(t1, labels, EVALUATION_SEEDS["t2like"], contrast=False)
    t2 = t2_like(t2_base, array(t2_labels) > 0)
    thick_base, thick_base_labels = deformed(t1, labels, EVALUATION_SEEDS["thick"], contrast=True)
    thick = thick_slices(thick_base, 3.0, sitk.sitkLinear)
    thick_labels = thick_slices(thick_base_labels, 3.0, sitk.sitkNearestNeighbor)
    return {
        "": (plain, plain_labels, False),
        "_t2like": (t2, t2_labels, True),
        "_thick": (thick, thick_labels, False),
    }


def baseline_tissue(image: sitk.Image, t2_like_contrast: bool) -> np.ndarray:
    """GMM inside the (already skull-stripped) brain; told the contrast so it can order classes.

    The brain is what is brighter than 5% of the 99th percentile: resampling blurs the zero
    background of a skull-stripped scan into a faint fringe that is not tissue.
    """
    values = array(image)
    floor = 0.05 * np.percentile(values[values > 0], 99)
    brain = sitk.Cast(sitk.Cast(image, sitk.sitkFloat32) > floor, sitk.sitkUInt8)
    source = sitk.Cast(image, sitk.sitkFloat32) * (-1.0 if t2_like_contrast else 1.0)
    return array(classical_tissue(source, brain))


def evaluate_brain(device: str | None, results: dict[str, float]) -> None:
    for name, (image, reference) in brain_cases().items():
        model_mask = array(segment(image, BRAIN_EXTRACTION, device=device).labels) > 0
        baseline_mask = array(classical_brain_mask(image)) > 0
        key = f"brain_dice_{name}"
        results[key] = dice(model_mask, reference)
        results[f"baseline_{key}"] = dice(baseline_mask, reference)
        print(f"{key}: model {results[key]:.4f}  baseline {results['baseline_' + key]:.4f}")


def evaluate_tissue(device: str | None, results: dict[str, float]) -> None:
    names = {1: "csf", 2: "gm", 3: "wm"}
    for suffix, (image, reference_image, t2) in tissue_cases().items():
        reference = array(reference_image)
        predicted = array(segment(image, BRAIN_TISSUE, device=device).labels)
        baseline = baseline_tissue(image, t2)
        for value, tissue in names.items():
            if suffix and tissue == "csf":
                continue  # the issue names CSF on the plain variant only
            key = f"{tissue}_dice{suffix}"
            results[key] = dice(predicted == value, reference == value)
            results[f"baseline_{key}"] = dice(baseline == value, reference == value)
            print(f"{key}: model {results[key]:.4f}  baseline {results['baseline_' + key]:.4f}")


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
    "csf_dice": "MNI152 with held-out deformation + contrast seed (training anatomy)",
    "gm_dice": "MNI152 with held-out deformation + contrast seed (training anatomy)",
    "wm_dice": "MNI152 with held-out deformation + contrast seed (training anatomy)",
    "gm_dice_t2like": "MNI152, held-out deformation seed, T2-like (training anatomy)",
    "wm_dice_t2like": "MNI152, held-out deformation seed, T2-like (training anatomy)",
    "gm_dice_thick": "MNI152, held-out seeds, 1x1x3 mm thick slices (training anatomy)",
    "wm_dice_thick": "MNI152, held-out seeds, 1x1x3 mm thick slices (training anatomy)",
}
COMMAND = "python Testing/benchmarks/eval_segmentation.py --write-docs Docs/evaluation-segmentation.md --update-cards"


def update_cards(results: dict[str, float]) -> None:
    """Write the held-out figures into the bundled models' cards (metrics are not hashed)."""
    from deepmri.models import ModelStore

    store = ModelStore()
    for model_id, prefix in ((BRAIN_EXTRACTION, "brain_"), (BRAIN_TISSUE, ("csf_", "gm_", "wm_"))):
        model = store.get(model_id)
        model.card.metrics = [
            {
                "name": key,
                "value": round(value, 4),
                "baseline": round(results[f"baseline_{key}"], 4),
                "dataset": DATASETS[key],
                "command": COMMAND,
            }
            for key, value in results.items()
            if key.startswith(prefix)
        ]
        model.card.save(model.path)


def markdown_table(results: dict[str, float], command: str) -> str:
    rows = [
        "| figure | model | baseline |",
        "|---|---|---|",
    ]
    for key, value in results.items():
        if key.startswith("baseline_") or key in ("seconds_cpu_1mm", "peak_mem_mb"):
            continue
        baseline = results.get(f"baseline_{key}")
        rows.append(f"| {key} | {value:.4f} | {baseline:.4f} |")
    rows.append(f"| seconds_cpu_1mm | {results['seconds_cpu_1mm']:.1f} | |")
    rows.append(f"| peak_mem_mb | {results['peak_mem_mb']:.0f} | |")
    return "## Results\n\nReproduce with:\n\n```\n" + command + "\n```\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--write-docs", type=Path, default=None, help="markdown file to write")
    parser.add_argument(
        "--update-cards", action="store_true", help="write the figures into the bundled cards"
    )
    arguments = parser.parse_args(argv)
    if not data.colin27_available():
        print("Colin27 is missing: apt-get install -y mricron-data", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    results: dict[str, float] = {}
    evaluate_brain(arguments.device, results)
    evaluate_tissue(arguments.device, results)
    measure_speed(arguments.device, results)
    if arguments.write_docs:
        arguments.write_docs.write_text(markdown_table(results, COMMAND))
    if arguments.update_cards:
        update_cards(results)
    print(json.dumps({key: round(value, 4) for key, value in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

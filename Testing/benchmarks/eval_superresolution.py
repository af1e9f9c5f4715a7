"""Held-out evaluation of super-resolution: Colin27 degraded through-plane, restored, compared to itself.

Colin27 at 1 mm and at 0.5 mm (`ch2better`, a central crop to stay within a CPU budget) are made
into thick-slice scans along z at 4x and 6x with a Gaussian profile (FWHM = spacing, contiguous)
and with a rectangular profile with a gap (thickness 3/4 of the spacing), restored by the
self-supervised per-volume method (budget mode), the pretrained 3D model (trained on MNI152 and
the pydeface head only), cubic B-spline and windowed sinc in the same run, and compared to the
original inside the head (PSNR, SSIM: MONAI). Colin27 is never used to train or tune anything.
Each method is told the acquisition as a user would (`slice_thickness` and `profile`, the
profile's shape); `--assume-gaussian` tells only the thickness (the evaluations up to 0.3.0).
Also the brain-tissue model's Dice on the restored vs the original volume. Last line: JSON; the
unprefixed keys (psnr_4x, ...) are the pretrained model's.

    python Testing/benchmarks/eval_superresolution.py [--budget quick] [--threads 1] \
        [--model thick-to-thin-3d] [--figure Docs/images/superresolution-colin27-4x.png]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from deepmri import data
from deepmri.superres import SSLSettings, superresolve
from deepmri.superres.profile import simulate_thick_slices
from deepmri.superres.settings import settings_for_budget
from monai.metrics import PSNRMetric
from monai.metrics.regression import compute_ssim_and_cs

FACTORS = (4, 6)
# (name, profile shape, thickness as a share of the slice spacing)
PROFILES = (("gaussian", "gaussian", 1.0), ("rect-gap", "rect", 0.75))
# (volume, factor, profile) evaluated: the full grid needs about 3x the CPU this ran with, so
# the rectangular profile with a gap is run at 4x on the 1 mm volume only.
CASES = (
    ("colin27-1mm", 4, "gaussian"),
    ("colin27-1mm", 4, "rect-gap"),
    ("colin27-1mm", 6, "gaussian"),
    ("colin27-0.5mm", 4, "gaussian"),
    ("colin27-0.5mm", 6, "gaussian"),
)
METHODS = ("cubic", "sinc", "ssl", "pretrained")
SSIM_KERNEL = 11  # MONAI's SSIMMetric defaults: 11-voxel Gaussian window, sigma 1.5


def evaluation_volumes(crop_half_mm: bool = True) -> dict[str, sitk.Image]:
    """Colin27 1 mm (z cut to a multiple of 12 slices) and a central crop of the 0.5 mm one."""
    colin = one_mm_case(data.load_colin27("t1"))
    fine = sitk.Cast(data.load_colin27("t1_0.5mm"), sitk.sitkFloat32)
    if crop_half_mm:
        # 80 x 96 x 60 mm around the middle of the brain (3.7 M voxels).
        size = (160, 192, 120)
        start = [(full - part) // 2 for full, part in zip(fine.GetSize(), size, strict=True)]
        start[2] += 20  # the 0.5 mm field of view reaches far below the brain
        fine = sitk.RegionOfInterest(fine, size, start)
    return {"colin27-1mm": colin, "colin27-0.5mm": fine}


def one_mm_case(image: sitk.Image) -> sitk.Image:
    """A 1 mm head as the evaluation scores it: float, z cut to a multiple of 12 slices (both
    factors divide it), the air around the head cropped in-plane."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    return _head_box(image[:, :, : image.GetSize()[2] // 12 * 12])


def _head_box(image: sitk.Image, margin: int = 4) -> sitk.Image:
    """Crop the air around the head in-plane (the through-plane axis is kept whole)."""
    head = head_mask(image)
    i = np.flatnonzero(head.any(axis=(0, 1)))
    j = np.flatnonzero(head.any(axis=(0, 2)))
    start = [max(int(i[0]) - margin, 0), max(int(j[0]) - margin, 0), 0]
    stop = [
        min(int(i[-1]) + margin + 1, image.GetSize()[0]),
        min(int(j[-1]) + margin + 1, image.GetSize()[1]),
        image.GetSize()[2],
    ]
    return sitk.RegionOfInterest(image, [b - a for a, b in zip(start, stop, strict=True)], start)


def head_mask(image: sitk.Image) -> np.ndarray:
    """The head (or, in the crop, the tissue): Otsu foreground, closed, holes filled."""
    foreground = sitk.OtsuThreshold(image, 0, 1)
    closed = sitk.BinaryMorphologicalClosing(foreground, [3, 3, 3])
    return sitk.GetArrayFromImage(sitk.BinaryFillhole(closed)) > 0


def psnr(restored: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    metric = PSNRMetric(max_val=data_range)
    values = metric(
        torch.from_numpy(restored[mask])[None, None], torch.from_numpy(truth[mask])[None, None]
    )
    return float(values.mean())


def ssim(restored: np.ndarray, truth: np.ndarray, mask: np.ndarray, data_range: float) -> float:
    """MONAI's SSIM (11-pixel Gaussian window, sigma 1.5) on every sagittal slice, the
    through-plane view, averaged over the windows centred inside the mask. (In 2D: a 3D window
    costs 11x more, too much for the shared CPU this ran on.)"""
    # Arrays are (k, j, i): sagittal slices are (k, j) at fixed i; they form the batch.
    ssim_map, _ = compute_ssim_and_cs(
        torch.from_numpy(np.ascontiguousarray(restored.transpose(2, 0, 1)))[:, None],
        torch.from_numpy(np.ascontiguousarray(truth.transpose(2, 0, 1)))[:, None],
        spatial_dims=2,
        kernel_size=[SSIM_KERNEL] * 2,
        kernel_sigma=[1.5] * 2,
        data_range=data_range,
    )
    half = SSIM_KERNEL // 2
    inner = mask.transpose(2, 0, 1)[:, half:-half, half:-half]
    return float(ssim_map[:, 0].numpy()[inner].mean())


def run_case(
    truth: sitk.Image,
    factor: int,
    profile: tuple[str, str, float],
    settings: SSLSettings,
    methods: tuple[str, ...] = METHODS,
    model: str | None = None,
    tell_profile: bool = True,
) -> tuple[dict[str, float], dict[str, sitk.Image]]:
    name, shape, share = profile
    step = truth.GetSpacing()[2] * factor
    thickness = share * step
    thick = simulate_thick_slices(truth, step, thickness=thickness, shape=shape)
    truth_array = sitk.GetArrayFromImage(truth)
    mask = head_mask(truth)
    data_range = float(truth_array.max() - truth_array.min())
    row: dict[str, float] = {}
    images = {"thick": thick}
    for method in methods:
        started = time.monotonic()
        # Spacing and thickness are in the header; the profile's shape is the user's option
        # (without it the methods assume a Gaussian).
        result = superresolve(
            thick,
            factor=factor,
            method=method,
            settings=settings,
            slice_thickness=thickness,
            model=model,
            **({"profile": shape} if tell_profile else {}),
        )
        seconds = time.monotonic() - started
        restored = result.image
        if restored.GetSize() != truth.GetSize() or not np.allclose(
            restored.GetOrigin(), truth.GetOrigin(), atol=1e-6
        ):
            raise RuntimeError(f"{method} output grid differs from the truth grid")
        values = sitk.GetArrayFromImage(restored)
        row[f"{method}_psnr"] = psnr(values, truth_array, mask, data_range)
        row[f"{method}_ssim"] = ssim(values, truth_array, mask, data_range)
        row[f"{method}_seconds"] = seconds
        if method == "ssl":
            row["ssl_steps"] = result.info["training_steps"]
        images[method] = restored
        print(
            f"  {name} {factor}x {method:10s} PSNR {row[f'{method}_psnr']:.2f} dB  "
            f"SSIM {row[f'{method}_ssim']:.4f}  {seconds:.0f} s",
            flush=True,
        )
    return row, images


def measure_budget_mode(truth: sitk.Image, budget: str, seed: int) -> dict[str, float]:
    """The budget mode as a user runs it (steps chosen from the seconds): Colin27 1 mm, 4x."""
    thick = simulate_thick_slices(truth, 4 * truth.GetSpacing()[2])
    started = time.monotonic()
    messages: list[str] = []
    result = superresolve(
        thick,
        factor=4,
        settings=replace(settings_for_budget(budget), seed=seed),
        progress=lambda fraction, message: messages.append(message),
    )
    seconds = time.monotonic() - started
    estimate = next((message for message in messages if "will take about" in message), "")
    print(f"  budget mode ({budget}): {seconds:.0f} s; said: {estimate}", flush=True)
    truth_array = sitk.GetArrayFromImage(truth)
    mask = head_mask(truth)
    data_range = float(truth_array.max() - truth_array.min())
    values = sitk.GetArrayFromImage(result.image)
    return {
        "seconds_cpu_ssl_budget": round(seconds, 1),
        "ssl_budget_steps": result.info["training_steps"],
        "ssl_budget_psnr_4x_colin27_1mm": round(psnr(values, truth_array, mask, data_range), 3),
        "ssl_budget_input_size": "x".join(str(size) for size in thick.GetSize()),
    }


def speed_input() -> sitk.Image:
    """The speed figure's input: Colin27 in a 256x256x160 box at 1 mm, made 1x1x4 mm (256x256x40)."""
    colin = sitk.Cast(data.load_colin27("t1"), sitk.sitkFloat32)
    size = np.array([256, 256, 160])
    centre = colin.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in colin.GetSize()])
    direction = np.asarray(colin.GetDirection()).reshape(3, 3)
    grid = sitk.Image([int(n) for n in size], sitk.sitkFloat32)
    grid.SetDirection(colin.GetDirection())
    grid.SetOrigin([float(v) for v in np.asarray(centre) - direction @ ((size - 1) / 2.0)])
    padded = sitk.Resample(colin, grid, sitk.Transform(), sitk.sitkLinear, 0.0)
    return simulate_thick_slices(padded, 4.0)


def measure_pretrained_speed(model: str | None) -> dict[str, float]:
    """Seconds of the pretrained method on a 256x256x40 input (1x1x4 mm, to 256x256x160)."""
    thick = speed_input()
    started = time.monotonic()
    superresolve(thick, factor=4, method="pretrained", model=model)
    seconds = time.monotonic() - started
    print(f"  pretrained on {thick.GetSize()}: {seconds:.1f} s", flush=True)
    return {
        "seconds_cpu_pretrained": round(seconds, 1),
        "pretrained_speed_input_size": "x".join(str(size) for size in thick.GetSize()),
    }


def tissue_dice_gain(truth: sitk.Image, restored: dict[str, sitk.Image]) -> dict[str, float]:
    """Mean Dice (CSF, GM, WM) of the brain-tissue model on each restored volume vs on the truth."""
    from deepmri.tasks.segment import BRAIN_TISSUE, segment

    reference = sitk.GetArrayFromImage(segment(truth, BRAIN_TISSUE, device="cpu").labels)
    scores = {}
    for method in [name for name in ("cubic", "ssl", "pretrained") if name in restored]:
        labels = sitk.GetArrayFromImage(
            segment(restored[method], BRAIN_TISSUE, device="cpu").labels
        )
        per_class = []
        for value in (1, 2, 3):
            a, b = reference == value, labels == value
            per_class.append(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))
        scores[method] = float(np.mean(per_class))
    print(
        "  tissue Dice at 4x: " + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()), flush=True
    )
    result = {f"tissue_dice_{method}_4x": value for method, value in scores.items()}
    best = "pretrained" if "pretrained" in scores else "ssl"
    if best in scores and "cubic" in scores:
        result["tissue_dice_gain_4x"] = scores[best] - scores["cubic"]
        result["tissue_dice_gain_4x_method"] = best
    if "ssl" in scores and "cubic" in scores:
        result["tissue_dice_gain_4x_ssl"] = scores["ssl"] - scores["cubic"]
    return result


def _zoom(view: np.ndarray) -> np.ndarray:
    """The middle third of a slice, rows and columns: enough to see single thick slices."""
    rows, cols = view.shape
    return view[rows // 3 : 2 * rows // 3, cols // 3 : 2 * cols // 3]


def render(images: dict[str, sitk.Image], truth: sitk.Image, path: Path, title: str) -> None:
    """Thick input (nearest), cubic, ours, truth in rows; mid-sagittal, coronal, axial, lowest."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    thick_on_grid = sitk.Resample(
        images["thick"], truth, sitk.Transform(), sitk.sitkNearestNeighbor
    )
    rows = {"thick input": thick_on_grid, "cubic B-spline": images["cubic"]}
    if "ssl" in images:
        rows["self-supervised"] = images["ssl"]
    if "pretrained" in images:
        rows["pretrained 3D"] = images["pretrained"]
    rows["truth"] = truth
    high = float(np.percentile(sitk.GetArrayViewFromImage(truth), 99.5))
    spacing = truth.GetSpacing()
    figure, axes = plt.subplots(len(rows), 5, figsize=(16, 3.2 * len(rows)))
    for row, (label, image) in enumerate(rows.items()):
        volume = sitk.GetArrayFromImage(image)
        k, j, i = (size // 2 for size in volume.shape)
        views = [
            (volume[::-1, :, i], spacing[2] / spacing[1], "mid-sagittal"),
            (volume[::-1, j, :], spacing[2] / spacing[0], "coronal"),
            (volume[k], spacing[1] / spacing[0], "axial (middle)"),
            (volume[2], spacing[1] / spacing[0], "axial (lowest but two)"),
            (_zoom(volume[::-1, :, i]), spacing[2] / spacing[1], "mid-sagittal, zoomed"),
        ]
        for column, (view, aspect, name) in enumerate(views):
            axis = axes[row, column]
            axis.imshow(view, cmap="gray", vmin=0, vmax=high, aspect=aspect, interpolation="none")
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(name)
            if column == 0:
                axis.set_ylabel(label)
    figure.suptitle(title)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", default="quick", help="ssl budget: quick|standard|best|seconds")
    parser.add_argument(
        "--steps",
        type=int,
        default=300,
        help="fixed training steps of the budget's network, so the numbers do not depend on how "
        "busy the machine is (0: as many as the budget's seconds allow)",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=None, help="PNG of the 1 mm 4x case")
    parser.add_argument("--skip-dice", action="store_true", help="leave out the tissue Dice")
    parser.add_argument("--volumes", nargs="*", default=None, help="a subset, for a quick look")
    parser.add_argument("--factors", nargs="*", type=int, default=list(FACTORS))
    parser.add_argument("--profiles", nargs="*", default=[name for name, _, _ in PROFILES])
    parser.add_argument("--methods", nargs="*", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--model", default=None, help="pretrained model id or folder (default: the shipped one)"
    )
    parser.add_argument(
        "--assume-gaussian",
        action="store_true",
        help="tell the methods the slice thickness only, not the profile's shape",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    settings = replace(
        settings_for_budget(args.budget), iterations=args.steps or None, seed=args.seed
    )
    started = time.monotonic()
    load_before = os.getloadavg()[0]
    cases = []
    extras: dict[str, float | None] = {}
    for volume_name, truth in evaluation_volumes().items():
        if args.volumes and volume_name not in args.volumes:
            continue
        print(f"{volume_name}: {truth.GetSize()} at {truth.GetSpacing()} mm", flush=True)
        for case_volume, factor, profile_name in CASES:
            profile = next(p for p in PROFILES if p[0] == profile_name)
            if case_volume != volume_name or factor not in args.factors:
                continue
            if profile_name not in args.profiles:
                continue
            row, images = run_case(
                truth,
                factor,
                profile,
                settings,
                tuple(args.methods),
                args.model,
                tell_profile=not args.assume_gaussian,
            )
            row.update(volume=volume_name, factor=factor, profile=profile[0])
            cases.append(row)
            first_case = volume_name == "colin27-1mm" and factor == 4
            if first_case and profile[0] == "gaussian":
                if args.figure is not None:
                    render(
                        images,
                        truth,
                        args.figure,
                        "Colin27 1 mm, 4x through-plane (Gaussian profile): "
                        + ", ".join(
                            f"{method} {row[f'{method}_psnr']:.2f} dB" for method in args.methods
                        ),
                    )
                if not args.skip_dice:
                    extras.update(tissue_dice_gain(truth, images))
    budget_mode = {}
    if "ssl" in args.methods:
        budget_mode = measure_budget_mode(
            evaluation_volumes()["colin27-1mm"], args.budget, args.seed
        )
    summary: dict[str, object] = {}
    for factor in args.factors:
        subset = [case for case in cases if case["factor"] == factor]
        for method in args.methods:
            prefix = "" if method == "pretrained" else f"{method}_"
            for metric in ("psnr", "ssim"):
                summary[f"{prefix}{metric}_{factor}x"] = round(
                    min(case[f"{method}_{metric}"] for case in subset), 4
                )
            if method in ("ssl", "pretrained"):
                summary[f"{method}_minus_cubic_psnr_{factor}x_min"] = round(
                    min(case[f"{method}_psnr"] - case["cubic_psnr"] for case in subset), 3
                )
                summary[f"{method}_minus_cubic_ssim_{factor}x_min"] = round(
                    min(case[f"{method}_ssim"] - case["cubic_ssim"] for case in subset), 4
                )
    if "pretrained" in args.methods:
        at_4x = [case for case in cases if case["factor"] == 4]
        summary["pretrained_4x_target_met"] = all(
            case["pretrained_psnr"] >= case["cubic_psnr"] + 2.0
            and case["pretrained_ssim"] > case["cubic_ssim"]
            for case in at_4x
        )
        summary.update(measure_pretrained_speed(args.model))
    else:
        for key in ("psnr_4x", "ssim_4x", "psnr_6x", "ssim_6x", "seconds_cpu_pretrained"):
            summary[key] = None
    summary.update(budget_mode)
    if "ssl" in args.methods:
        ssl_runs = [case["ssl_seconds"] for case in cases]
        summary["seconds_cpu_ssl_fixed_steps_max"] = round(max(ssl_runs), 1)
    summary.update(
        {
            key: round(value, 4) if isinstance(value, float) else value
            for key, value in extras.items()
        }
    )
    summary.update(
        profile_told=not args.assume_gaussian,
        budget=args.budget,
        steps=args.steps,
        network={"width": settings.width, "depth": settings.depth},
        threads=args.threads,
        load_average=[round(load_before, 1), round(os.getloadavg()[0], 1)],
        cpu=platform.processor() or platform.machine(),
        seconds_total=round(time.monotonic() - started, 1),
        cases=[
            {key: round(v, 4) if isinstance(v, float) else v for key, v in case.items()}
            for case in cases
        ],
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

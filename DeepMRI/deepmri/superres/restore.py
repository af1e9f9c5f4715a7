"""Thick-slice MRI to thin slices: the one entry point for every super-resolution method.

`superresolve` finds the through-plane axis from the spacing, builds the output grid on the input's
physical extent, and runs the chosen method: "ssl" (self-supervised per volume, no weights),
"pretrained" (the shipped 3D thick-to-thin network, `deepmri.train.superresolve`), or the
interpolation baselines "cubic" (B-spline) and "sinc" (Hamming-windowed sinc).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.superres.grid import (
    Grid,
    interpolate_along,
    output_grid,
    resample_onto,
    target_spacing,
    thick_axis,
)
from deepmri.superres.profile import SliceProfile, apply_along, cubic_matrix
from deepmri.superres.settings import (
    METHODS,
    PRETRAINED_MODEL,
    SSLSettings,
    settings_for_budget,
)
from deepmri.superres.ssl import (
    PatchSampler,
    ResidualSRNet,
    apply_through_plane,
    estimate_apply_seconds,
    train_network,
    training_stacks,
)
from deepmri.validation import validate_image

_AXIS_NAMES = ("i", "j", "k")


@dataclass
class SuperResolution:
    """The restored volume (float32, on the output grid), its uncertainty if made, and provenance."""

    image: sitk.Image
    uncertainty: sitk.Image | None
    factor: float
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)


def superresolve(
    image: sitk.Image,
    *,
    spacing: Sequence[float] | None = None,
    factor: float | None = None,
    method: str = "ssl",
    budget: str | float = "quick",
    slice_thickness: float | None = None,
    slice_gap: float | None = None,
    profile: str = "gaussian",
    settings: SSLSettings | None = None,
    device: Any = None,
    uncertainty: bool = False,
    model: str | None = None,
    finetune_steps: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> SuperResolution:
    """Restore thin slices of a thick-slice volume; the input is never modified.

    `spacing` (mm, i/j/k order) or `factor` (thick-axis spacing divided by it) sets the output
    grid; by default the thick axis takes the in-plane spacing. The output covers the input's
    physical extent (see `deepmri.superres.grid`) and stays within the input's intensity range.
    `slice_thickness` / `slice_gap` (mm) describe the acquisition when slices were not
    contiguous; `profile` is the assumed slice profile ("gaussian" with FWHM = thickness, or
    "rect"). For "ssl", `budget` ("quick", "standard", "best" or seconds) sizes the training, or
    `settings` fixes it exactly. "pretrained" loads `model` (an id in the model store or a model
    folder; default `PRETRAINED_MODEL`); its uncertainty is the spread over in-plane flips.
    `finetune_steps` > 0 first fine-tunes it on the volume's own in-plane detail (the per-volume
    training started from the pretrained network; `deepmri.superres.finetune`, seeded by
    `settings.seed`).

    Examples:
        >>> result = superresolve(thick_t1, factor=4, budget="quick")  # doctest: +SKIP
        >>> result.image.GetSpacing()  # doctest: +SKIP
        (1.0, 1.0, 1.0)
    """
    started = time.monotonic()
    progress = progress or no_progress
    if method not in METHODS:
        raise DeepMRIError(
            f"Unknown super-resolution method '{method}'; choose one of {', '.join(METHODS)}."
        )
    validate_image(image)
    axis = thick_axis(image)
    asked = target_spacing(image, axis, spacing, factor)
    grid = output_grid(image, asked)
    thick_spacing = image.GetSpacing()[axis]
    slices = SliceProfile.from_header(thick_spacing, slice_thickness, slice_gap, profile)
    low, high = _value_range(image)
    info: dict[str, Any] = {
        "method": method,
        "thick_axis": _AXIS_NAMES[axis],
        "input_spacing": list(image.GetSpacing()),
        "output_spacing": list(grid.spacing),
        "output_size": list(grid.size),
        "slice_profile": {
            "shape": slices.shape,
            "thickness_mm": slices.thickness,
            "gap_mm": slices.gap,
        },
    }
    spread = None
    if method in ("cubic", "sinc"):
        check_cancel(cancel)
        progress(0.1, f"Interpolating ({method}) onto {_grid_text(grid)}")
        restored = _clip(_interpolate(image, grid, axis, method), low, high)
    elif method == "pretrained":
        from deepmri.superres.finetune import FinetuneSettings

        tuning = None
        if finetune_steps > 0:
            seed = settings.seed if settings is not None else 0
            tuning = FinetuneSettings(steps=int(finetune_steps), seed=seed)
        restored, spread, details = _pretrained(
            image, axis, grid, slices, model, device, uncertainty, progress, cancel, tuning
        )
        info.update(details)
    else:
        settings = settings or settings_for_budget(budget)
        restored, spread, details = _self_supervised(
            image, axis, grid, slices, settings, device, progress, cancel
        )
        info.update(details)
        if not uncertainty:
            spread = None
    seconds = time.monotonic() - started
    out_factor = thick_spacing / grid.spacing[axis]
    info["description"] = _description(method, image, grid, out_factor, info)
    progress(1.0, f"Super-resolution finished in {seconds:.0f} s")
    return SuperResolution(restored, spread, out_factor, seconds, info)


def _self_supervised(
    image: sitk.Image,
    axis: int,
    grid: Grid,
    slices: SliceProfile,
    settings: SSLSettings,
    device: Any,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> tuple[sitk.Image, sitk.Image, dict[str, Any]]:
    from deepmri import engine

    started = time.monotonic()
    torch_device = engine.select_device(device)
    low, high = _value_range(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # a copy: the input stays as it is
    offset, scale = _normalisation(array)
    volume = (array - offset) / scale
    thick = 2 - axis  # array axes are (k, j, i)
    spacing = tuple(float(value) for value in image.GetSpacing()[::-1])

    # The network runs where the thick axis has the in-plane spacing: pixels as in training.
    working = _working_grid(image, axis)
    cubic = apply_along(volume, _thick_cubic_matrix(image, axis, working), thick)

    check_cancel(cancel)
    progress(0.01, "Making training pairs from the in-plane detail")
    stacks = training_stacks(volume, thick, spacing, slices, foreground=0.1)
    sampler = PatchSampler(stacks, settings.patch, settings.seed)
    probe = ResidualSRNet(settings.width, settings.depth).to(torch_device)
    apply_estimate = estimate_apply_seconds(probe, cubic.shape, thick, settings.flips, torch_device)
    spent = time.monotonic() - started
    train_seconds = max(
        settings.budget_seconds - apply_estimate - spent, 0.25 * settings.budget_seconds
    )
    planned = (
        f"{settings.iterations} steps"
        if settings.iterations
        else f"about {spent + train_seconds + apply_estimate:.0f} s in all"
    )
    progress(
        0.03,
        f"Training a {settings.depth}-layer network on the volume itself ({torch_device}): "
        f"{planned}",
    )
    network, training = train_network(
        sampler,
        settings,
        torch_device,
        train_seconds,
        apply_estimate,
        sub_progress(progress, 0.03, 0.8),
        cancel,
    )
    mean, spread = apply_through_plane(
        network,
        cubic,
        thick,
        torch_device,
        settings.flips,
        sub_progress(progress, 0.8, 0.98),
        cancel,
    )
    check_cancel(cancel)
    restored = _clip(working.image(mean * scale + offset), low, high)
    spread_image = working.image(spread * scale)
    if working != grid:
        restored = _clip(_interpolate(restored, grid, axis, "cubic"), low, high)
        spread_image = resample_onto(spread_image, grid, "linear")
    details = {
        "device": str(torch_device),
        "network": {"width": settings.width, "depth": settings.depth},
        "training_steps": int(training["steps"]),
        "training_seconds": round(training["train_seconds"], 1),
        "training_loss_first": round(training["first_loss"], 5),
        "training_loss_last": round(training["final_loss"], 5),
        "passes": 4 if settings.flips else 2,
        "seed": settings.seed,
    }
    return restored, spread_image, details


def _working_grid(image: sitk.Image, axis: int) -> Grid:
    """The input's extent with the thick axis at the mean in-plane spacing: where networks run."""
    in_plane = [value for index, value in enumerate(image.GetSpacing()) if index != axis]
    working_spacing = list(image.GetSpacing())
    working_spacing[axis] = float(np.mean(in_plane))
    return output_grid(image, working_spacing)


def _pretrained_passes(inference: dict[str, Any], uncertainty: bool) -> list[tuple[int, ...]]:
    """The passes of the pretrained network as array axes of the thick-axis-first volume: the
    plain pass, then the card's in-plane flips (tensor dims 3, 4 -> axes 1, 2) when the
    uncertainty map is asked for or the card averages them (`average_flips`)."""
    from deepmri.models.card import flips_to_run

    flipped = flips_to_run(inference, uncertainty)
    return [(), *(tuple(dim - 2 for dim in flip) for flip in flipped)]


def _pretrained(
    image: sitk.Image,
    axis: int,
    grid: Grid,
    slices: SliceProfile,
    model: str | None,
    device: Any,
    uncertainty: bool,
    progress: ProgressCallback,
    cancel: CancelLike | None,
    tuning: Any = None,
) -> tuple[sitk.Image, sitk.Image | None, dict[str, Any]]:
    """The pretrained 3D network on the cubic interpolation, thick axis first, in voxel units.

    `tuning` (`FinetuneSettings`): fine-tune it on this volume first.
    """
    import torch

    from deepmri import engine
    from deepmri.models.store import ModelStore
    from deepmri.superres.net3d import (
        PROFILE_INPUT_CHANNELS,
        apply_network,
        condition_channels,
    )

    check_cancel(cancel)
    torch_device = engine.select_device(device)
    found = ModelStore().get(model or PRETRAINED_MODEL)
    network = found.load_network(torch_device)
    if torch_device.type == "cpu":
        network = network.to(memory_format=torch.channels_last_3d)
    low, high = _value_range(image)
    array = sitk.GetArrayFromImage(image).astype(np.float32)  # a copy: the input stays as it is
    offset, scale = _normalisation(array)
    working = _working_grid(image, axis)
    thick = 2 - axis  # array axes are (k, j, i)
    cubic = apply_along((array - offset) / scale, _thick_cubic_matrix(image, axis, working), thick)
    # Slice spacing, thickness and the first slice centre in working voxels (voxel v: v + 0.5).
    step, new_step = image.GetSpacing()[axis], working.spacing[axis]
    first = (image.GetSize()[axis] * step - working.size[axis] * new_step) / 2.0
    channels = condition_channels(
        working.size[axis],
        step / new_step,
        slices.thickness / new_step,
        (step / 2 - first) / new_step,
        # a network trained with the profile's shape as an input is told it (0.4.0 on)
        slices.shape if getattr(network, "in_channels", 0) == PROFILE_INPUT_CHANNELS else None,
    )
    tuned: dict[str, Any] = {}
    applying = 0.05
    if tuning is not None:
        from deepmri.superres.finetune import finetune_network

        progress(0.05, f"Fine-tuning the pretrained model '{found.card.id}' on this volume")
        applying = 0.6
        network, tuned = finetune_network(
            network,
            np.moveaxis(cubic, thick, 0),
            spacing=step / new_step,
            thickness=slices.thickness / new_step,
            shape=slices.shape,
            settings=tuning,
            device=torch_device,
            progress=sub_progress(progress, 0.05, applying),
            cancel=cancel,
        )
        if torch_device.type == "cpu":
            network = network.to(memory_format=torch.channels_last_3d)
    progress(applying, f"Applying the pretrained model '{found.card.id}' ({torch_device})")
    flips = _pretrained_passes(found.card.inference, uncertainty)
    mean, spread = apply_network(
        network,
        np.moveaxis(cubic, thick, 0),
        channels,
        torch_device,
        flips,
        sub_progress(progress, applying, 0.95),
        cancel,
    )
    mean, spread = np.moveaxis(mean, 0, thick), np.moveaxis(spread, 0, thick)
    check_cancel(cancel)
    restored = _clip(working.image(np.ascontiguousarray(mean) * scale + offset), low, high)
    spread_image = working.image(np.ascontiguousarray(spread) * scale) if uncertainty else None
    if working != grid:
        restored = _clip(_interpolate(restored, grid, axis, "cubic"), low, high)
        if spread_image is not None:
            spread_image = resample_onto(spread_image, grid, "linear")
    factors = found.card.training.get("recipe", {}).get("factors") or []
    details: dict[str, Any] = {
        "device": str(torch_device),
        "model": found.card.id,
        "model_version": found.card.version,
        "passes": len(flips),
        "slice_spacing_voxels": round(step / new_step, 4),
        "profile_told": getattr(network, "in_channels", 0) == PROFILE_INPUT_CHANNELS,
        **tuned,
    }
    if factors and not min(factors) <= step / new_step <= max(factors):
        details["warning"] = (
            f"slices {step / new_step:.3g} in-plane voxels apart: the model was trained on "
            f"{min(factors)} to {max(factors)}"
        )
    return restored, spread_image, details


def _interpolate(image: sitk.Image, grid: Grid, axis: int, method: str) -> sitk.Image:
    """SimpleITK's interpolation onto `grid`, along the thick axis only where that is all."""
    source = Grid.of(image)
    others = [index for index in range(3) if index != axis]
    if all(source.size[i] == grid.size[i] and source.spacing[i] == grid.spacing[i] for i in others):
        return interpolate_along(image, grid, axis, method)
    return resample_onto(image, grid, method)


def _thick_cubic_matrix(image: sitk.Image, axis: int, working: Grid) -> np.ndarray:
    """Cubic B-spline interpolation along the thick axis, from the slice centres to `working`."""
    count, step = image.GetSize()[axis], image.GetSpacing()[axis]
    new_count, new_step = working.size[axis], working.spacing[axis]
    centres = (np.arange(count) + 0.5) * step
    first = (count * step - new_count * new_step) / 2.0
    positions = first + (np.arange(new_count) + 0.5) * new_step
    return cubic_matrix(centres, step, positions)


def _normalisation(array: np.ndarray) -> tuple[float, float]:
    """Offset and scale that put the background at 0 and bright tissue near 1."""
    low = float(array.min())
    high = float(np.percentile(array, 99.5))
    if high <= low:
        high = float(array.max())
    return low, max(high - low, 1e-6)


def _value_range(image: sitk.Image) -> tuple[float, float]:
    values = sitk.GetArrayViewFromImage(image)
    return float(values.min()), float(values.max())


def _clip(image: sitk.Image, low: float, high: float) -> sitk.Image:
    return sitk.Clamp(sitk.Cast(image, sitk.sitkFloat32), sitk.sitkFloat32, low, high)


def _grid_text(grid: Grid) -> str:
    size = "x".join(str(value) for value in grid.size)
    spacing = " x ".join(f"{value:g}" for value in grid.spacing)
    return f"{size} voxels of {spacing} mm"


def _description(
    method: str, image: sitk.Image, grid: Grid, factor: float, info: dict[str, Any]
) -> str:
    spacing_in = " x ".join(f"{value:g}" for value in image.GetSpacing())
    names = {
        "ssl": "self-supervised per-volume super-resolution (SMORE-like, no external training data)",
        "pretrained": "pretrained 3D thick-to-thin network",
        "cubic": "cubic B-spline interpolation",
        "sinc": "windowed-sinc interpolation",
    }
    profile = info["slice_profile"]
    text = (
        f"{names[method]}: {spacing_in} mm to {_grid_text(grid)} (factor {factor:.3g} along "
        f"{info['thick_axis']}), same physical extent; slice profile {profile['shape']}, "
        f"thickness {profile['thickness_mm']:g} mm, gap {profile['gap_mm']:g} mm"
    )
    if method == "ssl":
        text += f"; {info['training_steps']} training steps on {info['device']}"
    if method == "pretrained":
        text += f" ('{info['model']}' {info['model_version']} on {info['device']})"
    return text

"""Linear registration (rigid, similarity, affine) by Mattes mutual information in SimpleITK.

Centre-of-mass start, coarse-to-fine pyramids and one stage per transform family, so it copes
with large initial offsets, whole-head versus brain-only inputs and different contrasts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError
from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress

LINEAR_METHODS = ("rigid", "similarity", "affine")
T = TypeVar("T")


class RegistrationError(DeepMRIError):
    """The images cannot be registered (no overlap, nothing to align, mismatched inputs)."""


@dataclass(frozen=True)
class _Stage:
    transform: str  # "rigid", "similarity" or "affine"
    spacing_mm: float  # the pyramid level it runs on
    iterations: int


# Coarse levels do the travelling, finer ones the fitting; each stage starts where the one before
# ended, so the affine never has to find the head on its own. The pyramid is made once (smoothed,
# resampled copies), which is several times cheaper than shrinking the 1 mm images at each level.
_STAGES = {
    "rigid": (_Stage("rigid", 6.0, 100), _Stage("rigid", 3.0, 60), _Stage("rigid", 2.0, 30)),
    "similarity": (
        _Stage("rigid", 6.0, 100),
        _Stage("similarity", 3.0, 80),
        _Stage("similarity", 2.0, 40),
    ),
    "affine": (
        _Stage("rigid", 6.0, 100),
        _Stage("similarity", 4.0, 60),
        _Stage("affine", 3.0, 80),
        _Stage("affine", 2.0, 40),
    ),
}


def pyramid_level(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """`image` smoothed (anti-aliased) and resampled to at least `spacing_mm` on every axis."""
    from deepmri.geometry import resample_to_spacing

    # Never coarser than 8 voxels across: small images stay usable (and smoothable).
    spacing = [
        max(value, min(spacing_mm, value * size / 8))
        for value, size in zip(image.GetSpacing(), image.GetSize(), strict=True)
    ]
    if np.allclose(spacing, image.GetSpacing()):
        return image
    sigmas = [
        max(0.5 * np.sqrt(max(target**2 - value**2, 0.0)), 0.01 * value)
        for target, value in zip(spacing, image.GetSpacing(), strict=True)
    ]
    smooth = sitk.SmoothingRecursiveGaussian(image, sigmas)
    return resample_to_spacing(smooth, spacing)


def as_affine(transform: sitk.Transform) -> sitk.AffineTransform:
    """Any SimpleITK linear transform (Euler, similarity, affine) as an `AffineTransform`."""
    matrix = np.asarray(transform.GetMatrix(), dtype=float)
    return sitk.AffineTransform(
        tuple(matrix), tuple(transform.GetTranslation()), tuple(transform.GetCenter())
    )


def _new_transform(kind: str, previous: sitk.Transform) -> sitk.Transform:
    """A transform of `kind` that starts exactly where `previous` left off."""
    center = previous.GetCenter()
    matrix = np.asarray(previous.GetMatrix(), dtype=float).reshape(3, 3)
    translation = previous.GetTranslation()
    if kind == "rigid":
        transform = sitk.Euler3DTransform()
        transform.SetCenter(center)
        transform.SetMatrix(tuple(matrix.ravel()))
        transform.SetTranslation(translation)
        return transform
    if kind == "similarity":
        transform = sitk.Similarity3DTransform()
        transform.SetCenter(center)
        scale = float(np.cbrt(abs(np.linalg.det(matrix))))
        transform.SetMatrix(tuple((matrix / scale).ravel()))
        transform.SetScale(scale)
        transform.SetTranslation(translation)
        return transform
    return sitk.AffineTransform(tuple(matrix.ravel()), translation, center)


def _pyramid(
    fixed: sitk.Image,
    moving: sitk.Image,
    fixed_mask: sitk.Image | None,
    spacings: list[float],
) -> dict[float, tuple[sitk.Image, sitk.Image, sitk.Image | None]]:
    """Fixed, moving and mask at each spacing, finest first, each made from the one before."""
    levels = {}
    previous = (fixed, moving, fixed_mask)
    for spacing in spacings:
        level_fixed = pyramid_level(previous[0], spacing)
        level_moving = pyramid_level(previous[1], spacing)
        level_mask = (
            None
            if fixed_mask is None
            else sitk.Cast(
                sitk.Resample(fixed_mask, level_fixed, sitk.Transform(), sitk.sitkNearestNeighbor),
                sitk.sitkUInt8,
            )
        )
        previous = levels[spacing] = (level_fixed, level_moving, level_mask)
    return levels


def initial_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Euler3DTransform:
    """Rigid start that puts the moving centre of mass on the fixed one (no rotation)."""
    try:
        return sitk.Euler3DTransform(
            sitk.CenteredTransformInitializer(
                fixed,
                moving,
                sitk.Euler3DTransform(),
                sitk.CenteredTransformInitializerFilter.MOMENTS,
            )
        )
    except RuntimeError as error:
        raise RegistrationError(
            "Could not find the centre of the fixed or moving image (is one of them empty?)."
        ) from error


def _on_one_itk_thread(function: Callable[..., T]) -> Callable[..., T]:
    """Run `function` with ITK on one thread, then give ITK back its thread count."""

    @functools.wraps(function)
    def on_one_thread(*args: Any, **kwargs: Any) -> T:
        threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            return function(*args, **kwargs)
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)

    return on_one_thread


@_on_one_itk_thread
def linear_register(
    fixed: sitk.Image,
    moving: sitk.Image,
    method: str = "affine",
    *,
    fixed_mask: sitk.Image | None = None,
    samples: int = 40_000,
    seed: int = 18,
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
) -> sitk.AffineTransform:
    """The linear transform that maps fixed points to moving points (ITK's resampling transform).

    `sitk.Resample(moving, fixed, transform)` puts the moving image on the fixed grid. `method`
    is "rigid", "similarity" or "affine"; `fixed_mask` limits the metric to a region of the fixed
    image (for example its brain when the moving image is a whole head). `samples` fixed voxels,
    drawn at random, estimate the metric at each iteration. They are drawn from `seed`, and ITK
    runs on one thread meanwhile, so the same inputs give the same transform on every run: its
    threaded Mattes MI adds the threads' histograms in the order they finish, so threaded runs
    differ in the last bits and drift apart. The stage costs a few CPU seconds; one thread costs
    it no CPU time. (SimpleITK reads a seed of 0 as "from the wall clock", so 0 is refused.)

    Examples:
        >>> transform = linear_register(fixed, moving, "rigid")  # doctest: +SKIP
        >>> aligned = sitk.Resample(moving, fixed, transform)  # doctest: +SKIP
    """
    if method not in LINEAR_METHODS:
        raise RegistrationError(
            f"Unknown linear method '{method}'; use one of {', '.join(LINEAR_METHODS)}."
        )
    if seed <= 0:
        raise RegistrationError("The sampling seed must be a positive integer (0 means the clock).")
    fixed = sitk.Cast(fixed, sitk.sitkFloat32)
    moving = sitk.Cast(moving, sitk.sitkFloat32)
    transform: sitk.Transform = initial_transform(fixed, moving)
    stages = _STAGES[method]
    total = sum(stage.iterations for stage in stages)
    done = 0
    levels = _pyramid(fixed, moving, fixed_mask, sorted({stage.spacing_mm for stage in stages}))
    for stage in stages:
        check_cancel(cancel)
        level_fixed, level_moving, level_mask = levels[stage.spacing_mm]
        transform = _new_transform(stage.transform, transform)
        registration = sitk.ImageRegistrationMethod()
        registration.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
        registration.SetMetricSamplingStrategy(registration.RANDOM)
        voxels = float(np.prod(level_fixed.GetSize()))
        registration.SetMetricSamplingPercentage(min(1.0, samples / voxels), seed)
        if level_mask is not None:
            registration.SetMetricFixedMask(level_mask)
        registration.SetInterpolator(sitk.sitkLinear)
        # Steps in mm (the scales make one unit of any parameter about 1 mm of motion); the step
        # halves whenever the metric gets worse, down to 0.05 mm, so it ends on a fine fit.
        registration.SetOptimizerAsRegularStepGradientDescent(
            learningRate=stage.spacing_mm / 2,
            minStep=0.05,
            numberOfIterations=stage.iterations,
            relaxationFactor=0.5,
            gradientMagnitudeTolerance=1e-8,
        )
        registration.SetOptimizerScalesFromPhysicalShift()
        registration.SetInitialTransform(transform, inPlace=True)
        counter = {"n": 0, "done": done}

        def on_iteration(registration=registration, counter=counter, stage=stage) -> None:
            counter["n"] += 1
            if cancel is not None and cancel.cancelled:
                registration.StopRegistration()
                return
            fraction = min(1.0, (counter["done"] + counter["n"]) / total)
            progress(fraction, f"{stage.transform} alignment")

        registration.AddCommand(sitk.sitkIterationEvent, on_iteration)
        try:
            registration.Execute(level_fixed, level_moving)
        except RuntimeError as error:
            message = str(error)
            if "outside" in message or "valid points" in message or "samples" in message:
                raise RegistrationError(
                    "The fixed and moving images do not overlap enough to register: check that "
                    "they show the same body part, or align them roughly first."
                ) from error
            raise RegistrationError(
                f"Linear registration failed: {message.strip().splitlines()[-1]}"
            ) from error
        check_cancel(cancel)
        done += stage.iterations
    progress(1.0, "linear alignment done")
    return as_affine(transform)

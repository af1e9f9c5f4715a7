"""Model preprocessing read from a card, as small composable steps shared by training and inference.

A model says in its card how it saw its training data (mask, orientation, spacing, intensity
normalisation); `from_card` turns that into steps that take the input to the model's grid and,
for the geometric ones, back onto the exact input grid afterwards.

Examples:
    >>> import SimpleITK as sitk
    >>> image = sitk.GaussianSource(sitk.sitkFloat32, [20, 20, 10], spacing=[1.0, 1.0, 2.0])
    >>> steps = from_card({"orientation": "RAS", "spacing": [2, 2, 2],
    ...                    "normalization": {"method": "zscore"}})
    >>> on_model_grid, trace = steps(image)
    >>> on_model_grid.GetSpacing()
    (2.0, 2.0, 2.0)
    >>> steps.invert(on_model_grid, trace).GetSize() == image.GetSize()
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import ModelError
from deepmri.geometry import reorient, resample_like, resample_to_spacing
from deepmri.intensity import normalize_percentile

NORMALISATIONS = ("percentile", "zscore", "none")
DEFAULT_NORMALISATION: dict[str, Any] = {"method": "percentile", "lower": 0.5, "upper": 99.5}


@dataclass(frozen=True, eq=False)
class Mask:
    """Zero everything outside `mask` (a 0/1 array on the input's (k, j, i) grid)."""

    mask: np.ndarray
    geometric = False

    def __call__(self, image: sitk.Image) -> sitk.Image:
        masked = sitk.GetImageFromArray(
            (sitk.GetArrayFromImage(image) * self.mask).astype(np.float32)
        )
        masked.CopyInformation(image)
        return masked


@dataclass(frozen=True)
class Reorient:
    """Permute/flip the axes to `orientation` (no interpolation, physical space unchanged)."""

    orientation: str = "RAS"
    geometric = True

    def __call__(self, image: sitk.Image) -> sitk.Image:
        return reorient(image, self.orientation)

    def invert(self, image: sitk.Image, before: sitk.Image) -> sitk.Image:
        return resample_like(image, before)


@dataclass(frozen=True)
class Resample:
    """Linear resampling to `spacing` over the same physical extent."""

    spacing: tuple[float, float, float]
    geometric = True

    def __call__(self, image: sitk.Image) -> sitk.Image:
        return resample_to_spacing(image, self.spacing)

    def invert(self, image: sitk.Image, before: sitk.Image) -> sitk.Image:
        return resample_like(image, before)


@dataclass(frozen=True)
class Normalise:
    """Intensity normalisation: "percentile" (lower..upper -> 0..1), "zscore" or "none".

    z-score is MONAI's `NormalizeIntensity` over the non-zero voxels (`nonzero`, the default,
    as nnU-Net-style models are trained), so the zero background of a masked brain stays zero.
    """

    method: str = "percentile"
    lower: float = 0.5
    upper: float = 99.5
    nonzero: bool = True
    geometric = False

    def __post_init__(self) -> None:
        if self.method not in NORMALISATIONS:
            raise ModelError(
                f"Intensity normalisation '{self.method}' is not one of "
                f"{', '.join(NORMALISATIONS)}."
            )

    def __call__(self, image: sitk.Image) -> sitk.Image:
        output = sitk.GetImageFromArray(self.array(sitk.GetArrayFromImage(image)))
        output.CopyInformation(image)
        return output

    def array(self, values: np.ndarray) -> np.ndarray:
        """The same normalisation on a plain array (the training generator calls this)."""
        values = np.asarray(values, dtype=np.float32)
        if self.method == "percentile":
            return normalize_percentile(values, self.lower, self.upper)
        if self.method == "zscore":
            from monai.transforms import NormalizeIntensity

            transform = NormalizeIntensity(nonzero=self.nonzero, dtype=np.float32)
            return np.asarray(transform(values), dtype=np.float32)
        return values

    @classmethod
    def from_card(cls, normalization: Mapping[str, Any] | None) -> Normalise:
        settings = dict(normalization or DEFAULT_NORMALISATION)
        method = settings.get("method", "percentile")
        if method not in NORMALISATIONS:
            raise ModelError(
                f"The model asks for intensity normalisation '{method}', which this version of "
                f"DeepMRI does not know (it knows {', '.join(NORMALISATIONS)})."
            )
        return cls(
            method=method,
            lower=float(settings.get("lower", 0.5)),
            upper=float(settings.get("upper", 99.5)),
            nonzero=bool(settings.get("nonzero", True)),
        )


@dataclass
class Compose:
    """Steps applied in order; `invert` brings a model-grid image back onto the input grid.

    Calling returns the output and a trace (the image before each geometric step), which
    `invert` needs. The geometric steps all keep physical space, so their inverses collapse into
    one resampling onto the original grid: one interpolation instead of one per step.
    """

    steps: list[Any] = field(default_factory=list)

    def __call__(self, image: sitk.Image) -> tuple[sitk.Image, list[sitk.Image]]:
        trace = []
        for step in self.steps:
            if step.geometric:
                trace.append(image)
            image = step(image)
        return image, trace

    def invert(
        self, image: sitk.Image, trace: Sequence[sitk.Image], interpolator: int = sitk.sitkLinear
    ) -> sitk.Image:
        if not trace:
            return image
        return resample_like(image, trace[0], interpolator)


def from_card(
    preprocessing: Mapping[str, Any], mask: np.ndarray | None = None, normalise: bool = True
) -> Compose:
    """The steps a card's `preprocessing` asks for: mask, reorient, resample, normalise."""
    steps: list[Any] = []
    if mask is not None:
        steps.append(Mask(mask))
    steps.append(Reorient(preprocessing.get("orientation", "RAS")))
    if preprocessing.get("spacing"):
        steps.append(Resample(tuple(float(value) for value in preprocessing["spacing"])))
    if normalise:
        steps.append(Normalise.from_card(preprocessing.get("normalization")))
    return Compose(steps)

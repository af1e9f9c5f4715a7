"""Result types of the tasks, kept free of torch so the Slicer GUI can hold them cheaply.

A background job rebuilds these from the worker's files without importing the networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import InvalidImageError
from deepmri.geometry import same_geometry


@dataclass
class SegmentationResult:
    """Labels on the exact input grid, with the card's label metadata and optional extras."""

    labels: sitk.Image
    label_info: list[dict[str, Any]]
    model_id: str
    probabilities: dict[str, sitk.Image] | None = None
    uncertainty: sitk.Image | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    def volumes_ml(self) -> dict[str, float]:
        """Volume of each labelled structure in millilitres, for a quick plausibility check."""
        array = sitk.GetArrayViewFromImage(self.labels)
        voxel_ml = float(np.prod(self.labels.GetSpacing())) / 1000.0
        return {
            info["name"]: float((array == info["value"]).sum()) * voxel_ml
            for info in self.label_info
        }

    def masked(self, image: sitk.Image) -> sitk.Image:
        """`image` with every voxel outside the labels set to 0, as SynthStrip's `-o` writes a
        skull-stripped scan: same grid, pixel type and metadata, a new image (`image` is left
        as it is). `image` is the scan these labels were made on, so the grids must match.

        Examples:
            >>> result = segment(scan, "brain-extraction")  # doctest: +SKIP
            >>> sitk.WriteImage(result.masked(scan), "brain.nii.gz")  # doctest: +SKIP
        """
        if not same_geometry(image, self.labels, tolerance=1e-4):
            raise InvalidImageError(
                "The image to mask is not on the grid of the labels; give the scan that was "
                "segmented."
            )
        inside = self.labels > 0  # a uint8 image
        inside.CopyInformation(image)
        masked = sitk.Mask(image, inside, outsideValue=0)
        for key in image.GetMetaDataKeys():
            masked.SetMetaData(key, image.GetMetaData(key))
        return masked

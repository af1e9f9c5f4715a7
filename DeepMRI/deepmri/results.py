"""Result types of the tasks, kept free of torch so the Slicer GUI can hold them cheaply.

A background job rebuilds these from the worker's files without importing the networks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk


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

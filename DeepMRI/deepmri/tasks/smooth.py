"""A diagnostic task: in-plane Gaussian smoothing, slice by slice, with progress and cancel per slice.

Real work without a model, so a caller's progress bar, Cancel button and error path (the
background worker, the Slicer job) can be checked in a second.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import InvalidImageError
from deepmri.progress import check_cancel
from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskResult,
)


class SmoothTask(Task):
    """Smooth each slice in-plane `passes` times with a Gaussian of `sigma_mm`.

    Examples:
        >>> import SimpleITK as sitk
        >>> image = sitk.GaussianSource(sitk.sitkFloat32, [8, 8, 4])
        >>> SmoothTask()({"image": image}, {"passes": 2}).images["smoothed"].GetSize()
        (8, 8, 4)
    """

    name = "smooth"
    title = "Smoothing (diagnostic)"
    help = "in-plane Gaussian smoothing slice by slice (checks progress and cancel)"
    inputs = (InputSpec("image", Kind.VOLUME, "a 3D volume"),)
    options = (
        OptionSpec("sigma_mm", float, 1.0, "Gaussian sigma in mm"),
        OptionSpec("passes", int, 1, "how many times to smooth"),
    )
    outputs = (OutputSpec("smoothed", Kind.VOLUME, "the smoothed volume"),)

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        image = inputs["image"]
        sigma, passes = options["sigma_mm"], options["passes"]
        if image.GetDimension() != 3:
            raise InvalidImageError(
                f"The input is {image.GetDimension()}D; smoothing works on 3D volumes."
            )
        if sigma <= 0 or passes < 1:
            raise InvalidImageError("sigma_mm must be positive and passes at least 1.")
        # Slices go through as plain 2D images (in-plane spacing only): the 2D part of an oblique
        # 3D direction matrix is not a valid 2D direction.
        volume = sitk.GetArrayFromImage(image).astype(np.float32)
        in_plane_spacing = image.GetSpacing()[:2]
        depth = volume.shape[0]
        for current_pass in range(passes):
            for k in range(depth):
                check_cancel(context.cancel)
                plane = sitk.GetImageFromArray(volume[k])
                plane.SetSpacing(in_plane_spacing)
                volume[k] = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(plane, sigma))
                done = (current_pass * depth + k + 1) / (passes * depth)
                context.progress(
                    done, f"Smoothing slice {k + 1}/{depth} (pass {current_pass + 1}/{passes})"
                )
        smoothed = sitk.GetImageFromArray(volume)
        smoothed.CopyInformation(image)
        return TaskResult(self.name, images={"smoothed": smoothed}, info=dict(options))

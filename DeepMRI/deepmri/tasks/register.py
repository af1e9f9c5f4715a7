"""Registration task: align a moving volume to a fixed one (rigid, affine or deformable).

Outputs the fixed->moving transform (ITK, LPS mm; a composite of the affine and a displacement
field for deformable), the warped moving image and labels, and where the warp is implausible.
"""

from __future__ import annotations

from typing import Any

import SimpleITK as sitk

from deepmri.progress import check_cancel
from deepmri.tasks.base import InputSpec, Kind, OptionSpec, OutputSpec, RunContext, Task, TaskResult


class RegisterTask(Task):
    """Register a moving volume onto a fixed one; no trained weights needed.

    Examples:
        >>> from deepmri.tasks import get_task
        >>> task = get_task("register")
        >>> [option.name for option in task.options]
        ['method', 'regularisation', 'similarity', 'budget']
        >>> result = task({"fixed": fixed, "moving": moving})  # doctest: +SKIP
        >>> result.measures["folding_pct"]  # doctest: +SKIP
        0.0
    """

    name = "register"
    title = "Registration"
    help = (
        "align a moving volume to a fixed one (rigid, affine or deformable); the transform maps "
        "fixed points to moving points (ITK convention, LPS mm)"
    )
    inputs = (
        InputSpec("fixed", Kind.VOLUME, "the reference volume: outputs are on its grid"),
        InputSpec("moving", Kind.VOLUME, "the volume to align to the fixed one"),
        InputSpec(
            "moving_labels",
            Kind.LABELS,
            "a label map of the moving volume to carry along (nearest neighbour)",
            optional=True,
        ),
    )
    options = (
        OptionSpec(
            "method",
            str,
            "deformable",
            "rigid, similarity, affine, or deformable (affine, then a diffeomorphic warp)",
            choices=("rigid", "similarity", "affine", "deformable"),
        ),
        OptionSpec(
            "regularisation",
            float,
            1.0,
            "smoothness of the deformable warp: higher is smoother, lower follows detail",
        ),
        OptionSpec(
            "similarity",
            str,
            "auto",
            "deformable similarity: lncc (same contrast), mapped (different contrasts: moving "
            "intensities mapped to the fixed ones, then lncc), mind (MIND-SSC) or auto",
            choices=("auto", "lncc", "mapped", "mind"),
        ),
        OptionSpec(
            "budget",
            str,
            "standard",
            "deformable speed/quality: quick (coarse level only), standard, or best (slower)",
            choices=("quick", "standard", "best"),
        ),
    )
    outputs = (
        OutputSpec("transform", Kind.TRANSFORM, "fixed->moving transform (composite .h5)"),
        OutputSpec("warped", Kind.VOLUME, "the moving volume on the fixed grid"),
        OutputSpec(
            "warped_labels", Kind.LABELS, "the moving labels on the fixed grid (when given)"
        ),
        OutputSpec(
            "displacement",
            Kind.VOLUME,
            "deformable only: displacement field on the fixed grid (3-vector, LPS mm)",
        ),
        OutputSpec(
            "jacobian",
            Kind.VOLUME,
            "deformable only: Jacobian determinant of the warp (<= 0 is folding)",
        ),
    )

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        from deepmri.registration import register

        context.config.apply_threads()
        result = register(
            inputs["fixed"],
            inputs["moving"],
            options["method"],
            regularisation=options["regularisation"],
            similarity=options["similarity"],
            budget=options["budget"],
            device=context.config.resolve_device(),
            progress=context.progress,
            cancel=context.cancel,
        )
        check_cancel(context.cancel)
        images = {"warped": result.warped}
        labels = inputs.get("moving_labels")
        if labels is not None:
            images["warped_labels"] = sitk.Resample(
                labels, inputs["fixed"], result.transform, sitk.sitkNearestNeighbor, 0
            )
        if result.displacement is not None:
            images["displacement"] = sitk.Cast(result.displacement, sitk.sitkVectorFloat32)
            images["jacobian"] = result.jacobian
        info = {
            "method": result.method,
            "provenance": dict(options),
            "convention": "transform maps fixed points to moving points (ITK resampling, LPS mm)",
            "affine_lps": [list(row) for row in _matrix(result.linear)],
        }
        return TaskResult(
            self.name,
            images=images,
            transforms={"transform": result.transform},
            measures=result.measures,
            info=info,
        )


def _matrix(transform: sitk.AffineTransform) -> list[list[float]]:
    """The 4x4 homogeneous LPS matrix of an ITK affine (y = A (x - c) + c + t)."""
    import numpy as np

    linear = np.asarray(transform.GetMatrix(), dtype=float).reshape(3, 3)
    center = np.asarray(transform.GetCenter(), dtype=float)
    matrix = np.eye(4)
    matrix[:3, :3] = linear
    matrix[:3, 3] = np.asarray(transform.GetTranslation()) + center - linear @ center
    return [[round(float(value), 8) for value in row] for row in matrix]

"""Registration in the core: linear (rigid, similarity, affine) and diffeomorphic deformable.

`register` runs the whole pipeline and returns ITK transforms in LPS millimetres that map fixed
points to moving points, so `sitk.Resample(moving, fixed, result.transform)` is the warped image.

Examples:
    >>> from deepmri.registration import register
    >>> result = register(fixed, moving, "deformable", regularisation=1.0)  # doctest: +SKIP
    >>> result.warped, result.folding_pct  # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress, sub_progress
from deepmri.registration.affine import LINEAR_METHODS, RegistrationError, linear_register
from deepmri.registration.deformable import (
    BUDGETS,
    DeformableSettings,
    deformable_register,
    settings_for_budget,
)
from deepmri.registration.fields import compose, folding_percent, jacobian_determinant
from deepmri.validation import validate_image

METHODS = (*LINEAR_METHODS, "deformable")


@dataclass
class Registration:
    """What `register` found: the transforms, the warped image and how plausible the warp is.

    `transform` maps fixed points to moving points (ITK's resampling convention, LPS mm): the
    `linear` part alone for linear methods, `linear` after `displacement` for deformable.
    """

    method: str
    linear: sitk.AffineTransform
    transform: sitk.Transform
    warped: sitk.Image
    displacement: sitk.Image | None = None  # 3-vector LPS mm on the fixed grid
    jacobian: sitk.Image | None = None
    measures: dict[str, float | str] = field(default_factory=dict)


def choose_similarity(fixed: sitk.Image, moving_on_fixed: sitk.Image) -> str:
    """ "lncc" when the aligned images correlate positively (one contrast), else "mapped".

    T1 against T2 correlates negatively inside the head, so LNCC on the raw intensities would
    pull the wrong way; "mapped" first maps the moving intensities onto the fixed ones (measured
    better than MIND-SSC across contrasts, and cheaper: Docs/registration.md).
    """
    a = sitk.GetArrayViewFromImage(fixed).astype(np.float32).ravel()
    b = sitk.GetArrayViewFromImage(moving_on_fixed).astype(np.float32).ravel()
    inside = (a > np.percentile(a, 60)) & (b != 0)
    if inside.sum() < 100:
        return "mapped"
    correlation = np.corrcoef(a[inside], b[inside])[0, 1]
    return "lncc" if correlation > 0.3 else "mapped"


def overlap_after(fixed: sitk.Image, moving: sitk.Image, transform: sitk.Transform) -> float:
    """Fraction of the fixed foreground that the transformed moving foreground covers (4 mm)."""
    from deepmri.registration.deformable import corner_aligned_grid

    grid = corner_aligned_grid(fixed, max(4.0, max(fixed.GetSpacing())))
    fixed_coarse = sitk.GetArrayFromImage(sitk.Resample(fixed, grid, sitk.Transform()))
    moving_coarse = sitk.GetArrayFromImage(sitk.Resample(moving, grid, transform))
    fixed_fg = fixed_coarse > np.percentile(fixed_coarse, 99) * 0.1
    moving_fg = moving_coarse > np.percentile(sitk.GetArrayViewFromImage(moving), 99) * 0.1
    if not fixed_fg.any():
        return 0.0
    return float((fixed_fg & moving_fg).sum() / fixed_fg.sum())


def register(
    fixed: sitk.Image,
    moving: sitk.Image,
    method: str = "deformable",
    *,
    regularisation: float = 1.0,
    similarity: str = "auto",
    budget: str = "standard",
    settings: DeformableSettings | None = None,
    fixed_mask: sitk.Image | None = None,
    device=None,
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
) -> Registration:
    """Register `moving` onto `fixed`: linear (`method` rigid/similarity/affine) or deformable.

    The deformable method starts from an affine. `regularisation` scales the smoothness of the
    deformation (higher is smoother); `similarity` is "lncc", "mapped", "mind" or "auto" (LNCC if
    the images correlate after the affine, "mapped" otherwise). `budget` ("quick", "standard",
    "best") names the deformable schedule; `settings` replaces it outright. Inputs are not
    modified.
    """
    if method not in METHODS:
        raise RegistrationError(f"Unknown method '{method}'; use one of {', '.join(METHODS)}.")
    if budget not in BUDGETS:
        raise RegistrationError(f"Unknown budget '{budget}'; use one of {', '.join(BUDGETS)}.")
    validate_image(fixed, "The fixed image")
    validate_image(moving, "The moving image")
    started = time.perf_counter()
    linear_method = "affine" if method == "deformable" else method
    linear_share = 0.3 if method == "deformable" else 0.95
    linear = linear_register(
        fixed,
        moving,
        linear_method,
        fixed_mask=fixed_mask,
        progress=sub_progress(progress, 0.0, linear_share),
        cancel=cancel,
    )
    check_cancel(cancel)
    moving_float = sitk.Cast(moving, sitk.sitkFloat32)
    overlap = overlap_after(fixed, moving_float, linear)
    if overlap < 0.2:
        raise RegistrationError(
            f"After the {linear_method} alignment the moving image covers only "
            f"{100 * overlap:.0f}% of the fixed one: check that both show the same body part."
        )
    measures: dict[str, float | str] = {"overlap_after_linear": round(overlap, 4)}
    seconds_linear = time.perf_counter() - started
    measures["seconds_linear"] = round(seconds_linear, 2)
    displacement = jacobian = None
    transform: sitk.Transform = linear
    if method == "deformable":
        if similarity == "auto":
            similarity = choose_similarity(fixed, sitk.Resample(moving_float, fixed, linear))
        schedule = budget if settings is None else "custom"
        base = settings or settings_for_budget(budget)
        settings = DeformableSettings(
            **{**base.__dict__, "similarity": similarity, "regularisation": regularisation}
        )
        displacement, losses = deformable_register(
            fixed,
            moving,
            linear,
            settings,
            device=device,
            progress=sub_progress(progress, linear_share, 0.95),
            cancel=cancel,
        )
        check_cancel(cancel)
        transform = compose(linear, displacement)
        jacobian = jacobian_determinant(displacement)
        check_cancel(cancel)
        measures.update(
            similarity=similarity,
            budget=schedule,
            similarity_loss=round(losses["similarity"], 5),
            folding_pct=round(folding_percent(jacobian), 5),
            jacobian_min=round(float(sitk.GetArrayViewFromImage(jacobian).min()), 4),
        )
    progress(0.97, "Resampling the moving image")
    warped = sitk.Resample(moving_float, fixed, transform, sitk.sitkLinear, 0.0)
    measures["seconds"] = round(time.perf_counter() - started, 2)
    progress(1.0, "Registration finished")
    return Registration(method, linear, transform, warped, displacement, jacobian, measures)


__all__ = [
    "BUDGETS",
    "METHODS",
    "DeformableSettings",
    "Registration",
    "RegistrationError",
    "compose",
    "deformable_register",
    "folding_percent",
    "jacobian_determinant",
    "linear_register",
    "register",
    "settings_for_budget",
]

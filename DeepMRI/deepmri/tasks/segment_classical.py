"""Classical segmentation with no trained weights: the baseline every learned model must beat.

Brain mask by thresholding and morphology; tissue classes by a Gaussian mixture inside the brain.
They also give a working result on day one where no model is installed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError, InvalidImageError
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
from deepmri.validation import validate_image

CSF, GREY_MATTER, WHITE_MATTER = 1, 2, 3
BRAIN_LABELS = [{"value": 1, "name": "Brain", "color": [0.90, 0.80, 0.50]}]
TISSUE_LABELS = [
    {"value": CSF, "name": "CSF", "color": [0.33, 0.55, 0.85]},
    {"value": GREY_MATTER, "name": "Grey matter", "color": [0.55, 0.55, 0.55]},
    {"value": WHITE_MATTER, "name": "White matter", "color": [0.95, 0.95, 0.95]},
]


class ClassicalSegmentTask(Task):
    """Brain mask by thresholding, or CSF/GM/WM by a Gaussian mixture inside it: no weights.

    Examples:
        >>> from deepmri.tasks import get_task
        >>> get_task("segment-classical").options[0].choices
        ('brain-mask', 'tissue')
    """

    name = "segment-classical"
    title = "Classical segmentation"
    help = "brain mask by thresholding or tissue by a Gaussian mixture (no trained weights)"
    inputs = (InputSpec("image", Kind.VOLUME, "NIfTI/NRRD/MHA file or DICOM folder"),)
    options = (
        OptionSpec(
            "method",
            str,
            "brain-mask",
            "brain-mask (thresholding) or tissue (CSF/GM/WM, T1 contrast)",
            choices=("brain-mask", "tissue"),
        ),
        OptionSpec("erosion_mm", float, 2.0, "erosion that cuts the brain from the scalp (mm)"),
        OptionSpec("seed", int, 0, "random seed of the Gaussian mixture"),
    )
    outputs = (OutputSpec("labels", Kind.LABELS, "label map on the input grid"),)

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        image = inputs["image"]
        check_cancel(context.cancel)
        context.progress(0.1, "Thresholding the brain")
        labels = classical_brain_mask(image, options["erosion_mm"])
        label_info = BRAIN_LABELS
        if options["method"] == "tissue":
            check_cancel(context.cancel)
            context.progress(0.5, "Fitting a Gaussian mixture to the brain's intensities")
            labels = classical_tissue(image, labels, options["seed"])
            label_info = TISSUE_LABELS
        check_cancel(context.cancel)
        context.progress(1.0, "Classical segmentation finished")
        array = sitk.GetArrayViewFromImage(labels)
        voxel_ml = float(np.prod(labels.GetSpacing())) / 1000.0
        measures = {
            f"{label['name']} (mL)": round(float((array == label["value"]).sum()) * voxel_ml, 2)
            for label in label_info
        }
        info = {"label_info": label_info, "model_id": "classical", "provenance": dict(options)}
        return TaskResult(self.name, images={"labels": labels}, measures=measures, info=info)


def classical_brain_mask(image: sitk.Image, erosion_mm: float = 2.0) -> sitk.Image:
    """Threshold the head into tissue classes, cut thin bridges to the scalp, keep the brain.

    Otsu separates head from air; a 4-class multi-Otsu inside the head puts skull and CSF in the
    darkest class; eroding by `erosion_mm` cuts the thin bridges left between brain and scalp,
    the largest component is the brain, and dilation, closing and hole filling restore its edge.
    """
    from skimage.filters import threshold_multiotsu

    validate_image(image)
    smooth = sitk.SmoothingRecursiveGaussian(sitk.Cast(image, sitk.sitkFloat32), 1.0)
    values = sitk.GetArrayFromImage(smooth)
    head = sitk.GetArrayFromImage(sitk.OtsuThreshold(smooth, 0, 1)) > 0
    darkest_class_limit = threshold_multiotsu(values[head], classes=4)[0]
    tissue = sitk.GetImageFromArray((head & (values > darkest_class_limit)).astype(np.uint8))
    tissue.CopyInformation(image)
    radius = [max(1, round(erosion_mm / spacing)) for spacing in image.GetSpacing()]
    eroded = sitk.BinaryErode(tissue, radius)
    largest = sitk.RelabelComponent(sitk.ConnectedComponent(eroded), sortByObjectSize=True) == 1
    brain = sitk.And(sitk.BinaryDilate(largest, radius), tissue)
    brain = sitk.BinaryFillhole(sitk.BinaryMorphologicalClosing(brain, radius))
    if not sitk.GetArrayViewFromImage(brain).any():
        raise InvalidImageError("Thresholding found no brain in the input.")
    return sitk.Cast(brain, sitk.sitkUInt8)


def classical_tissue(image: sitk.Image, brain_mask: sitk.Image, seed: int = 0) -> sitk.Image:
    """CSF, GM, WM (1, 2, 3) by a 3-class Gaussian mixture on intensities inside the brain mask.

    Classes are ordered by mean intensity, which assumes T1 contrast (CSF < GM < WM); on T2-like
    contrast the order reverses, and the caller says so with `inverted=True` semantics by passing
    a negated image.
    """
    values = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    inside = sitk.GetArrayFromImage(brain_mask) > 0
    samples = values[inside].reshape(-1, 1)
    mixture, order = fit_tissue_mixture(samples, seed)
    class_of_component = np.empty(3, dtype=np.uint8)
    class_of_component[order] = [CSF, GREY_MATTER, WHITE_MATTER]
    labels = np.zeros(values.shape, dtype=np.uint8)
    labels[inside] = class_of_component[mixture.predict(samples)]
    output = sitk.GetImageFromArray(labels)
    output.CopyInformation(image)
    return output


def fit_tissue_mixture(samples: np.ndarray, seed: int = 0) -> tuple[Any, np.ndarray]:
    """A 3-component Gaussian mixture fitted to (N, 1) intensities, and its components by mean.

    Fitted on at most 200,000 randomly chosen samples (seeded), which is as good as all of a
    1 mm brain and far faster; the order (darkest first) is how callers name the classes.
    """
    try:
        from sklearn.mixture import GaussianMixture
    except ImportError as error:
        raise DeepMRIError(
            "Tissue classes by a Gaussian mixture need scikit-learn: pip install scikit-learn"
        ) from error

    rng = np.random.default_rng(seed)
    fit_samples = samples[rng.choice(len(samples), size=min(len(samples), 200_000), replace=False)]
    mixture = GaussianMixture(n_components=3, random_state=seed).fit(fit_samples)
    return mixture, np.argsort(mixture.means_.ravel())

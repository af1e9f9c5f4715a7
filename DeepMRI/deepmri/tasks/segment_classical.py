"""Classical segmentation with no trained weights: the baseline every learned model must beat.

Brain mask by thresholding and morphology; tissue classes by a Gaussian mixture inside the brain.
They also give a working result on day one where no model is installed.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from deepmri.errors import InvalidImageError
from deepmri.validation import validate_image

CSF, GREY_MATTER, WHITE_MATTER = 1, 2, 3


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
    from sklearn.mixture import GaussianMixture

    values = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    inside = sitk.GetArrayFromImage(brain_mask) > 0
    samples = values[inside].reshape(-1, 1)
    rng = np.random.default_rng(seed)
    fit_samples = samples[rng.choice(len(samples), size=min(len(samples), 200_000), replace=False)]
    mixture = GaussianMixture(n_components=3, random_state=seed).fit(fit_samples)
    order = np.argsort(mixture.means_.ravel())
    class_of_component = np.empty(3, dtype=np.uint8)
    class_of_component[order] = [CSF, GREY_MATTER, WHITE_MATTER]
    labels = np.zeros(values.shape, dtype=np.uint8)
    labels[inside] = class_of_component[mixture.predict(samples)]
    output = sitk.GetImageFromArray(labels)
    output.CopyInformation(image)
    return output

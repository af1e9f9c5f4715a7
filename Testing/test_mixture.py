"""The per-image mixture refinement of tissue classes (deepmri.mixture) on a phantom with gyri."""

from __future__ import annotations

import numpy as np
from deepmri.mixture import MixtureSettings, refine_with_mixture
from scipy import ndimage

CSF, GREY, WHITE = 1, 2, 3


def folded_brain(t2_like: bool, size: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Truth (CSF shell, folded grey ribbon, white core), its image under a bias field, coordinates.

    The ribbon's folds (~4 mm deep) are what a coarse network blurs into a smooth band.
    """
    rng = np.random.default_rng(7)
    k, j, i = np.meshgrid(*(np.arange(size) - (size - 1) / 2,) * 3, indexing="ij")
    radius = np.sqrt(k**2 + j**2 + i**2)
    azimuth = np.arctan2(j, i)
    polar = np.arccos(np.clip(k / np.maximum(radius, 1e-6), -1.0, 1.0))
    folds = 2.0 * np.sin(6 * azimuth) * np.sin(5 * polar)
    truth = np.zeros(radius.shape, np.uint8)
    truth[radius < 22] = CSF
    truth[radius < 18 + folds * 0.5] = GREY
    truth[radius < 13 + folds] = WHITE
    means = (
        {CSF: 100.0, GREY: 60.0, WHITE: 40.0} if t2_like else {CSF: 30.0, GREY: 70.0, WHITE: 100.0}
    )
    values = np.select([truth == c for c in means], list(means.values()), 0.0)
    values = ndimage.gaussian_filter(values, 0.7) + rng.normal(0.0, 4.0, radius.shape)
    bias = np.exp(0.25 * i / size * 2 + 0.15 * k / size * 2)  # +-25 % and +-15 % across
    coordinates = np.stack([i, j, k], axis=-1).astype(np.float64)
    return truth, np.where(truth > 0, values * bias, 0.0), coordinates


def smooth_band_prior(truth: np.ndarray, blur_voxels: float = 3.5) -> np.ndarray:
    """A coarse network's output: the true classes blurred, so the folds are lost."""
    one_hot = [(truth == value).astype(float) for value in (CSF, GREY, WHITE)]
    prior = np.stack([ndimage.gaussian_filter(channel, blur_voxels) for channel in one_hot]) + 1e-3
    return prior / prior.sum(axis=0)


def dice(first: np.ndarray, second: np.ndarray) -> float:
    return float(2 * (first & second).sum() / (first.sum() + second.sum()))


def plain_mixture_labels(values: np.ndarray, t2_like: bool) -> np.ndarray:
    """The classical baseline: three Gaussians on intensity alone, told the contrast order."""
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(3, random_state=0).fit(values.reshape(-1, 1))
    classes = np.empty(3, dtype=int)
    classes[np.argsort(mixture.means_.ravel())] = (
        [WHITE, GREY, CSF] if t2_like else [CSF, GREY, WHITE]
    )
    return classes[mixture.predict(values.reshape(-1, 1))]


def refined_coarse_and_classical(t2_like: bool) -> tuple[np.ndarray, ...]:
    truth, values, coordinates = folded_brain(t2_like)
    inside = truth > 0
    prior = smooth_band_prior(truth)[:, inside].T
    posterior = refine_with_mixture(values[inside], prior, coordinates[inside])
    assert posterior.shape == prior.shape
    np.testing.assert_allclose(posterior.sum(axis=1), 1.0, atol=1e-9)
    refined = posterior.argmax(axis=1) + 1
    coarse = prior.argmax(axis=1) + 1
    return truth[inside], refined, coarse, plain_mixture_labels(values[inside], t2_like)


def test_on_t1_the_refinement_follows_the_folds_the_prior_blurred():
    reference, refined, coarse, classical = refined_coarse_and_classical(t2_like=False)
    for value in (CSF, GREY, WHITE):
        scores = [
            dice(labels == value, reference == value) for labels in (refined, coarse, classical)
        ]
        # measured: refined 0.985 / 0.962 / 0.972, prior 0.959 / 0.881 / 0.890, GMM 0.97 / 0.90 / 0.90
        assert scores[0] > max(scores[1:]) and scores[0] > 0.95, (value, scores)


def test_on_t2_like_contrast_the_class_order_comes_from_the_prior():
    reference, refined, _, classical = refined_coarse_and_classical(t2_like=True)
    for value in (CSF, GREY, WHITE):
        scores = [dice(labels == value, reference == value) for labels in (refined, classical)]
        # measured: refined 0.905 / 0.864 / 0.957; the GMM (told the order) 0.65 / 0.45 / 0.67
        # under the bias field. The CSF rim blurred into the stripped background looks like grey
        # matter on this contrast, which keeps CSF and GM below the T1 figures.
        assert scores[0] > scores[1] + 0.1 and scores[0] > 0.85, (value, scores)


def test_the_linear_bias_field_is_corrected_and_a_quadratic_one_confounds_the_layout():
    truth, values, coordinates = folded_brain(t2_like=False)
    inside = truth > 0
    prior = smooth_band_prior(truth)[:, inside].T
    scores = {}
    for degree in (0, 1, 2):
        settings = MixtureSettings(bias_degree=degree)
        posterior = refine_with_mixture(values[inside], prior, coordinates[inside], settings)
        scores[degree] = dice(posterior.argmax(axis=1) + 1 == WHITE, truth[inside] == WHITE)
    assert scores[1] > scores[0] + 0.02, scores  # the linear field is corrected
    # A quadratic field holds x^2 + y^2 + z^2, which can stand in for a bright white core in a
    # darker shell: the reason the card's degree is 1 (measured WM Dice 0.97 at 1, 0.67 at 2).
    assert scores[2] < scores[1], scores

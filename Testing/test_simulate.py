"""The MR physics simulator against its signal equations, and its subjects against their parameters."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
from deepmri.simulate import (
    LESION,
    PROTOCOLS,
    TISSUES,
    Grid,
    Sequence,
    SimulationError,
    SubjectParameters,
    Tissue,
    flair_null_ti,
    mni_tissue_maps,
    sample_subject,
    signal,
    simulate,
    simulate_subject,
)

SMALL = Grid((40, 48, 40), 4.0)
TISSUE = {"x": Tissue(t1=900.0, t2=80.0, t2star=50.0, pd=0.7)}


@pytest.mark.parametrize("kind", ["spin-echo", "spoiled-gre", "inversion-recovery"])
def test_short_te_and_long_tr_give_proton_density(kind):
    # TE -> 0 removes T2 weighting, TR -> infinity full recovery; IR with TI -> infinity too.
    sequence = Sequence(kind, tr=math.inf, te=0.0, ti=math.inf, flip=90.0)
    assert signal(sequence, TISSUE)["x"] == pytest.approx(0.7, rel=1e-9)
    nearly = Sequence(kind, tr=1e7, te=1e-6, ti=1e7, flip=90.0)
    assert signal(nearly, TISSUE)["x"] == pytest.approx(0.7, rel=1e-6)


def test_spin_echo_follows_its_equation():
    sequence = Sequence("spin-echo", tr=2000.0, te=90.0)
    expected = 0.7 * (1 - math.exp(-2000 / 900)) * math.exp(-90 / 80)
    assert signal(sequence, TISSUE)["x"] == pytest.approx(expected, rel=1e-12)


def test_spoiled_gre_peaks_at_the_ernst_angle():
    tr = 20.0
    ernst = math.degrees(math.acos(math.exp(-tr / 900.0)))
    values = {
        flip: signal(Sequence("spoiled-gre", tr=tr, te=0.0, flip=flip), TISSUE)["x"]
        for flip in (ernst - 3, ernst, ernst + 3)
    }
    assert values[ernst] > values[ernst - 3] and values[ernst] > values[ernst + 3]


@pytest.mark.parametrize("field_strength", [1.5, 3.0])
def test_flair_nulls_csf_at_t1_ln2_for_long_tr(field_strength):
    csf = TISSUES[field_strength]["csf"]
    ti = csf.t1 * math.log(2.0)
    assert flair_null_ti(csf.t1) == pytest.approx(ti)
    flair = Sequence("inversion-recovery", tr=1e9, te=100.0, ti=ti)
    values = signal(flair, TISSUES[field_strength])
    assert values["csf"] < 1e-9
    assert values["gm"] > 0.1 and values["wm"] > 0.1


def test_flair_null_for_finite_tr_and_reference_protocol_suppress_csf():
    csf = TISSUES[3.0]["csf"]
    ti = flair_null_ti(csf.t1, tr=9000.0)
    assert signal(Sequence("inversion-recovery", 9000.0, 100.0, ti=ti), {"csf": csf})["csf"] < 1e-9
    values = signal(PROTOCOLS["FLAIR"], TISSUES[3.0])
    assert values["csf"] < 0.05 * values["wm"]


def test_mprage_recovers_proton_density_without_inversion_effects():
    # TI >> T1 and a short train of small flips: the centre sees a fully relaxed M0, so
    # S -> PD sin(flip). A long train saturates: 80 pulses of 1 deg cost about 1%.
    short = Sequence("mprage", tr=1e6, te=0.0, ti=5e5, flip=1.0, readout_pulses=2)
    expected = 0.7 * math.sin(math.radians(1.0))
    assert signal(short, TISSUE)["x"] == pytest.approx(expected, rel=1e-3)
    long_train = Sequence("mprage", tr=1e6, te=0.0, ti=5e5, flip=1.0, readout_pulses=160)
    assert 0.98 * expected < signal(long_train, TISSUE)["x"] < 0.995 * expected


def test_mprage_nulls_a_tissue_near_t1_ln2_with_a_tiny_flip():
    # Readout pulses of 0.1 deg barely disturb Mz: the null is the inversion-recovery one.
    t1 = 900.0
    null = t1 * math.log(2.0)
    near = Sequence("mprage", tr=1e6, te=0.0, ti=null, flip=0.1, echo_spacing=0.01)
    away = Sequence("mprage", tr=1e6, te=0.0, ti=2 * null, flip=0.1, echo_spacing=0.01)
    assert signal(near, TISSUE)["x"] < 0.01 * signal(away, TISSUE)["x"]


def test_mprage_refuses_timings_that_do_not_fit():
    with pytest.raises(SimulationError, match="MPRAGE timings"):
        signal(Sequence("mprage", tr=1000.0, te=3.0, ti=300.0, flip=9.0), TISSUE)


@pytest.mark.parametrize("field_strength", [1.5, 3.0])
def test_reference_protocols_give_textbook_contrast(field_strength):
    tissues = TISSUES[field_strength]
    t1w = signal(PROTOCOLS["T1w"], tissues)
    spgr = signal(PROTOCOLS["T1w-spgr"], tissues)
    t2w = signal(PROTOCOLS["T2w"], tissues)
    flair = signal(PROTOCOLS["FLAIR"], tissues)
    assert t1w["wm"] > t1w["gm"] > t1w["csf"]
    assert spgr["wm"] > spgr["gm"] > spgr["csf"]
    assert t2w["csf"] > t2w["gm"] > t2w["wm"]
    assert min(flair.values()) == flair["csf"] and flair["gm"] > flair["wm"]
    # The lesion: dark on T1w (longer T1), bright on T2w and FLAIR against white matter.
    assert t1w[LESION] < t1w["wm"] and t2w[LESION] > t2w["wm"] and flair[LESION] > flair["wm"]


def test_simulated_image_keeps_the_maps_geometry_and_mixes_partial_volume():
    maps = mni_tissue_maps()
    image = simulate(maps, "T2w")
    reference = maps["gm"]
    assert image.GetSize() == reference.GetSize()
    assert image.GetSpacing() == reference.GetSpacing()
    assert image.GetOrigin() == reference.GetOrigin()
    assert image.GetDirection() == reference.GetDirection()
    values = sitk.GetArrayFromImage(image)
    arrays = {name: sitk.GetArrayFromImage(m) for name, m in maps.items()}
    pure = signal(PROTOCOLS["T2w"], TISSUES[3.0])
    mixed = (arrays["gm"] > 0.45) & (arrays["wm"] > 0.45)
    expected = arrays["gm"][mixed] * pure["gm"] + arrays["wm"][mixed] * pure["wm"]
    assert mixed.sum() > 100
    assert np.allclose(values[mixed], expected + arrays["csf"][mixed] * pure["csf"], rtol=1e-5)
    assert values[sum(arrays.values()) == 0].max() == 0


def test_noise_is_rician_and_bias_multiplicative():
    maps = {name: sitk.Crop(m, [60, 70, 60], [60, 70, 60]) for name, m in mni_tissue_maps().items()}
    clean = sitk.GetArrayFromImage(simulate(maps, "T2w"))
    noisy = sitk.GetArrayFromImage(simulate(maps, "T2w", noise=0.1, seed=3))
    biased = sitk.GetArrayFromImage(simulate(maps, "T2w", bias_strength=0.3, seed=3))
    background = clean == 0
    assert (noisy >= 0).all() and noisy[background].mean() > 0.01  # Rayleigh floor, not zero
    assert biased[background].max() == 0  # a bias multiplies; nothing appears from nothing
    ratio = biased[~background] / clean[~background]
    assert ratio.std() > 0.01 and ratio.min() > 0


def test_subject_is_reproducible_from_its_logged_parameters():
    params = sample_subject(11, ("T1w",), grid=SMALL, lesion=True)
    first = simulate_subject(params, ("T1w", "T2w"))
    logged = SubjectParameters.from_dict(params.to_dict())
    again = simulate_subject(logged, ("T1w", "T2w"))
    for contrast in ("T1w", "T2w"):
        assert np.array_equal(first.images[contrast], again.images[contrast])
    other = simulate_subject(sample_subject(12, ("T1w",), grid=SMALL), ("T1w",))
    assert not np.array_equal(first.images["T1w"], other.images["T1w"])


def test_subject_grid_geometry_and_tissue_ordering():
    params = sample_subject(5, ("T1w",), grid=SMALL, deformation_mm=(3.0, 3.0))
    subject = simulate_subject(params, ("T1w", "T2w", "FLAIR"))
    image = subject.image("T2w")
    assert image.GetSize() == (40, 48, 40) and image.GetSpacing() == (4.0, 4.0, 4.0)
    assert np.allclose(np.asarray(image.GetDirection()).reshape(3, 3), np.diag([-1, -1, 1]))
    total = sum(subject.probabilities.values())
    assert total.max() <= 1.0 + 1e-5 and 1200 < subject.brain.sum() * 64 / 1000 < 2600  # ml
    pure = {n: p > 0.9 for n, p in subject.probabilities.items()}
    means = {c: {n: subject.images[c][m].mean() for n, m in pure.items()} for c in subject.images}
    assert means["T1w"]["wm"] > means["T1w"]["gm"] > means["T1w"]["csf"]
    assert means["T2w"]["csf"] > means["T2w"]["gm"] > means["T2w"]["wm"]
    assert min(means["FLAIR"].values()) == means["FLAIR"]["csf"]


def test_lesion_is_a_10_mm_sphere_in_white_matter_with_its_own_contrast():
    params = sample_subject(21, ("T1w",), grid=Grid((80, 96, 80), 2.0), lesion=True)
    subject = simulate_subject(params, ("T1w", "T2w", "FLAIR"))
    lesion = subject.probabilities[LESION]
    volume_ml = lesion.sum() * 8 / 1000
    assert volume_ml == pytest.approx(4 / 3 * math.pi * 5.0**3 / 1000, rel=0.25)
    core = lesion > 0.9
    shell = (subject.probabilities["wm"] > 0.9) & ~(lesion > 0)
    for contrast, sign in (("T1w", -1), ("T2w", 1), ("FLAIR", 1)):
        difference = subject.images[contrast][core].mean() - subject.images[contrast][shell].mean()
        assert np.sign(difference) == sign, contrast


@pytest.mark.parametrize("contrast", ["T1w", "T2w"])
def test_sampled_input_protocols_keep_their_weighting_for_every_subject(contrast):
    from deepmri.simulate import WEIGHTING_ORDER, subject_tissues

    order = WEIGHTING_ORDER[contrast]
    kinds = set()
    for seed in range(200):
        params = sample_subject(seed, (contrast,), grid=SMALL)
        sequence = Sequence(**params.sequences[contrast])
        kinds.add((params.field_strength, sequence.kind))
        values = signal(sequence, subject_tissues(params))
        assert values[order[0]] > values[order[1]] > values[order[2]], (seed, sequence)
    assert len(kinds) >= 2  # both field strengths (and for T1w, MPRAGE and spoiled GRE)


def test_thick_slices_average_each_slab_and_interpolate_back_on_the_same_grid():
    from deepmri.simulate import thick_slices

    rng = np.random.default_rng(0)
    image = rng.random((12, 14, 10)).astype(np.float32)
    thick = thick_slices(image, axis=1, factor=3, offset=1)
    assert thick.shape == image.shape and thick.dtype == np.float32
    # The centre voxel of each slab is that slab's mean (voxels 1-3, 4-6, ...; centres 2, 5, ...).
    for start in range(1, 13, 3):
        slab = image[:, start : start + 3].mean(axis=1)
        np.testing.assert_allclose(thick[:, start + 1], slab, rtol=1e-5)
    # Linear along the slices is kept inside; other axes are untouched.
    ramp = np.broadcast_to(np.arange(14, dtype=np.float32)[None, :, None], image.shape)
    np.testing.assert_allclose(thick_slices(ramp, 1, 3, 1)[:, 2:12], ramp[:, 2:12], atol=1e-5)
    assert np.array_equal(thick_slices(image, 1, 1), image)


def test_any_input_draws_every_sequence_kind_and_thick_slices_touch_only_the_input():
    from deepmri.simulate import ANY, sample_input_sequence

    rng = np.random.default_rng(1)
    kinds = {sample_input_sequence(ANY, rng).kind for _ in range(60)}
    assert kinds == {"spin-echo", "spoiled-gre", "inversion-recovery", "mprage"}
    params = sample_subject(5, (ANY,), grid=SMALL, thick_probability=1.0)
    assert params.resolution["factor"] in (2, 3, 4) and params.resolution["axis"] in (0, 1, 2)
    thick = simulate_subject(params, (ANY, "T1w"))
    thin_params = SubjectParameters.from_dict({**params.to_dict(), "resolution": None})
    thin = simulate_subject(thin_params, (ANY, "T1w"))
    assert np.array_equal(thick.images["T1w"], thin.images["T1w"])  # the target is untouched
    axis = params.resolution["axis"]
    inside = thin.brain
    roughness = {
        name: float(
            np.abs(np.diff(subject.images[ANY], axis=axis))[np.delete(inside, 0, axis)].mean()
        )
        for name, subject in (("thick", thick), ("thin", thin))
    }
    assert roughness["thick"] < 0.8 * roughness["thin"]
    # Without thick_probability a seed's subject is what it always was.
    assert sample_subject(5, (ANY,), grid=SMALL).resolution is None

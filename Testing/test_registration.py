"""Registration on real MRI (MNI152 at 3 mm): known motions recovered, transforms that map points
as the core says, plausible warps, clear refusals and a prompt cancel.

Ground truth comes from warping the real template with a known transform; the error is measured
in millimetres at brain voxels, against the transform the registration should find (fixed ->
moving points, ITK's convention).
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from deepmri import CancelToken
from deepmri.errors import Cancelled, DeepMRIError
from deepmri.geometry import resample_to_spacing
from deepmri.registration import DeformableSettings, linear_register, register
from deepmri.registration.fields import compose, folding_percent, jacobian_determinant
from deepmri.simulate import inverted_contrast
from deepmri.tasks import TaskResult, get_task

FAST = DeformableSettings(levels_mm=(6.0, 3.0), iterations=(60, 30))


@pytest.fixture(scope="module")
def fixed(mni_t1) -> sitk.Image:
    return resample_to_spacing(sitk.Cast(mni_t1, sitk.sitkFloat32), (3.0, 3.0, 3.0))


@pytest.fixture(scope="module")
def brain_points(fixed) -> list[tuple[float, float, float]]:
    values = sitk.GetArrayViewFromImage(fixed)
    rng = np.random.default_rng(0)
    indices = np.argwhere(values > np.percentile(values[values > 0], 30))
    chosen = indices[rng.choice(len(indices), 300, replace=False)]
    return [fixed.TransformIndexToPhysicalPoint([int(v) for v in index[::-1]]) for index in chosen]


def oblique_grid(reference: sitk.Image) -> sitk.Image:
    """A grid over the same head with another spacing, origin and an oblique direction."""
    rotation = sitk.VersorTransform((0.2, -0.4, 0.9), np.deg2rad(17.0))
    grid = sitk.Image([70, 80, 66], sitk.sitkFloat32)
    grid.SetSpacing((3.1, 2.9, 3.3))
    grid.SetDirection(rotation.GetMatrix())
    centre = reference.TransformContinuousIndexToPhysicalPoint(
        [(size - 1) / 2 for size in reference.GetSize()]
    )
    offset = np.asarray(rotation.GetMatrix()).reshape(3, 3) @ (
        (np.asarray(grid.GetSize()) - 1) / 2 * np.asarray(grid.GetSpacing())
    )
    grid.SetOrigin(tuple(np.asarray(centre) - offset))
    return grid


def known_rigid() -> sitk.Euler3DTransform:
    """10 degrees about an oblique axis combination and an 8 mm shift."""
    motion = sitk.Euler3DTransform()
    motion.SetCenter((0.0, -18.0, 18.0))
    motion.SetRotation(np.deg2rad(10.0), np.deg2rad(-4.0), np.deg2rad(3.0))
    motion.SetTranslation((8.0, -3.0, 4.0))
    return motion


def point_errors(found: sitk.Transform, truth: sitk.Transform, points) -> np.ndarray:
    return np.array(
        [
            np.linalg.norm(np.subtract(found.TransformPoint(p), truth.TransformPoint(p)))
            for p in points
        ]
    )


def test_rigid_and_affine_recover_a_known_motion_on_an_oblique_grid(fixed, brain_points):
    motion = known_rigid()
    # moving(y) = fixed(motion(y)): a fixed point x sits at motion^-1(x) in the moving image.
    moving = sitk.Resample(fixed, oblique_grid(fixed), motion, sitk.sitkLinear, 0.0)
    truth = motion.GetInverse()
    for method in ("rigid", "affine"):
        result = register(fixed, moving, method)
        errors = point_errors(result.transform, truth, brain_points)
        assert errors.mean() < 1.0, (method, errors.mean())
        assert np.percentile(errors, 95) < 1.5, method
        assert result.displacement is None and result.jacobian is None
        assert result.warped.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(result.warped.GetOrigin(), fixed.GetOrigin())
        np.testing.assert_allclose(result.warped.GetDirection(), fixed.GetDirection())


def test_affine_is_reproducible_run_to_run(fixed):
    # The metric samples are drawn from a fixed seed (SimpleITK's default seed is the clock).
    moving = sitk.Resample(fixed, oblique_grid(fixed), known_rigid(), sitk.sitkLinear, 0.0)
    first, second = (register(fixed, moving, "affine").linear for _ in range(2))
    assert first.GetParameters() == second.GetParameters()
    assert first.GetFixedParameters() == second.GetFixedParameters()
    other_seed = linear_register(fixed, moving, "affine", seed=7)
    assert other_seed.GetParameters() != first.GetParameters()  # the seed is what fixes them
    with pytest.raises(DeepMRIError, match="seed"):
        linear_register(fixed, moving, "affine", seed=0)


def smooth_deformation(reference: sitk.Image, amplitude_mm: float, seed: int) -> sitk.Image:
    """A random smooth displacement field (float64 vectors, LPS mm) on `reference`'s grid."""
    rng = np.random.default_rng(seed)
    coarse = rng.normal(size=(3, 5, 6, 5))
    import torch

    field = torch.nn.functional.interpolate(
        torch.from_numpy(coarse)[None],
        size=reference.GetSize()[::-1],
        mode="trilinear",
        align_corners=True,
    )[0].numpy()
    field *= amplitude_mm / np.abs(field).max()
    image = sitk.GetImageFromArray(np.moveaxis(field, 0, -1), isVector=True)
    image.CopyInformation(reference)
    return sitk.Cast(image, sitk.sitkVectorFloat64)


@pytest.fixture(scope="module")
def deformed_case(fixed):
    """The template under a known smooth warp, and the fixed->moving field to recover."""
    warp = smooth_deformation(fixed, 10.0, seed=1)
    # moving(x) = fixed(x + w(x)); the registration must find the inverse of x -> x + w(x).
    moving = sitk.Resample(fixed, fixed, compose(None, warp), sitk.sitkLinear, 0.0)
    inverse = sitk.InvertDisplacementField(
        warp, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01
    )
    return moving, compose(None, inverse)


@pytest.fixture(scope="module")
def deformable_result(fixed, deformed_case):
    return register(fixed, deformed_case[0], "deformable", settings=FAST)


def test_deformable_recovers_a_known_warp_better_than_the_affine(
    fixed, deformed_case, deformable_result, brain_points
):
    moving, truth = deformed_case
    affine_only = register(fixed, moving, "affine")
    affine_error = point_errors(affine_only.transform, truth, brain_points).mean()
    deformable_error = point_errors(deformable_result.transform, truth, brain_points).mean()
    assert affine_error > 2.0  # the warp is not affine
    # Measured 2.26 mm -> 0.78 mm.
    assert deformable_error < 0.5 * affine_error, (deformable_error, affine_error)
    assert deformable_result.measures["similarity"] == "lncc"


def test_intensity_mapping_turns_an_inverted_contrast_back(fixed):
    import torch
    from deepmri.registration.similarity import apply_mapping, intensity_mapping

    original = torch.from_numpy(sitk.GetArrayFromImage(fixed))[None, None]
    original = original / original.max()
    inverted = torch.from_numpy(sitk.GetArrayFromImage(inverted_contrast(fixed)))[None, None]
    inverted = inverted / inverted.max()
    mapped = apply_mapping(inverted, intensity_mapping(inverted, original))
    inside = original > 0
    before = (inverted - original)[inside].abs().mean()
    after = (mapped - original)[inside].abs().mean()
    # Measured 0.49 -> 0.007 (the mean over the brain; 1 is the brightest voxel).
    assert after < 0.05 * before, (float(before), float(after))


def test_cross_contrast_warp_is_recovered_through_the_mapped_intensities(
    fixed, deformed_case, brain_points
):
    moving, truth = deformed_case
    moving = inverted_contrast(moving)
    result = register(fixed, moving, "deformable", settings=FAST)
    assert result.measures["similarity"] == "mapped"  # auto: the contrast is inverted
    affine_error = point_errors(result.linear, truth, brain_points).mean()
    error = point_errors(result.transform, truth, brain_points).mean()
    # Measured 2.37 mm -> 0.70 mm (the table fitted on linearly interpolated voxels: 1.28 mm).
    assert error < 0.5 * affine_error, (error, affine_error)
    assert result.measures["folding_pct"] < 0.1


def test_deformable_warp_does_not_fold(deformable_result):
    assert deformable_result.measures["folding_pct"] < 0.1
    jacobian = sitk.GetArrayViewFromImage(deformable_result.jacobian)
    assert 0.3 < float(np.median(jacobian)) < 1.5


def test_jacobian_of_a_known_linear_field_is_its_determinant(fixed):
    # u(x) = (S - I) x has Jacobian determinant det(S) everywhere, whatever the grid's direction.
    grid = oblique_grid(fixed)
    stretch = np.diag([1.1, 0.9, 1.2])
    points = np.array(
        [grid.TransformIndexToPhysicalPoint(index) for index in np.ndindex(*grid.GetSize())]
    )
    vectors = points @ (stretch - np.eye(3)).T
    field = sitk.GetImageFromArray(
        vectors.reshape(*grid.GetSize(), 3).transpose(2, 1, 0, 3), isVector=True
    )
    field.CopyInformation(grid)
    determinant = sitk.GetArrayFromImage(jacobian_determinant(field))
    np.testing.assert_allclose(determinant, np.linalg.det(stretch), rtol=1e-4)
    assert folding_percent(jacobian_determinant(field)) == 0.0


def test_written_transform_maps_points_as_the_core_and_resamples_to_the_warped_image(
    fixed, deformed_case, deformable_result, tmp_path
):
    result = deformable_result
    field = result.displacement
    linear = result.linear
    rng = np.random.default_rng(3)
    indices = [tuple(int(rng.integers(0, size)) for size in fixed.GetSize()) for _ in range(200)]
    vectors = sitk.GetArrayViewFromImage(field)
    # The core's statement: a fixed voxel centre x maps to linear(x + u(x)).
    expected = [
        linear.TransformPoint(
            tuple(np.add(fixed.TransformIndexToPhysicalPoint(i), vectors[i[::-1]]))
        )
        for i in indices
    ]
    task_result = TaskResult("register", transforms={"transform": result.transform})
    task_result.write(tmp_path)
    back = TaskResult.read(tmp_path).transforms["transform"]
    for index, point in zip(indices, expected, strict=True):
        x = fixed.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(result.transform.TransformPoint(x), point, atol=1e-6)
        np.testing.assert_allclose(back.TransformPoint(x), point, atol=1e-6)
    # The warped output is the moving image sampled at those points.
    moving = sitk.Cast(deformed_case[0], sitk.sitkFloat32)
    warped = sitk.GetArrayViewFromImage(result.warped)
    resampled = sitk.GetArrayFromImage(sitk.Resample(moving, fixed, back, sitk.sitkLinear))
    np.testing.assert_allclose(warped, resampled, atol=1e-4)


def test_register_task_writes_every_output_on_the_fixed_grid_and_leaves_inputs_alone(
    fixed, deformed_case, tmp_path
):
    moving = deformed_case[0]
    labels = sitk.Cast(moving > 50, sitk.sitkUInt8)
    before = sitk.GetArrayFromImage(moving).copy()
    task = get_task("register")
    result = task({"fixed": fixed, "moving": moving, "moving_labels": labels}, {"method": "rigid"})
    assert set(result.images) == {"warped", "warped_labels"}
    assert sitk.GetArrayViewFromImage(result.images["warped_labels"]).max() == 1
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(moving), before)
    files = result.write(tmp_path)
    assert files["transform"] == "transform.h5"
    back = TaskResult.read(tmp_path)
    assert back.measures["seconds"] > 0
    for image in back.images.values():
        assert image.GetSize() == fixed.GetSize()
        np.testing.assert_allclose(image.GetSpacing(), fixed.GetSpacing())


def test_mismatched_and_empty_inputs_are_refused_in_one_line(fixed):
    slice_2d = sitk.Image([64, 64], sitk.sitkFloat32) + 1.0
    empty = sitk.Image(fixed.GetSize(), sitk.sitkFloat32)
    empty.CopyInformation(fixed)
    piece = sitk.RegionOfInterest(fixed, [6, 6, 6], [30, 36, 30])  # an 18 mm cube of brain
    for moving, words in ((slice_2d, "2D"), (empty, "empty"), (piece, "covers only")):
        with pytest.raises(DeepMRIError, match=words) as caught:
            register(fixed, moving, "affine")
        assert "\n" not in str(caught.value)


def test_cancel_stops_the_deformable_stage_within_one_iteration(fixed, deformed_case):
    token = CancelToken()
    reports = []

    def progress(fraction: float, message: str) -> None:
        reports.append(message)
        if message.startswith("deformable"):
            token.cancel()

    with pytest.raises(Cancelled):
        register(
            fixed, deformed_case[0], "deformable", settings=FAST, progress=progress, cancel=token
        )
    after_cancel = reports[reports.index(next(r for r in reports if r.startswith("deformable"))) :]
    assert len(after_cancel) == 1


def test_cli_and_batch_register_pairs_and_write_the_transform(fixed, tmp_path, capsys):
    import csv

    from deepmri.cli import main

    moving = sitk.Resample(fixed, oblique_grid(fixed), known_rigid(), sitk.sitkLinear, 0.0)
    sitk.WriteImage(fixed, str(tmp_path / "fixed.nii.gz"))
    sitk.WriteImage(moving, str(tmp_path / "moving.nii.gz"))
    out = tmp_path / "out"
    arguments = [str(tmp_path / "fixed.nii.gz"), str(tmp_path / "moving.nii.gz")]
    assert main(["register", *arguments, "-o", str(out), "--method", "rigid"]) == 0
    transform = sitk.ReadTransform(str(out / "transform.h5"))
    truth = known_rigid().GetInverse()
    point = fixed.TransformContinuousIndexToPhysicalPoint([s / 2 for s in fixed.GetSize()])
    assert (
        np.linalg.norm(np.subtract(transform.TransformPoint(point), truth.TransformPoint(point)))
        < 1
    )
    cases = tmp_path / "pairs.csv"
    with cases.open("w", newline="") as handle:
        csv.writer(handle).writerows(
            [["id", "fixed", "moving", "method"], ["p1", *arguments, "rigid"]]
        )
    assert main(["batch", str(cases), "--task", "register", "-o", str(tmp_path / "batch")]) == 0
    assert (tmp_path / "batch" / "p1" / "transform.h5").is_file()
    assert (tmp_path / "batch" / "p1" / "warped.nii.gz").is_file()

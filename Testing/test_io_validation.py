"""Core I/O round trips and the input validation every task runs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_image
from deepmri.errors import ImageIOError, InvalidImageError
from deepmri.geometry import reorient, resample_like, resample_to_spacing, same_geometry
from deepmri.io import read_image, write_image
from deepmri.validation import validate_image


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_write_then_read_keeps_voxels_and_oblique_geometry(tmp_path, suffix):
    image = make_oblique_image()
    path = write_image(image, tmp_path / f"case{suffix}")
    again = read_image(path)
    assert same_geometry(image, again, tolerance=1e-5)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(again))
    assert [p.name for p in tmp_path.iterdir()] == [f"case{suffix}"]  # no partial files left


def test_dicom_series_is_read_from_a_folder(tmp_path):
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    source = get_testdata_file("MR_small.dcm")
    dataset = pydicom.dcmread(source)
    dataset.save_as(tmp_path / "slice.dcm")
    image = read_image(tmp_path)
    assert image.GetSize()[:2] == (dataset.Columns, dataset.Rows)


def test_reading_a_missing_or_corrupt_file_says_which(tmp_path):
    with pytest.raises(ImageIOError, match="does not exist"):
        read_image(tmp_path / "absent.nii.gz")
    corrupt = tmp_path / "corrupt.nii.gz"
    corrupt.write_bytes(b"not an image at all")
    with pytest.raises(ImageIOError, match="corrupt.nii.gz"):
        read_image(corrupt)


def test_writing_an_unknown_format_is_refused_before_anything_is_written(tmp_path):
    with pytest.raises(ImageIOError, match="file ending"):
        write_image(make_oblique_image(), tmp_path / "case.jpg")
    assert list(tmp_path.iterdir()) == []


def test_real_mri_passes_validation(mni_t1):
    validate_image(mni_t1)


def test_2d_input_gets_a_clear_error():
    with pytest.raises(InvalidImageError, match=r"2D \(64x64\).*3D volume"):
        validate_image(sitk.Image([64, 64], sitk.sitkFloat32))


def test_4d_input_gets_a_clear_error_naming_what_to_do():
    nibabel = pytest.importorskip("nibabel")
    path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    with pytest.raises(InvalidImageError, match=r"4D .*Extract one 3D frame"):
        validate_image(read_image(path))


def test_vector_image_gets_a_clear_error():
    vector = sitk.Image([8, 8, 8], sitk.sitkVectorFloat32, 3)
    with pytest.raises(InvalidImageError, match="3 components"):
        validate_image(vector)


def test_empty_volume_is_refused():
    with pytest.raises(InvalidImageError, match="empty"):
        validate_image(sitk.Image([16, 16, 16], sitk.sitkFloat32))


def test_nan_and_inf_are_counted():
    array = np.ones((8, 8, 8), dtype=np.float32)
    array[0, 0, :3] = np.nan
    array[1, 1, 1] = np.inf
    with pytest.raises(InvalidImageError, match="3 NaN and 1 infinite"):
        validate_image(sitk.GetImageFromArray(array))


def test_implausible_spacing_and_sheared_direction_are_refused():
    image = make_oblique_image()
    image.SetSpacing((0.001, 1.0, 1.0))
    with pytest.raises(InvalidImageError, match="spacing"):
        validate_image(image)
    image = make_oblique_image()
    image.SetDirection((1, 0.2, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InvalidImageError, match="orthonormal"):
        validate_image(image)


def test_reorient_moves_voxels_but_not_physical_space():
    image = make_oblique_image()
    ras = reorient(image, "RAS")
    index = (3, 5, 7)
    point = image.TransformIndexToPhysicalPoint(index)
    assert ras.GetPixel(ras.TransformPhysicalPointToIndex(point)) == image.GetPixel(index)


def test_resampling_to_spacing_and_back_lands_on_the_input_grid():
    image = make_oblique_image()
    coarse = resample_to_spacing(image, (2.0, 2.0, 2.0))
    assert coarse.GetSpacing() == (2.0, 2.0, 2.0)
    assert coarse.GetDirection() == image.GetDirection()
    back = resample_like(coarse, image)
    assert same_geometry(back, image)


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_a_nifti_cut_short_is_refused_in_one_line(tmp_path, mni_t1, suffix, capsys):
    """ITK alone reads the first 60% of a NIfTI and fills the rest with zeros."""
    whole = write_image(mni_t1, tmp_path / f"mni{suffix}")
    data = whole.read_bytes()
    cut = tmp_path / f"cut{suffix}"
    cut.write_bytes(data[: int(len(data) * 0.6)])
    assert sitk.ReadImage(str(cut)).GetSize() == mni_t1.GetSize()  # what we guard against
    with pytest.raises(ImageIOError, match=r"'cut.nii(.gz)?' is damaged: the file ends before"):
        read_image(cut)
    read_image(whole)  # the complete file still reads
    from deepmri.cli import main

    assert main(["segment-classical", str(cut), "-o", str(tmp_path / "mask.nii.gz")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deepmri: error:") and "damaged" in error
    assert len(error.strip().splitlines()) == 1 and not (tmp_path / "mask.nii.gz").exists()
    if suffix == ".nii":  # one byte short is still short
        (tmp_path / "short.nii").write_bytes(data[:-1])
        with pytest.raises(ImageIOError, match="damaged"):
            read_image(tmp_path / "short.nii")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_other_formats_cut_short_are_refused_too(tmp_path, suffix):
    whole = write_image(make_oblique_image(), tmp_path / f"case{suffix}", compress=False)
    data = whole.read_bytes()
    (tmp_path / f"cut{suffix}").write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageIOError, match=f"cut{suffix}"):
        read_image(tmp_path / f"cut{suffix}")


def test_outputs_are_written_with_the_users_umask(tmp_path):
    """Atomic writes start from a private temporary file; the result must not stay private."""
    import os

    from deepmri.io import write_json
    from deepmri.models import example_card, save_model
    from deepmri.nets import build_network
    from deepmri.tasks import TaskResult

    previous = os.umask(0o022)
    try:
        image_path = write_image(make_oblique_image(), tmp_path / "image.nii.gz")
        json_path = write_json({"a": 1}, tmp_path / "note.json")
        result = TaskResult("t", images={"labels": make_oblique_image()})
        files = result.write(tmp_path / "result")
        card = example_card(id="mode-net")
        network = build_network(card["architecture"]["name"], card["architecture"]["config"])
        model = save_model(network, card, tmp_path / "models" / "mode-net")
        os.umask(0o027)
        group_only = write_image(make_oblique_image(), tmp_path / "group.nrrd")
    finally:
        os.umask(previous)
    written = [image_path, json_path, tmp_path / "result" / files["labels"]]
    written += [tmp_path / "result" / "result.json", model.weights_path, model.path / "card.json"]
    for path in written:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert group_only.stat().st_mode & 0o777 == 0o640

"""The PNG preview: which slices it shows."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
from deepmri.preview import _centre, _views, overlay_png


def test_the_slices_go_through_the_labels_centre_and_one_lies_to_the_right():
    # A RAS array (z, y, x; x runs to the patient's right) whose value is its x index.
    volume = np.broadcast_to(np.arange(60.0), (40, 50, 60))
    labels = np.zeros((40, 50, 60), np.uint8)
    labels[5:16, 30:41, 35:46] = 1  # centre (10, 35, 40)
    centre = _centre(labels, volume.shape)
    assert centre == (10, 35, 40)
    axial, coronal, mid, side = _views(volume, centre, right_voxels=12)
    assert axial.shape == (50, 60) and coronal.shape == (40, 60)
    assert (mid == 40).all() and (side == 52).all()
    assert _centre(None, volume.shape) == (20, 25, 30)
    assert (_views(volume, centre, right_voxels=100)[3] == 59).all()  # clipped to the volume


def test_the_preview_png_holds_four_panels(tmp_path):
    image = sitk.GetImageFromArray(np.random.default_rng(0).random((30, 40, 50), np.float32))
    labels = sitk.GetImageFromArray((sitk.GetArrayFromImage(image) > 0.5).astype(np.uint8))
    for picture in (image, labels):
        picture.SetSpacing((1.0, 1.0, 1.0))
    path = overlay_png(image, tmp_path / "p.png", labels, [{"value": 1, "color": [1, 0, 0]}])
    mosaic = sitk.GetArrayFromImage(sitk.ReadImage(path))
    # axial and coronal are as wide as x (50), both sagittal panels as y (40), each padded by 4.
    assert mosaic.shape[:2] == (40, 50 + 50 + 40 + 40 + 4 * 4)

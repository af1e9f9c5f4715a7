"""Renders a DeepMRI segmentation as Slicer shows it (axial and 3D views) for Docs/ and the index.

Uses Slicer's own view pipeline from `trame-slicer` (offscreen, no display) and the segmentation node
DeepMRILib makes; run it in its own environment, because trame-slicer pins its own slicer-core:

    python -m venv /tmp/trame && /tmp/trame/bin/pip install "trame-slicer[standalone]" SimpleITK
    PYTHONPATH=DeepMRI /tmp/trame/bin/python Resources/make_screenshots.py \
        --input scan.nii.gz --labels labels.nii.gz --card card.json -o Docs/images/segmentation.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image
from trame_slicer.core import SlicerApp
from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition
from vtkmodules.util.numpy_support import vtk_to_numpy
from vtkmodules.vtkRenderingCore import vtkWindowToImageFilter

VIEW_SIZE = 560


def _capture(view) -> Image.Image:
    """The view's render window as an RGB image (VTK's origin is bottom-left: flip rows)."""
    window = view.render_window()
    view.render()
    grabber = vtkWindowToImageFilter()
    grabber.SetInput(window)
    grabber.ReadFrontBufferOff()
    grabber.Update()
    image = grabber.GetOutput()
    width, height, _ = image.GetDimensions()
    pixels = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(height, width, -1)[::-1, :, :3]
    return Image.fromarray(np.ascontiguousarray(pixels))


def render(input_path: Path, labels_path: Path, card_path: Path, output: Path) -> Path:
    from DeepMRILib import mrml

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    axial = app.view_manager.create_view(ViewLayoutDefinition.axial_view())
    threed = app.view_manager.create_view(ViewLayoutDefinition.threed_view())
    for view in (axial, threed):  # sized before fitting, so the fit uses the final shape
        view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)
    volume = app.io_manager.load_volumes([str(input_path)])[0]
    card = json.loads(card_path.read_text())
    segmentation = mrml.segmentation_node_from_labels(
        sitk.ReadImage(str(labels_path)),
        card["labels"],
        app.scene,
        mrml.output_name(volume, "segmentation", card["id"]),
        reference_node=volume,
    )
    segmentation.CreateClosedSurfaceRepresentation()
    display = segmentation.GetDisplayNode()
    display.SetOpacity2DFill(0.45)
    # Surfaces of nested tissue classes hide each other: all but the innermost (last) translucent.
    count = segmentation.GetSegmentation().GetNumberOfSegments()
    for index in range(count):
        segment_id = segmentation.GetSegmentation().GetNthSegmentID(index)
        display.SetSegmentOpacity3D(segment_id, 1.0 if index == count - 1 else 0.25)
    app.display_manager.show_volume_in_slice_background(volume)
    app.display_manager.reset_views()
    threed.renderer().GetActiveCamera().Elevation(25)
    threed.renderer().GetActiveCamera().Azimuth(35)
    threed.reset_camera()
    images = [_capture(axial), _capture(threed)]
    canvas = Image.new("RGB", (2 * VIEW_SIZE + 8, VIEW_SIZE), (32, 32, 32))
    for column, image in enumerate(images):
        canvas.paste(image, (column * (VIEW_SIZE + 8), 0))
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output, optimize=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, required=True)
    parser.add_argument("--labels", type=Path, required=True)
    parser.add_argument(
        "--card", type=Path, required=True, help="card.json giving label names and colours"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    arguments = parser.parse_args()
    print(render(arguments.input, arguments.labels, arguments.card, arguments.output))


if __name__ == "__main__":
    main()

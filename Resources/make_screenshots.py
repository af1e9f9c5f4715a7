"""Renders a DeepMRI segmentation as Slicer shows it (axial and 3D views) for Docs/ and the index.

Uses Slicer's own view pipeline from `trame-slicer` (offscreen, no display) and the segmentation node
DeepMRILib makes; run it in its own environment, because trame-slicer pins its own slicer-core:

    python -m venv /tmp/trame && /tmp/trame/bin/pip install "trame-slicer[standalone]" SimpleITK
    PYTHONPATH=DeepMRI /tmp/trame/bin/python Resources/make_screenshots.py \
        --input scan.nii.gz --labels labels.nii.gz --card card.json -o Docs/images/segmentation.png

With `--planes`, one row per input (repeat --input/--labels; optional --reference masks drawn as
a yellow outline): the mid-sagittal, coronal and axial slices through the brain's centre and the
lowest axial slice of the reference that holds brain, where a cut-off lower edge shows.
`--at R A S` puts the first three through that point (RAS mm) instead, to show one place.
`--foreground` (one per input) lays a map over each row as the modules' *Overlay map* shows it
(half-transparent, Iron colours), read as the segment task's uncertainty map; the labels are then
drawn as outlines only.
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


def _ras_centre_and_lowest(mask_path: Path) -> tuple[np.ndarray, float]:
    """RAS centre of a mask's voxels and the RAS z of its lowest axial slice (LPS from ITK)."""
    mask = sitk.ReadImage(str(mask_path))
    indices = np.argwhere(sitk.GetArrayViewFromImage(mask) > 0)[:, ::-1]  # (i, j, k)
    if not indices.size:
        raise SystemExit(
            f"{mask_path} is empty: the views are placed by a mask's voxels; give a --reference "
            "mask (its outline is drawn) for a row whose labels are empty"
        )
    points = np.array([mask.TransformIndexToPhysicalPoint(i.tolist()) for i in indices[::97]])
    lowest = mask.TransformIndexToPhysicalPoint(indices[indices[:, 2].argmin()].tolist())[2]
    centre = points.mean(axis=0) * np.array([-1.0, -1.0, 1.0])
    return centre, float(lowest)


def render_planes(
    inputs: list[Path],
    labels: list[Path],
    card_path: Path,
    output: Path,
    references: list[Path] | None = None,
    titles: list[str] | None = None,
    at: list[float] | None = None,
    foregrounds: list[Path] | None = None,
) -> Path:
    """Rows of four slice views (mid-sagittal, coronal, axial, lowest axial) per input.

    `at` (RAS mm): the sagittal, coronal and axial views pass through that point instead.
    `foregrounds`: a map per input laid over its row (`_show_map`).
    """
    from DeepMRILib import mrml
    from make_task_screenshots import _captioned

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    views = {
        "sagittal": app.view_manager.create_view(ViewLayoutDefinition.sagittal_view()),
        "coronal": app.view_manager.create_view(ViewLayoutDefinition.coronal_view()),
        "axial": app.view_manager.create_view(ViewLayoutDefinition.axial_view()),
    }
    for view in views.values():
        view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)
    if len(inputs) != len(labels) or any(
        extra and len(extra) != len(inputs) for extra in (references, foregrounds)
    ):
        raise SystemExit("give as many --labels (and --reference, --foreground) as --input")
    card = json.loads(card_path.read_text())
    rows = []
    shown = []
    # The first segmentation a fresh scene shows is drawn with an opaque fill whatever its
    # opacity: the first row is rendered twice and its first rendering dropped.
    order = [0, *range(len(inputs))]
    for row in order:
        input_path, labels_path = inputs[row], labels[row]
        for node in shown:
            node.GetDisplayNode().SetVisibility(False)
        volume = app.io_manager.load_volumes([str(input_path)])[0]
        segmentation = mrml.segmentation_node_from_labels(
            sitk.ReadImage(str(labels_path)), card["labels"], app.scene, f"labels {row}",
            reference_node=volume,
        )  # fmt: skip
        segmentation.GetDisplayNode().SetOpacity2DFill(0.0 if foregrounds else 0.35)
        shown = [segmentation]
        reference_path = references[row] if references else labels_path
        if references:
            outline = mrml.segmentation_node_from_labels(
                sitk.ReadImage(str(reference_path)) > 0,
                [{"value": 1, "name": "reference", "color": [1.0, 0.9, 0.1]}],
                app.scene, f"reference {row}", reference_node=volume,
            )  # fmt: skip
            outline.GetDisplayNode().SetOpacity2DFill(0.0)
            outline.GetDisplayNode().SetSliceIntersectionThickness(2)
            shown.append(outline)
        app.display_manager.show_volume_in_slice_background(volume)
        if foregrounds:
            _show_map(app, foregrounds[row])
        app.display_manager.reset_views()
        centre, lowest = _ras_centre_and_lowest(reference_path)
        name = titles[row] if titles else input_path.name
        planes = [
            ("sagittal", 0.0 if abs(centre[0]) < 10 else centre[0], f"{name}: mid-sagittal"),
            ("coronal", centre[1], f"{name}: coronal"),
            ("axial", centre[2], f"{name}: axial"),
        ]
        if at:
            planes = [
                ("sagittal", at[0], f"{name}: sagittal, R = {at[0]:.0f} mm"),
                ("coronal", at[1], f"{name}: coronal, A = {at[1]:.0f} mm"),
                ("axial", at[2], f"{name}: axial, S = {at[2]:.0f} mm"),
            ]
        planes.append(("axial", lowest + 1.0, f"{name}: lowest brain slice (z = {lowest:.0f} mm)"))
        captures = []
        for orientation, offset, title in planes:
            view = views[orientation]
            view.set_slice_value(float(offset))
            captures.append(_captioned(_capture(view), title))
        rows.append(captures)
    rows = rows[1:]
    width = 4 * (VIEW_SIZE + 8) - 8
    canvas = Image.new("RGB", (width, len(rows) * (VIEW_SIZE + 8) - 8), (32, 32, 32))
    for row, captures in enumerate(rows):
        for column, image in enumerate(captures):
            canvas.paste(image, (column * (VIEW_SIZE + 8), row * (VIEW_SIZE + 8)))
    # Twelve views at full size are 1.3 MB: two thirds and a 256-colour palette keep the
    # captions readable at half that.
    smaller = canvas.resize((canvas.width * 2 // 3, canvas.height * 2 // 3), Image.LANCZOS)
    output.parent.mkdir(parents=True, exist_ok=True)
    smaller.quantize(256).save(output, optimize=True)
    return output


def _show_map(app, path: Path, output: str = "uncertainty") -> None:
    """A map over the slice views as the modules' *Overlay map* shows it (`show_overlay`), the
    node named as the task logic names that output (its range follows the name)."""
    from DeepMRILib.tasklogic import OUTPUT_ATTRIBUTE, show_overlay

    node = app.io_manager.load_volumes([str(path)])[0]
    node.SetAttribute(OUTPUT_ATTRIBUTE, output)
    show_overlay(app.scene, node)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, nargs="+", required=True)
    parser.add_argument("--labels", type=Path, nargs="+", required=True)
    parser.add_argument("--planes", action="store_true", help="rows of four planes per input")
    parser.add_argument("--reference", type=Path, nargs="*", help="masks drawn as an outline")
    parser.add_argument("--titles", nargs="*", help="row captions")
    parser.add_argument("--foreground", type=Path, nargs="*", help="maps laid over, one per input")
    parser.add_argument(
        "--at", type=float, nargs=3, metavar=("R", "A", "S"), help="slices through this point"
    )
    parser.add_argument(
        "--card", type=Path, required=True, help="card.json giving label names and colours"
    )
    parser.add_argument("-o", "--output", type=Path, required=True)
    arguments = parser.parse_args()
    if arguments.planes:
        print(
            render_planes(
                arguments.input, arguments.labels, arguments.card, arguments.output,
                arguments.reference, arguments.titles, arguments.at, arguments.foreground,
            )
        )  # fmt: skip
        return
    print(render(arguments.input[0], arguments.labels[0], arguments.card, arguments.output))


if __name__ == "__main__":
    main()

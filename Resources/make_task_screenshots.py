"""Renders registration, super-resolution and synthesis results as Slicer's slice views show them.

Slicer's own view pipeline from `trame-slicer` (offscreen), in the separate environment that
Resources/make_screenshots.py describes; volumes become nodes through DeepMRILib as in the modules.
Each picture is a row of panels, one slice view each, from the files the `deepmri` CLI writes:

    PYTHONPATH=DeepMRI /tmp/trame/bin/python Resources/make_task_screenshots.py registration \
        --fixed MNI152.nii.gz --moving ch2bet.nii.gz --result reg/ -o Docs/images/registration-slicer.png
    ... superresolution --thick thick.nii.gz --cubic cubic.nii.gz --ours ssl.nii.gz \
        --truth truth.nii.gz -o Docs/images/superresolution-slicer.png
    ... synthesis --source ch2.nii.gz --synthetic syn/synthetic.nii.gz \
        -o Docs/images/synthesis-slicer.png
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_screenshots import VIEW_SIZE, _capture  # noqa: E402

GAP = 8
VIEWS = {"axial": "axial_view", "coronal": "coronal_view", "sagittal": "sagittal_view"}


@dataclass
class Layer:
    """A volume in a slice view. `colours`: a Slicer colour node id ("vtkMRMLColorTableNodeRainbow");
    `window`: the displayed range (min, max), else Slicer's automatic window/level; voxels below
    `threshold` are not drawn (a map over only part of the image)."""

    image: sitk.Image
    colours: str | None = None
    window: tuple[float, float] | None = None
    threshold: float | None = None

    def add_to(self, scene, name: str):
        from DeepMRILib import mrml

        node = mrml.volume_node_from_image(self.image, scene, name)
        display = node.GetDisplayNode()
        if self.colours:
            display.SetAndObserveColorNodeID(self.colours)
        if self.window:
            display.AutoWindowLevelOff()
            display.SetWindowLevelMinMax(*self.window)
        if self.threshold is not None:
            display.SetApplyThreshold(1)
            display.SetLowerThreshold(self.threshold)
            display.SetUpperThreshold(float(np.max(sitk.GetArrayViewFromImage(self.image))))
        return node


@dataclass
class Panel:
    """One slice view: a background layer, optionally a foreground over it, and a caption."""

    title: str
    background: Layer
    foreground: Layer | None = None
    opacity: float = 0.5


def render_panels(panels: list[Panel], orientation: str, output: Path) -> Path:
    """The panels side by side, each as the same slice view shows it, captions at the top."""
    from trame_slicer.core import SlicerApp
    from trame_slicer.views import DirectViewFactory, ViewLayoutDefinition

    app = SlicerApp()
    app.view_manager.register_factory(DirectViewFactory(do_render_offscreen=True))
    view = app.view_manager.create_view(getattr(ViewLayoutDefinition, VIEWS[orientation])())
    view.render_window().SetSize(VIEW_SIZE, VIEW_SIZE)
    captures = []
    for index, panel in enumerate(panels):
        background = panel.background.add_to(app.scene, f"panel {index}")
        app.display_manager.show_volume_in_slice_background(background)
        composite = app.scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
        composite.SetForegroundVolumeID(None)
        if panel.foreground is not None:
            foreground = panel.foreground.add_to(app.scene, f"panel {index} over")
            composite.SetForegroundVolumeID(foreground.GetID())
            composite.SetForegroundOpacity(panel.opacity)
        if index == 0:
            app.display_manager.reset_views()  # one field of view for every panel
        captures.append(_captioned(_capture(view), panel.title))
    canvas = Image.new("RGB", (len(captures) * (VIEW_SIZE + GAP) - GAP, VIEW_SIZE), (32, 32, 32))
    for column, image in enumerate(captures):
        canvas.paste(image, (column * (VIEW_SIZE + GAP), 0))
    output.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(output, optimize=True)
    return output


def _captioned(image: Image.Image, text: str) -> Image.Image:
    draw = ImageDraw.Draw(image)
    draw.rectangle((0, 0, VIEW_SIZE, 26), fill=(0, 0, 0))
    draw.text((8, 6), text, fill=(255, 255, 255))
    return image


def _read(path: Path) -> sitk.Image:
    return sitk.Cast(sitk.ReadImage(str(path)), sitk.sitkFloat32)


def _normalised(image: sitk.Image) -> sitk.Image:
    """Intensities over the 99th percentile of the non-zero voxels, so two contrasts compare."""
    values = sitk.GetArrayViewFromImage(image)
    return image / float(np.percentile(values[values > 0], 99))


def registration_panels(fixed_path: Path, moving_path: Path, result: Path) -> list[Panel]:
    """Before (moving over fixed), checkerboard of fixed and registered, and the Jacobian."""
    fixed = _normalised(_read(fixed_path))
    moving = _normalised(_read(moving_path))
    warped = _normalised(_read(result / "warped.nii.gz"))
    moving_on_fixed = sitk.Resample(moving, fixed, sitk.Transform(), sitk.sitkLinear, 0.0)
    board = sitk.CheckerBoard(fixed, sitk.Cast(warped, fixed.GetPixelID()), [6, 6, 6])
    hot = "vtkMRMLColorTableNodeIron"
    panels = [
        Panel(
            "Before: fixed (grey), moving (iron)",
            Layer(fixed),
            Layer(moving_on_fixed, hot, threshold=0.05),
        ),
        Panel("Checkerboard of fixed and registered", Layer(board)),
        Panel(
            "After: fixed (grey), registered (iron)",
            Layer(fixed),
            Layer(warped, hot, threshold=0.05),
        ),
    ]
    jacobian = result / "jacobian.nii.gz"
    if jacobian.exists():
        # Inside the fixed brain only; 0.001 keeps folded voxels (<= 0) out of sight, which the
        # measures count (folding_pct).
        brain = sitk.Cast(fixed > 0.05, sitk.sitkFloat32)
        inside = sitk.Mask(_read(jacobian), sitk.Cast(brain, sitk.sitkUInt8), -1.0)
        rainbow = Layer(inside, "vtkMRMLColorTableNodeRainbow", (0.5, 1.5), threshold=0.001)
        panels.append(
            Panel("Jacobian 0.5 (purple) .. 1 (green) .. 1.5 (red)", Layer(fixed), rainbow, 0.8)
        )
    return panels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="task", required=True)
    registration = commands.add_parser("registration")
    registration.add_argument("--fixed", type=Path, required=True)
    registration.add_argument("--moving", type=Path, required=True)
    registration.add_argument("--result", type=Path, required=True, help="deepmri register -o")
    superresolution = commands.add_parser("superresolution")
    for name in ("thick", "cubic", "ours", "truth"):
        superresolution.add_argument(f"--{name}", type=Path, required=True)
    synthesis = commands.add_parser("synthesis")
    synthesis.add_argument("--source", type=Path, required=True)
    synthesis.add_argument("--synthetic", type=Path, required=True)
    for command in (registration, superresolution, synthesis):
        command.add_argument("-o", "--output", type=Path, required=True)
    arguments = parser.parse_args()
    if arguments.task == "registration":
        panels = registration_panels(arguments.fixed, arguments.moving, arguments.result)
        orientation = "axial"
    elif arguments.task == "superresolution":
        titles = {
            "thick": "Thick slices (input)",
            "cubic": "Cubic B-spline",
            "ours": "DeepMRI ssl (quick budget)",
            "truth": "1 mm truth",
        }
        panels = [Panel(t, Layer(_read(getattr(arguments, n)))) for n, t in titles.items()]
        orientation = "coronal"  # across the thick slices
    else:
        panels = [
            Panel("Acquired T1w (source)", Layer(_read(arguments.source))),
            Panel("T1w -> T2w (synthetic)", Layer(_read(arguments.synthetic))),
        ]
        orientation = "axial"
    print(render_panels(panels, orientation, arguments.output))


if __name__ == "__main__":
    main()

"""Writes one synthetic brain-extraction training image with its target before and after the
shells' CSF label was stopped at CSF_BORDER_MM (Docs/training.md, runs/be-14), for a picture.

The image (the MNI brain in synthetic shells: a 3 mm CSF layer, the widest wobble) is the same
for both targets; `before` labels all of the shell's CSF as the mask's (label 2), `after` only
what lies within CSF_BORDER_MM of the tight brain; `border.nii.gz` is that 3 mm line. Then:

    PYTHONPATH=DeepMRI .venv/bin/python Resources/write_shell_label_example.py /tmp/rim
    PYTHONPATH=DeepMRI /tmp/trame/bin/python Resources/make_screenshots.py --planes \
        --input /tmp/rim/image.nii.gz /tmp/rim/image.nii.gz \
        --labels /tmp/rim/before.nii.gz /tmp/rim/after.nii.gz \
        --reference /tmp/rim/border.nii.gz /tmp/rim/border.nii.gz \
        --titles "before: the shells' CSF all label 2" "after: label 2 stops 3 mm from the brain" \
        --card DeepMRI/Resources/Models/brain-extraction/card.json \
        -o Docs/images/brain-extraction-shell-label.png
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from deepmri.masks import distance_outside_mm
from deepmri.train.labels import CSF_BORDER_MM, mni_source
from deepmri.train.synth import BRAIN_EXTRACTION, GridSpec, generate, sample_parameters

GRID = GridSpec((96, 112, 96), 2.0)


def example_parameters(sources):
    """Seed 2 with a 3 mm CSF shell, the widest wobble, no pose change, little bias or noise."""
    params = sample_parameters(2, BRAIN_EXTRACTION, sources, GRID.spacing)
    params.source, params.mode = "mni", "synthetic"
    params.shells_mm = [3.0, 2.0, 3.0, 2.0, 5.0, 3.0]
    params.shell_wobble_mm = 2.5
    params.crop_mm = [0.0] * 6
    params.rotation_deg = params.translation_mm = [0.0, 0.0, 0.0]
    params.thick_axis, params.invert, params.noise, params.bias_strength = -1, False, 0.01, 0.1
    return params


def write(array: np.ndarray, path: Path) -> None:
    """On the generator's RAS grid: array (z, y, x) with x to the right, y anterior, z superior."""
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((GRID.spacing,) * 3)
    image.SetDirection((-1, 0, 0, 0, -1, 0, 0, 0, 1))  # RAS-ordered axes in ITK's LPS
    half = [n * GRID.spacing / 2 for n in GRID.shape]  # (z, y, x): the grid centred on 0
    image.SetOrigin((half[2], half[1], -half[0]))
    sitk.WriteImage(image, str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    folder = parser.parse_args().folder
    folder.mkdir(parents=True, exist_ok=True)
    sources = {"mni": mni_source()}
    params = example_parameters(sources)
    image, after = generate(params, sources, GRID)
    uncapped = {"mni": replace(sources["mni"], tight_distance=None)}
    _, before = generate(params, uncapped, GRID)
    border = distance_outside_mm(after == 1, (GRID.spacing,) * 3) <= CSF_BORDER_MM
    write(image.astype(np.float32), folder / "image.nii.gz")
    write(before.astype(np.uint8), folder / "before.nii.gz")
    write(after.astype(np.uint8), folder / "after.nii.gz")
    write(border.astype(np.uint8), folder / "border.nii.gz")
    volume = GRID.spacing**3 / 1000.0
    print(
        f"label 2: {(before == 2).sum() * volume:.0f} mL before, {(after == 2).sum() * volume:.0f} mL after"
    )


if __name__ == "__main__":
    main()

"""Brain masks over Colin27 (T1, T2-like, thick slices) in three planes plus the lowest slices.

Rows: the Colin27 variants of eval_segmentation.py; columns: mid-sagittal, coronal, axial through
the brain's centre, and the lowest axial slice of ch2bet that holds brain (a flat lower edge shows
here). Contours: ch2bet (yellow), the default mask (red), the tight --no-csf brain (green).

    python Testing/benchmarks/render_brain_masks.py Docs/images/brain-extraction-colin27.png [MODEL]

MODEL: a brain-extraction model id or folder (default the bundled one).

    python Testing/benchmarks/render_brain_masks.py --write-cases DIR

writes the Colin27 variants, their reference masks, the segment task's brain and tissue labels
(the bundled models) and brain extraction's uncertainty map to DIR, for Slicer's own views
(Resources/make_screenshots.py --planes [--foreground]).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

from deepmri.models import ModelStore  # noqa: E402
from deepmri.tasks.segment import BRAIN_EXTRACTION, segment, tight_brain  # noqa: E402
from eval_segmentation import array, brain_cases  # noqa: E402


def write_cases(folder: Path) -> None:
    import SimpleITK as sitk
    from deepmri.tasks.segment import BRAIN_TISSUE

    folder.mkdir(parents=True, exist_ok=True)
    for name, (image, reference) in brain_cases().items():
        if name == "colin27_moved":
            continue
        sitk.WriteImage(image, str(folder / f"{name}.nii.gz"))
        mask = sitk.GetImageFromArray(reference.astype(np.uint8))
        mask.CopyInformation(image)
        sitk.WriteImage(mask, str(folder / f"{name}_reference.nii.gz"))
        brain = segment(image, BRAIN_EXTRACTION, device="cpu", uncertainty=True)
        sitk.WriteImage(brain.labels, str(folder / f"{name}_brain.nii.gz"))
        sitk.WriteImage(brain.uncertainty, str(folder / f"{name}_brain_uncertainty.nii.gz"))
        tissue = segment(image, BRAIN_TISSUE, device="cpu").labels
        sitk.WriteImage(tissue, str(folder / f"{name}_tissue.nii.gz"))
        print(f"wrote {name}", flush=True)


def main(argv: list[str]) -> int:
    if argv[:1] in (["-h"], ["--help"]):
        print(__doc__)
        return 0
    if argv[:1] == ["--write-cases"]:
        write_cases(Path(argv[1]))
        return 0
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.set_num_threads(1)
    output = Path(argv[0] if argv else "brain-extraction-colin27.png")
    model = argv[1] if len(argv) > 1 else BRAIN_EXTRACTION
    tight_labels = ModelStore().get(model).card.tight_labels
    cases = {k: v for k, v in brain_cases().items() if k != "colin27_moved"}
    figure, axes = plt.subplots(len(cases), 4, figsize=(16, 4.2 * len(cases)))
    for row, (name, (image, reference)) in enumerate(cases.items()):
        labels = array(segment(image, model, device="cpu").labels)
        values = array(image)
        spacing = image.GetSpacing()
        centre = np.argwhere(reference).mean(0).astype(int)
        lowest = int(np.argwhere(reference.any(axis=(1, 2)))[0, 0])
        reached = np.argwhere((labels > 0).any(axis=(1, 2)))
        gap = (int(reached[0, 0]) - lowest) * spacing[2] if len(reached) else float("inf")
        mid_x = values.shape[2] // 2
        views = [
            ("mid-sagittal", lambda v, x=mid_x: v[:, :, x], spacing[2] / spacing[1]),
            ("coronal", lambda v, y=centre[1]: v[:, y, :], spacing[2] / spacing[0]),
            ("axial", lambda v, z=centre[0]: v[z], spacing[1] / spacing[0]),
            (
                f"lowest ch2bet slice (z={lowest})",
                lambda v, z=lowest: v[z],
                spacing[1] / spacing[0],
            ),
        ]
        for column, (title, cut, aspect) in enumerate(views):
            axis = axes[row, column]
            axis.imshow(cut(values), cmap="gray", origin="lower", aspect=aspect)
            axis.contour(cut(reference), levels=[0.5], colors="yellow", linewidths=0.8)
            axis.contour(cut(labels > 0), levels=[0.5], colors="red", linewidths=0.8)
            if tight_labels:
                tight = tight_brain(labels, tight_labels) > 0
                axis.contour(cut(tight), levels=[0.5], colors="lime", linewidths=0.6)
            axis.set_title(f"{name}: {title}" + (f", gap {gap:.0f} mm" if column == 3 else ""))
            axis.axis("off")
    figure.suptitle(f"{model}: ch2bet (yellow), default mask (red), tight --no-csf brain (green)")
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=60)
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

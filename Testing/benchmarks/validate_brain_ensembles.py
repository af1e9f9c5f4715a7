"""Brain extraction at 1 mm on the synthetic validation set: one network against averaged passes.

Asks whether averaging probabilities before the labels are drawn beats the shipped model's
single pass at the voxel size users bring: (a) the model with itself on its grid shifted by
half a voxel along every axis (a 2 mm network then samples the boundary every 1 mm), and (b)
the model with a second one (for example the 1.5 mm candidate). Every pass is the segment task's
own (`_run_model`: resampled to the card's grid, the card's left-right mean, probabilities back
to 1 mm), then the card's steps and each CSF border as `validate_csf_border.py --input-spacing 1`
draws them; the same seeds and figures (mask Dice, leak beyond 3 mm from the target's tight
brain, coverage). Seeds 900000000+i, never trained on; no Colin27. Last line: JSON.

    python Testing/benchmarks/validate_brain_ensembles.py [--model brain-extraction]
        [--second candidates/brain-extraction-be16] [--images 24] [--borders 3 3.5 4]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from unittest import mock

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))

from deepmri import geometry, preprocess  # noqa: E402
from deepmri.models import ModelStore  # noqa: E402
from deepmri.tasks.segment import _run_model, limit_csf_border, postprocess_labels  # noqa: E402
from deepmri.train.labels import build_sources  # noqa: E402
from deepmri.train.segment import RECIPES  # noqa: E402
from validate_csf_border import mask_figures, summarise, validation_scan  # noqa: E402


def shifted_resampler(shift_mm: float):
    """`resample_to_spacing` with the model grid moved by `shift_mm` along each of its axes."""

    def resample(image: sitk.Image, spacing, *args, **kwargs) -> sitk.Image:
        grid = geometry.resample_to_spacing(image, spacing, *args, **kwargs)
        direction = np.asarray(grid.GetDirection()).reshape(3, 3)
        origin = np.asarray(grid.GetOrigin()) + direction @ np.full(3, shift_mm)
        return sitk.Resample(
            image, grid.GetSize(), sitk.Transform(), sitk.sitkLinear, tuple(origin),
            grid.GetSpacing(), grid.GetDirection(), 0.0, image.GetPixelID(),
        )  # fmt: skip

    return resample


def probabilities(scan: sitk.Image, model, shift_mm: float = 0.0) -> np.ndarray:
    """The segment task's probabilities for one model on `scan`'s grid."""
    with mock.patch.object(preprocess, "resample_to_spacing", shifted_resampler(shift_mm)):
        output = _run_model(scan, model, torch.device("cpu"), "fp32", None, False, _quiet, None)
    return output.probabilities


def _quiet(*_: object) -> None:
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-extraction", help="model id or folder")
    parser.add_argument("--second", default=None, help="a second model to average with")
    parser.add_argument("--images", type=int, default=24, help="validation images")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"), help="label-map cache")
    parser.add_argument("--borders", type=float, nargs="+", default=[3.0, 3.5, 4.0])
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    store = ModelStore()
    first = store.get(arguments.model)
    second = store.get(arguments.second) if arguments.second else None
    card = first.card.to_dict()
    steps = card | {"postprocessing": [s for s in card["postprocessing"] if s != "csf_border"]}
    half_voxel = float(card["preprocessing"]["spacing"][0]) / 2
    recipe = RECIPES["brain-extraction"]
    sources = build_sources(arguments.cache, "brain-extraction", lambda *_: None, mni152_head=False)
    spacing = np.ones(3)
    figures: dict[str, list[dict[str, float]]] = {}
    start = time.perf_counter()
    for index in range(arguments.images):
        scan, target = validation_scan(recipe, sources, index, 1.0)  # the same images at 1 mm
        plain = probabilities(scan, first)
        passes = {
            "single": plain,
            "half_voxel_shift": (plain + probabilities(scan, first, half_voxel)) / 2,
        }
        if second is not None:
            other = probabilities(scan, second)
            passes["second_alone"] = other
            passes["with_second"] = (plain + other) / 2
        reference, tight = target > 0, ndimage.binary_fill_holes(target == 1)
        for name, mean in passes.items():
            labels = postprocess_labels(np.argmax(mean, axis=0), steps, spacing)
            for border in arguments.borders:
                drawn = limit_csf_border(labels, card["tight_labels"], spacing, border)
                key = f"{name}_{border:g}mm"
                figures.setdefault(key, []).append(mask_figures(drawn, reference, tight, spacing))
        print(
            f"image {index + 1}/{arguments.images} {time.perf_counter() - start:.0f} s", flush=True
        )
    results = summarise(figures)
    results["images"] = arguments.images
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

"""Brain extraction on the recipe's fixed synthetic validation set, with and without "csf_border".

Decides whether the card lists the "csf_border" post-processing step, and at which border:
predicted CSF around the brain farther than the border from the predicted tight brain becomes
background, as the training labels drop CSF beyond `CSF_BORDER_MM`. Scored on the training
recipe's own validation images (seeds 900000000+i, never trained on; no Colin27). For each
border: Dice of the default mask (labels > 0) against the target's, the mask's volume farther
than `CSF_BORDER_MM` from the target's tight brain (mL, the synthetic twin of the evaluation's
leak figure), the share of the target's tight brain inside the mask, and the mask's Dice
against the target's tight brain (the twin of scoring a default mask against a tight reference,
as the evaluation scores it against ch2bet). The first line, "target", scores the targets
themselves: what a network that drew the convention perfectly would get. `--core-thresholds`
adds each border measured from the confident brain, P(brain) >= t. Every run takes the
card's other steps (largest component, filled holes) and its left-right mean. The card takes
the border of best mask Dice. Last line: JSON.

By default the images are drawn on the network's own 2 mm grid and the steps run there, where a
border can only fall between voxel distances 2, 2.83, 3.46 and 4 mm. `--input-spacing 1` draws
the same validation seeds at 1 mm, the voxel size of the scans users bring, and runs them through
the segment task as a user's scan goes (resampled to the model grid, probabilities back to 1 mm,
the steps on the 1 mm grid), so borders between those distances can be told apart.

    python Testing/benchmarks/validate_csf_border.py [--model brain-extraction] [--images 24]
        [--cache runs/cache] [--borders 3 4 5 6 8] [--threads 1] [--input-spacing 1]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).parent))

from deepmri.models import ModelStore  # noqa: E402
from deepmri.tasks.segment import limit_csf_border, postprocess_labels, segment  # noqa: E402
from deepmri.train.labels import CSF_BORDER_MM, build_sources  # noqa: E402
from deepmri.train.segment import (  # noqa: E402
    RECIPES,
    VALIDATION_SEED_BASE,
    make_pair,
    recipe_on_card_grid,
)
from deepmri.train.synth import GridSpec  # noqa: E402
from eval_segmentation import coverage, dice, leak_ml  # noqa: E402


def mask_figures(
    prediction: np.ndarray, reference: np.ndarray, tight: np.ndarray, spacing: np.ndarray
) -> dict[str, float]:
    """The evaluation's figures: Dice against the target's default mask, leak and coverage
    against its tight brain, and Dice against the tight brain (`dice_tight`, the synthetic twin
    of the evaluation's default-mask Dice against the tight ch2bet: how much a border costs when
    the reference holds no CSF)."""
    mask = prediction > 0
    return {
        "dice": dice(mask, reference),
        "dice_tight": dice(mask, tight),
        "leak_ml": leak_ml(mask, tight, spacing, CSF_BORDER_MM),
        "coverage": coverage(mask, tight),
    }


def summarise(figures: dict[str, list[dict[str, float]]]) -> dict[str, float]:
    """Per configuration, the mean of each figure over the images and the leak's median and
    maximum (a few images carry most of the leak, a thick fluid band taken in whole, so the
    median says what a typical image leaks); a line printed for each."""
    results: dict[str, float] = {}
    width = max(len(name) for name in figures)
    for name, values in figures.items():
        for key in values[0]:
            results[f"{name}_{key}"] = round(float(np.mean([v[key] for v in values])), 4)
        leaks = [v["leak_ml"] for v in values]
        results[f"{name}_leak_ml_median"] = round(float(np.median(leaks)), 2)
        results[f"{name}_leak_ml_max"] = round(max(leaks), 2)
        print(
            f"{name:{width}s} dice {results[f'{name}_dice']:.4f} (against the tight brain "
            f"{results[f'{name}_dice_tight']:.4f}) leak {results[f'{name}_leak_ml']:.2f}"
            f" mL (median {results[f'{name}_leak_ml_median']:.2f}, max "
            f"{results[f'{name}_leak_ml_max']:.2f}) coverage {results[f'{name}_coverage']:.4f}"
        )
    return results


def network_grid_labels(
    model, recipe, sources, images: int, without_border: dict
) -> Iterator[tuple[np.ndarray, np.ndarray, None]]:
    """Per validation image on the network's grid: the labels after the card's steps but the
    border, and the target's labels."""
    network = model.load_network(device="cpu").eval()
    grid = GridSpec(recipe.shape, recipe.spacing)
    spacing = np.full(3, recipe.spacing)
    for index in range(images):
        image, target = make_pair(recipe, sources, VALIDATION_SEED_BASE + index, grid)
        with torch.no_grad():
            plain = torch.softmax(network(image[None]).float(), 1)
            mirrored = torch.softmax(network(image[None].flip(4)).float(), 1).flip(4)
        class_index = ((plain + mirrored) / 2).argmax(1)[0].numpy()
        yield postprocess_labels(class_index, without_border, spacing), target[0].numpy(), None


def input_grid_labels(
    model, recipe, sources, images: int, without_border: dict, input_spacing: float
) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The same seeds drawn at `input_spacing` and segmented by the task, as a user's scan is:
    per image the labels after the card's steps but the border (the task runs a copy of the
    model folder with that card), the target's labels and the probability of the tight brain."""
    with tempfile.TemporaryDirectory() as folder:
        copy = Path(folder) / model.path.name
        shutil.copytree(model.path, copy)
        (copy / "card.json").write_text(json.dumps(without_border, indent=2))
        brain_name = next(
            label["name"]
            for label in without_border["labels"]
            if label["value"] in without_border["tight_labels"]
        )
        for index in range(images):
            scan, target = validation_scan(recipe, sources, index, input_spacing)
            result = segment(scan, str(copy), device="cpu", probabilities=True)
            brain = sitk.GetArrayFromImage(result.probabilities[brain_name])
            yield sitk.GetArrayFromImage(result.labels), target, brain


def validation_scan(
    recipe, sources, index: int, input_spacing: float
) -> tuple[sitk.Image, np.ndarray]:
    """Validation seed `index` drawn at `input_spacing` over the recipe's field of view, as a
    scan a user brings (RAS, as drawn), and the target's labels."""
    shape = tuple(round(n * recipe.spacing / input_spacing) for n in recipe.shape)
    image, target = make_pair(
        recipe, sources, VALIDATION_SEED_BASE + index, GridSpec(shape, input_spacing)
    )
    scan = sitk.GetImageFromArray(image[0].numpy())
    scan.SetSpacing([input_spacing] * 3)
    scan.SetDirection((-1.0, 0.0, 0.0, 0.0, -1.0, 0.0, 0.0, 0.0, 1.0))
    return scan, target[0].numpy()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-extraction", help="model id or folder")
    parser.add_argument("--images", type=int, default=24, help="validation images")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"), help="label-map cache")
    parser.add_argument(
        "--borders", type=float, nargs="+", default=[CSF_BORDER_MM], help="csf_border_mm values"
    )
    parser.add_argument(
        "--core-thresholds",
        type=float,
        nargs="*",
        default=[],
        help="also measure each border from the confident brain, P(brain) >= each value "
        "(with --input-spacing)",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (the last digit can move with it)"
    )
    parser.add_argument(
        "--input-spacing",
        type=float,
        default=None,
        help="draw the images at this voxel size (mm) and segment them through the task "
        "(default: the network's own grid)",
    )
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    model = ModelStore().get(arguments.model)
    card = model.card.to_dict()
    # The 1 mm images are the same for every model; the network-grid images follow the card's
    # grid (a model trained with --spacing 1.5 sees 1.5 mm voxels).
    recipe = RECIPES["brain-extraction"]
    if arguments.input_spacing is None:
        recipe = recipe_on_card_grid(card)
    sources = build_sources(arguments.cache, "brain-extraction", lambda *_: None, mni152_head=False)
    without_border = card | {
        "postprocessing": [step for step in card["postprocessing"] if step != "csf_border"]
    }
    without_border.pop("csf_border_mm", None)
    if arguments.core_thresholds and arguments.input_spacing is None:
        parser.error("--core-thresholds needs --input-spacing (the task's probabilities)")
    # name -> (border, core threshold): the border measured from P(brain) >= the threshold.
    borders = {"without": (None, None)} | {f"with_{b:g}mm": (b, None) for b in arguments.borders}
    borders |= {
        f"with_{b:g}mm_core{t:g}": (b, t)
        for b in arguments.borders
        for t in arguments.core_thresholds
    }
    if arguments.input_spacing is None:
        spacing = np.full(3, recipe.spacing)
        cases = network_grid_labels(model, recipe, sources, arguments.images, without_border)
    else:
        spacing = np.full(3, arguments.input_spacing)
        cases = input_grid_labels(
            model, recipe, sources, arguments.images, without_border, arguments.input_spacing
        )
    # "target": the labels themselves scored as a prediction, what a network that drew its
    # training convention perfectly would score on each figure.
    figures: dict[str, list[dict[str, float]]] = {name: [] for name in ["target", *borders]}
    start = time.perf_counter()
    for labels, target, brain in cases:
        reference, tight = target > 0, ndimage.binary_fill_holes(target == 1)
        figures["target"].append(mask_figures(reference, reference, tight, spacing))
        for name, (border, threshold) in borders.items():
            # The card's last step, as the task draws it (brain-extraction's label values are
            # its class indices, so one call serves the network's grid and the task's output).
            core = None if threshold is None else brain >= threshold
            prediction = (
                labels
                if border is None
                else limit_csf_border(labels, card["tight_labels"], spacing, border, core)
            )
            figures[name].append(mask_figures(prediction, reference, tight, spacing))
    results = summarise(figures)
    results["images"] = arguments.images
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

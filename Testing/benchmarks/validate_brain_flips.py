"""Brain extraction on the recipe's fixed synthetic validation set, with and without test-time flips.

Chooses the card's `inference.average_flips` on the training recipe's own validation images (seeds
900000000+i, never trained on; no Colin27): Dice of the mask (labels > 0) and of the tight brain
(label 1) for the plain pass, the left-right mean and the mean over flips of all three axes.
Last line: JSON.

    python Testing/benchmarks/validate_brain_flips.py [--model brain-extraction] [--images 24] [--cache runs/cache]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from deepmri.models import ModelStore
from deepmri.train.labels import build_sources
from deepmri.train.segment import (
    VALIDATION_SEED_BASE,
    make_pair,
    recipe_on_card_grid,
    validation_scores,
)
from deepmri.train.synth import GridSpec

FLIP_SETS = {"plain": [()], "left_right": [(), (4,)], "all_axes": [(), (2,), (3,), (4,)]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="brain-extraction", help="model id or folder")
    parser.add_argument("--images", type=int, default=24, help="validation images")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"), help="label-map cache")
    arguments = parser.parse_args()
    torch.set_num_threads(1)
    model = ModelStore().get(arguments.model)
    network = model.load_network(device="cpu").eval()
    recipe = recipe_on_card_grid(model.card.to_dict())
    sources = build_sources(arguments.cache, "brain-extraction", lambda *_: None, mni152_head=False)
    grid = GridSpec(recipe.shape, recipe.spacing)
    passes = sorted({flip for flips in FLIP_SETS.values() for flip in flips})
    scores: dict[str, list[list[float]]] = {name: [] for name in FLIP_SETS}
    start = time.perf_counter()
    for index in range(arguments.images):
        image, target = make_pair(recipe, sources, VALIDATION_SEED_BASE + index, grid)
        with torch.no_grad():
            probabilities = {
                flip: torch.softmax(network(image[None].flip(flip)).float(), 1).flip(flip)
                for flip in passes
            }
        for name, flips in FLIP_SETS.items():
            mean = torch.stack([probabilities[flip] for flip in flips]).mean(0)
            prediction = mean.argmax(1)[0]
            scores[name].append(validation_scores(prediction, target[0], recipe.model_id, 3))
    results = {}
    for name, values in scores.items():
        mask, tight = np.mean(values, axis=0)
        results[f"{name}_mask"], results[f"{name}_tight"] = round(mask, 4), round(tight, 4)
        results[f"{name}_mean"] = round((mask + tight) / 2, 4)
        print(f"{name:11s} mask {mask:.4f} tight {tight:.4f}")
    results["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

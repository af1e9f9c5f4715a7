"""Brain-extraction weights on the straight line between two models of one lineage, scored on the
training recipe's synthetic validation set.

W(a) = (1 - a) W(first) + a W(second), in fp32 from the two weight files, written as model folders
(fp16, the first model's card with the new weights' hash) so that `validate_real_head.py` and the
evaluation can read them. The second model must descend from the first by fine-tuning: only then
do the two lie in one basin, where such a line keeps most of the fine-tuning's gain while giving
back part of what it lost (weight-space ensembling, WiSE-FT: Wortsman et al., CVPR 2022). Scores
are the trainer's own `validate` (mask and tight-brain Dice) on its fixed validation seeds, drawn
with the recipe settings given here (they must be those of the runs compared; no Colin27).

    python Testing/benchmarks/validate_weight_interpolation.py --first brain-extraction \
        --second candidates/brain-extraction-be15 --alphas 0 0.25 0.5 0.75 1 --out /tmp/interp \
        [--bias-max 1.0] [--mni152-head-share 0.5] [--images 24] [--cache runs/cache]

Last line: JSON, {alpha: [mask Dice, tight Dice]}.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

import torch
from deepmri.models import ModelStore, save_model
from deepmri.train.labels import build_sources
from deepmri.train.segment import (
    BRAIN_EXTRACTION,
    build_network,
    recipe_on_card_grid,
    validate,
    validation_pairs,
)


def interpolated(first: dict, second: dict, alpha: float) -> dict[str, torch.Tensor]:
    """(1 - alpha) first + alpha second, key by key, in fp32."""
    if first.keys() != second.keys():
        raise ValueError("the two models' weights have different keys: not one architecture")
    return {k: torch.lerp(first[k].float(), second[k].float(), alpha) for k in first}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--first", required=True, help="model id or folder (a = 0)")
    parser.add_argument("--second", required=True, help="model id or folder (a = 1)")
    parser.add_argument("--alphas", type=float, nargs="+", required=True)
    parser.add_argument("--out", type=Path, required=True, help="folder for the model folders")
    parser.add_argument("--bias-max", type=float, default=1.0)
    parser.add_argument("--mni152-head-share", type=float, default=0.5)
    parser.add_argument("--images", type=int, default=24, help="validation images")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    parser.add_argument("--threads", type=int, default=1)
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    store = ModelStore()
    first, second = store.get(arguments.first), store.get(arguments.second)
    weights = [m.load_network(device="cpu").state_dict() for m in (first, second)]
    recipe = replace(
        recipe_on_card_grid(first.card.to_dict()),
        bias_max=arguments.bias_max,
        mni152_head_share=arguments.mni152_head_share,
    )
    sources = build_sources(
        arguments.cache, BRAIN_EXTRACTION, lambda *_: None, mni152_head=recipe.mni152_head_share > 0
    )
    pairs = validation_pairs(recipe, sources, arguments.images)
    card = first.card.to_dict()
    card["metrics"] = []  # held-out figures belong to the first model's weights, not these
    results: dict[str, list[float]] = {}
    for alpha in arguments.alphas:
        network = build_network(recipe)
        network.load_state_dict(interpolated(*weights, alpha))
        folder = arguments.out / f"a{alpha:g}"
        save_model(network, card, folder, dtype="float16")
        # scored as written: fp16 weights read back, as the task and the other scripts read them
        scores = validate(
            store.get(str(folder)).load_network(device="cpu"),
            pairs,
            recipe.out_channels,
            BRAIN_EXTRACTION,
        )
        results[f"{alpha:g}"] = scores
        print(f"a = {alpha:g}: mask {scores[0]:.4f} tight {scores[1]:.4f} -> {folder}", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

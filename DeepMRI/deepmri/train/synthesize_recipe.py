"""`deepmri train synthesize`'s entry: one recipe run, paired (simulator or a site's folders) or
unpaired (CycleGAN), then the export. Kept apart from both recipes so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deepmri.errors import DeepMRIError
from deepmri.train.synthesize import (
    ANY,
    FolderPairs,
    SynthesisRecipe,
    card_for,
    load_generator,
    train,
)
from deepmri.train.synthesize_unpaired import FolderVolumes, train_unpaired


def run_recipe(
    source: str,
    target: str,
    out: Path,
    *,
    minutes: float = 60.0,
    seed: int = 0,
    threads: int = 1,
    resume: bool = False,
    adversarial_weight: float | None = None,
    cosine_after: float = 0.5,
    learning_rate: float = 1e-3,
    mse_weight: float = 0.0,
    select: str = "mae",
    init_from: Path | None = None,
    loss_inside_brain: bool = False,
    tissue_prior: bool = False,
    prior_subjects: int = 3,
    iterations: int | None = None,
    bf16: bool = False,
    validation_subjects: int = 4,
    validate_every: int = 50,
    channels: tuple[int, ...] | None = None,
    export: Path | None = None,
    version: str = "0.1.0",
    source_dir: Path | None = None,
    target_dir: Path | None = None,
    register: str | None = None,
    unpaired: bool = False,
    cycle_weight: float = 10.0,
    identity_weight: float = 0.0,
    command: str = "",
) -> dict[str, Any]:
    """Train on simulator pairs, a site's folder pairs or (`unpaired`) a site's unpaired
    folders, and optionally export the best weights.

    `adversarial_weight` defaults to 0.01 paired (pix2pix, next to L1) and 1 unpaired (CycleGAN,
    next to `cycle_weight` x the cycle L1). `deepmri train synthesize` calls this; `command`
    (the exact command line) goes on the card.
    """
    torch.set_num_threads(threads)
    recipe = SynthesisRecipe(
        source=source,
        target=target,
        minutes=minutes,
        seed=seed,
        cosine_after=cosine_after,
        adversarial_weight=(1.0 if unpaired else 0.01)
        if adversarial_weight is None
        else adversarial_weight,
        learning_rate=learning_rate,
        mse_weight=mse_weight,
        select=select,
        init_from=str(init_from) if init_from else None,
        loss_inside_brain=loss_inside_brain,
        tissue_prior=tissue_prior,
        prior_subjects=prior_subjects,
        iterations=iterations,
        bf16=bf16,
        validation_subjects=validation_subjects,
        validate_every=validate_every,
        unpaired=unpaired,
        cycle_weight=cycle_weight,
        identity_weight=identity_weight,
    )
    if channels:
        recipe.channels = tuple(channels)
        recipe.strides = (2,) * (len(channels) - 1)
    if init_from and not Path(init_from).exists():
        raise DeepMRIError(f"--init-from {init_from}: no such file or model folder.")
    if (source_dir or target_dir) and not (source_dir and target_dir):
        raise DeepMRIError("--source-dir and --target-dir go together.")
    if unpaired and not source_dir:
        raise DeepMRIError(
            "--unpaired trains on a site's own volumes: give --source-dir and --target-dir "
            "(simulated pairs are paired by construction)."
        )
    if unpaired and (tissue_prior or init_from or source == ANY or register):
        raise DeepMRIError(
            "--unpaired takes neither --tissue-prior, --init-from, --register nor --source any."
        )
    if register and not source_dir:
        raise DeepMRIError("--register aligns a site's own pairs: give --source-dir/--target-dir.")
    pairs, site = None, None
    if unpaired:
        sources = FolderVolumes(source_dir, "source", recipe.spacing, recipe.patch)
        targets = FolderVolumes(target_dir, "target", recipe.spacing, recipe.patch)
        site = {"volumes": (len(sources.volumes), len(targets.volumes))}
        state = train_unpaired(recipe, out, sources, targets, resume=resume, command=command)
    else:
        if source_dir:
            pairs = FolderPairs(
                source_dir, target_dir, recipe.spacing, recipe.patch, register=register
            )
            site = {"volumes": (len(pairs.pairs), len(pairs.pairs)), "register": register}
        state = train(recipe, out, resume=resume, pairs=pairs, command=command)
    if site:
        site.update(source_dir=str(source_dir), target_dir=str(target_dir))
    if export:
        from deepmri.models import save_model

        generator = load_generator(recipe, out / "best_generator.pt")
        save_model(generator, card_for(recipe, state, command, version, site), export)
    return state

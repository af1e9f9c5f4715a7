"""Unpaired contrast synthesis (CycleGAN) on a site's own volumes: no pairs, no registration.

Two generators (source -> target, target -> source; MONAI UNets as the paired recipe) and two
MONAI PatchGAN discriminators, trained with least-squares adversarial losses, cycle consistency
(L1) and optionally an identity loss (Zhu et al., ICCV 2017; Mao et al., ICCV 2017). Source and
target volumes are drawn from two independently shuffled streams, so no pairing is used even
where file names match. Everything else (patches, normalisation, schedule, checkpoint and
resume, export) is the paired recipe's, `deepmri.train.synthesize`.

Run: deepmri train synthesize --source-dir T1 --target-dir T2 --unpaired --out DIR --export M
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmri.errors import DeepMRIError
from deepmri.train.synthesize import (
    PATCHES_PER_SUBJECT,
    SynthesisRecipe,
    SynthesisRun,
    _adam,
    _pad_to,
    _random_patch,
    brain_mae,
    brain_psnr,
    masked_losses,
    normalise_input,
    normalise_target,
    predict,
    read_on_grid,
    sitk_array,
)


class FolderVolumes:
    """The brain-only volumes of one folder on the model grid, normalised as `role` says.

    `role` "source": the task's input normalisation (percentile); "target": scaled so the
    99.5th percentile inside the brain is 1. The non-zero voxels are the brain. The last
    `validation` volumes (by file name) are held out for model selection.

    Examples:
        >>> t2 = FolderVolumes("site/t2", "target", spacing=2.0, patch=(64,) * 3)  # doctest: +SKIP
    """

    def __init__(self, folder, role: str, spacing: float, patch, validation: int = 1) -> None:
        folder = Path(folder)
        files = sorted(p for p in folder.iterdir() if p.is_file() and p.stat().st_size > 0)
        if len(files) < validation + 1:
            raise DeepMRIError(
                f"Found {len(files)} volume(s) in {folder}; unpaired training needs at least "
                f"{validation + 1} (one or more to train on, {validation} to select the weights)."
            )
        normalise = normalise_input if role == "source" else normalise_target
        self.names = [path.name for path in files]
        self.volumes = []
        for path in files:
            image = sitk_array(read_on_grid(path, spacing))
            brain = image > 0
            array, inside = _pad_to([normalise(image, brain), brain], patch)
            self.volumes.append((array, inside.astype(bool)))
        self.training = self.volumes[:-validation]
        self.validation = self.volumes[-validation:]


class Shuffled:
    """Endless indices 0..n-1, reshuffled every pass by its own generator.

    Source and target each get one, seeded apart, so which target volume comes with which source
    volume is random: unpaired training never sees the pairing a folder may have.

    Examples:
        >>> stream = Shuffled(3, np.random.default_rng(0))
        >>> sorted(next(stream) for _ in range(3))
        [0, 1, 2]
    """

    def __init__(self, count: int, rng: np.random.Generator) -> None:
        self.count, self.rng, self.order = count, rng, []

    def __iter__(self):
        return self

    def __next__(self) -> int:
        if not self.order:
            self.order = self.rng.permutation(self.count).tolist()
        return self.order.pop()


def build_cycle_networks(recipe: SynthesisRecipe) -> dict[str, torch.nn.Module]:
    """generator (source -> target), generator_back, discriminator (target), discriminator_back."""
    from monai.networks.nets import PatchDiscriminator

    from deepmri.nets import build_network

    def discriminator() -> torch.nn.Module:
        return PatchDiscriminator(
            spatial_dims=3,
            num_layers_d=3,
            channels=recipe.discriminator_channels,
            in_channels=1,
            out_channels=1,
            norm="INSTANCE",
        )

    return {
        "generator": build_network(recipe.architecture, recipe.network_config()),
        "generator_back": build_network(recipe.architecture, recipe.network_config()),
        "discriminator": discriminator(),
        "discriminator_back": discriminator(),
    }


def _lsgan(score: torch.Tensor, real: bool) -> torch.Tensor:
    return ((score - (1.0 if real else 0.0)) ** 2).mean()


def cycle_figures(forward, backward, volumes, patch) -> tuple[list[float], list[float]]:
    """MAE and PSNR inside the brain of volume -> forward -> backward against the volume."""
    maes, psnrs = [], []
    for array, brain in volumes:
        there = predict(forward, array, patch)[0] * brain
        back = predict(backward, there, patch)[0]
        maes.append(brain_mae(back, array, brain))
        psnrs.append(brain_psnr(back, array, brain))
    return maes, psnrs


def train_unpaired(
    recipe: SynthesisRecipe,
    out: Path,
    sources: FolderVolumes,
    targets: FolderVolumes,
    log=print,
    resume: bool = False,
    command: str = "",
) -> dict[str, Any]:
    """CycleGAN training; keeps the generators of the best cycle-consistency on held-out volumes.

    With no pairs there is no truth to validate against: the figure is the cycle (source ->
    target -> source and target -> source -> target) MAE / PSNR on the held-out volumes, a
    necessary condition only (an identity mapping is cycle-consistent too); the adversarial
    terms are what push the output towards the target contrast.
    """
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    networks = build_cycle_networks(recipe)
    g, g_back = networks["generator"], networks["generator_back"]
    d, d_back = networks["discriminator"], networks["discriminator_back"]
    run = SynthesisRun(
        recipe,
        out,
        networks,
        {
            "opt_g": _adam([g, g_back], recipe.learning_rate),
            "opt_d": _adam([d, d_back], recipe.learning_rate),
        },
        resume=resume,
        command=command,
        log=log,
    )
    opt_g, opt_d = run.optimisers["opt_g"], run.optimisers["opt_d"]
    source_order = Shuffled(len(sources.training), np.random.default_rng([recipe.seed, 1]))
    target_order = Shuffled(len(targets.training), np.random.default_rng([recipe.seed, 2]))
    run.state.setdefault("drawn", [])  # (source, target) volume indices: no pairing, by design
    run.start_clock()

    def validate(losses: dict[str, float]) -> None:
        maes, psnrs = cycle_figures(g, g_back, sources.validation, recipe.patch)
        back_maes, back_psnrs = cycle_figures(g_back, g, targets.validation, recipe.patch)
        figures = {
            **{name: round(value, 4) for name, value in losses.items()},
            "validation": "cycle",
            "validation_mae": round(float(np.mean(maes + back_maes)), 4),
            "validation_psnr": round(float(np.mean(psnrs + back_psnrs)), 3),
        }
        run.record(figures, {"generator": g, "generator_back": g_back})

    source = target = None
    while run.running():
        if source is None or run.iteration % PATCHES_PER_SUBJECT == 0:
            pick = (next(source_order), next(target_order))
            source, target = sources.training[pick[0]], targets.training[pick[1]]
            run.state["drawn"].append(list(pick))
        a, a_inside = _random_patch([source[0], source[1].astype(np.float32)], recipe.patch, rng)
        b, b_inside = _random_patch([target[0], target[1].astype(np.float32)], recipe.patch, rng)
        run.schedule()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            fake_b = g(a).float()
            fake_a = g_back(b).float()
            cycle_a = g_back(fake_b).float()
            cycle_b = g(fake_a).float()
            adversarial = _lsgan(d(fake_b)[-1].float(), True)
            adversarial = adversarial + _lsgan(d_back(fake_a)[-1].float(), True)
            cycle = masked_losses(cycle_a, a, a_inside, recipe)[1]
            cycle = cycle + masked_losses(cycle_b, b, b_inside, recipe)[1]
            loss = recipe.adversarial_weight * adversarial + recipe.cycle_weight * cycle
            if recipe.identity_weight > 0:
                same_b = masked_losses(g(b).float(), b, b_inside, recipe)[1]
                same_a = masked_losses(g_back(a).float(), a, a_inside, recipe)[1]
                loss = loss + recipe.identity_weight * (same_a + same_b)
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            loss_d = 0.5 * (
                _lsgan(d(b)[-1].float(), True)
                + _lsgan(d(fake_b.detach())[-1].float(), False)
                + _lsgan(d_back(a)[-1].float(), True)
                + _lsgan(d_back(fake_a.detach())[-1].float(), False)
            )
        opt_d.zero_grad()
        loss_d.backward()
        opt_d.step()
        if run.step_done():
            validate(
                {
                    "loss_cycle": cycle.item(),
                    "loss_adversarial": adversarial.item(),
                    "loss_d": loss_d.item(),
                }
            )
    return run.finish()

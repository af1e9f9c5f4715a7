"""Training recipe for contrast synthesis (T1w -> T2w, ...): pix2pix on simulated pairs, sized for a CPU.

Pairs come from the MR physics simulator (`deepmri.simulate`): the same warped anatomy seen by a
randomly drawn input protocol (with bias field and Rician noise) and by the fixed target
protocol (clean). The generator is MONAI's 3D UNet, the discriminator MONAI's PatchGAN
(`PatchDiscriminator`, conditioned on the input); loss L1 + lambda x least-squares adversarial
(Isola et al., CVPR 2017; Mao et al., ICCV 2017), the adversarial term after an L1-only warm-up.

Run: deepmri train synthesize --source T1w --target T2w --out DIR --minutes 60
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from deepmri.errors import DeepMRIError
from deepmri.intensity import normalize_percentile
from deepmri.simulate import Grid, SimulatedSubject, sample_subject, simulate_subject
from deepmri.tasks.synthesize import with_prior

TRAIN_SEEDS = 0  # training subjects: seed = TRAIN_SEEDS + run seed * 1_000_000 + i
VALIDATION_SEEDS = 900_000_000  # model selection (never trained on)
TEST_SEEDS = 950_000_000  # held-out evaluation (never trained on, never used for selection)
TARGET_SCALE_PERCENTILE = 99.5
PATCHES_PER_SUBJECT = 4  # simulating a subject costs about as much as two training steps


@dataclass
class SynthesisRecipe:
    """Everything that defines a training run (written into the card)."""

    source: str = "T1w"
    target: str = "T2w"
    spacing: float = 2.0
    grid_shape: tuple[int, int, int] = (80, 96, 80)
    patch: tuple[int, int, int] = (64, 64, 64)
    channels: tuple[int, ...] = (8, 16, 32, 64)
    discriminator_channels: int = 8
    strides: tuple[int, ...] = (2, 2, 2)
    learning_rate: float = 1e-3
    adversarial_weight: float = 0.01  # pix2pix's lambda = 100 for L1 against 1 for the GAN term
    warmup_fraction: float = 0.3  # L1 only for this share of the time budget
    cosine_after: float | None = 0.5  # learning rate decays (cosine) after this share; None: flat
    minutes: float = 60.0
    seed: int = 0
    validation_subjects: int = 4
    validate_every: int = 50
    mse_weight: float = 0.0  # loss = L1 + mse_weight x MSE (PSNR is a squared-error measure)
    select: str = "mae"  # the validation figure that picks the kept weights: "mae" or "psnr"
    init_from: str | None = None  # generator weights to start from (a warm start)
    # Loss over brain voxels only: the task sets the outside to 0 anyway, and a loss that also
    # asks for 0 just outside makes the network darken the (CSF-bright on T2w) brain border.
    loss_inside_brain: bool = False
    # A per-tissue prior as a second input channel, the output a correction added to it
    # (`deepmri.PriorResidualUNet`): the untrained network is the prior, a soft per-tissue
    # baseline. Its table (CSF, GM, WM -> mean target) is fitted on `prior_subjects` training
    # subjects by least squares and goes on the card.
    tissue_prior: bool = False
    prior_subjects: int = 3
    iterations: int | None = None  # run length; the schedule follows it (else the minutes)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def grid(self) -> Grid:
        return Grid(tuple(self.grid_shape), self.spacing)

    @property
    def architecture(self) -> str:
        from deepmri.nets import PRIOR_RESIDUAL_UNET

        return PRIOR_RESIDUAL_UNET if self.tissue_prior else "monai.UNet"

    def network_config(self) -> dict[str, Any]:
        if self.tissue_prior:
            return {
                "spatial_dims": 3,
                "in_channels": 2,
                "features": 8,
                "channels": list(self.channels),
                "strides": list(self.strides),
                "num_res_units": 1,
                "norm": "instance",
                "prior_channel": 1,
            }
        return {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 1,
            "channels": list(self.channels),
            "strides": list(self.strides),
            "num_res_units": 1,
            "norm": "instance",
        }


def normalise_input(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The input as the task sees it: skull-stripped, then the card's percentile normalisation."""
    return normalize_percentile(np.where(brain, image, 0.0)) * brain


def normalise_target(image: np.ndarray, brain: np.ndarray) -> np.ndarray:
    """The target scaled so its 99.5th percentile inside the brain is 1 (0 stays 0: dark CSF)."""
    scale = float(np.percentile(image[brain], TARGET_SCALE_PERCENTILE)) if brain.any() else 1.0
    return (np.where(brain, image, 0.0) / max(scale, 1e-12)).astype(np.float32)


def make_pair(
    seed: int, source: str, target: str, grid: Grid, *, lesion: bool = False
) -> tuple[np.ndarray, np.ndarray, SimulatedSubject]:
    """One simulated subject's normalised (input, target) arrays on `grid`, and the subject."""
    params = sample_subject(seed, (source,), grid=grid, lesion=lesion)
    subject = simulate_subject(params, (source, target))
    brain = subject.brain
    return (
        normalise_input(subject.images[source], brain),
        normalise_target(subject.images[target], brain),
        subject,
    )


@dataclass
class _Brain:
    brain: np.ndarray


class FolderPairs:
    """A site's own co-registered pairs: files of the same name in `source_dir` and `target_dir`.

    Both are reoriented to RAS and resampled to `spacing`; the target is resampled onto the
    source's grid (the pairs must already be registered). Inputs are brain-only (skull-stripped):
    the source's non-zero voxels are the brain. The last `validation` pairs select the weights.

    Examples:
        >>> pairs = FolderPairs("site/t1", "site/t2", spacing=2.0)  # doctest: +SKIP
    """

    def __init__(self, source_dir, target_dir, spacing: float, patch, validation: int = 1):
        from deepmri.geometry import reorient, resample_like, resample_to_spacing
        from deepmri.io import read_image

        source_dir, target_dir = Path(source_dir), Path(target_dir)
        names = sorted(p.name for p in source_dir.iterdir() if (target_dir / p.name).exists())
        if len(names) < validation + 1:
            from deepmri.errors import DeepMRIError

            raise DeepMRIError(
                f"Found {len(names)} file name(s) present in both {source_dir} and {target_dir}; "
                f"training needs at least {validation + 1} pairs with matching names."
            )
        self.pairs = []
        for name in names:
            source = resample_to_spacing(
                reorient(read_image(source_dir / name), "RAS"), [spacing] * 3
            )
            target = resample_like(read_image(target_dir / name), source)
            image = sitk_array(source)
            brain = image > 0
            arrays = [normalise_input(image, brain), normalise_target(sitk_array(target), brain)]
            arrays.append(brain)
            arrays = _pad_to(arrays, patch)
            self.pairs.append((arrays[0], arrays[1], _Brain(arrays[2].astype(bool))))
        self.validation = self.pairs[-validation:]
        self.training = self.pairs[:-validation]

    def pair(self, index: int):
        return self.training[index % len(self.training)]


def sitk_array(image) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(image).astype(np.float32)


def _pad_to(arrays, patch):
    """Zero-pad (at the end) to at least `patch` and to multiples of 8 for the UNet."""
    shape = arrays[0].shape
    target = [max(p, -(-n // 8) * 8) for n, p in zip(shape, patch, strict=True)]
    pad = [(0, t - n) for n, t in zip(shape, target, strict=True)]
    return [np.pad(a, pad) for a in arrays]


def build_networks(recipe: SynthesisRecipe) -> tuple[torch.nn.Module, torch.nn.Module]:
    from monai.networks.nets import PatchDiscriminator

    from deepmri.nets import build_network

    generator = build_network(recipe.architecture, recipe.network_config())
    discriminator = PatchDiscriminator(
        spatial_dims=3,
        num_layers_d=3,
        channels=recipe.discriminator_channels,
        in_channels=recipe.network_config()["in_channels"] + 1,
        out_channels=1,
        norm="INSTANCE",
    )
    return generator, discriminator


def _random_patch(arrays, patch, rng) -> list[torch.Tensor]:
    """The same random window of each array, (1, C, *patch); arrays are (*spatial) or (C, *spatial)."""
    shape = arrays[-1].shape
    start = [int(rng.integers(0, max(n - p, 0) + 1)) for n, p in zip(shape, patch, strict=True)]
    window = (Ellipsis, *(slice(s, s + p) for s, p in zip(start, patch, strict=True)))
    return [_batch(a[window]) for a in arrays]


def _batch(array: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return tensor[None, None] if tensor.ndim == 3 else tensor[None]


def fit_prior_table(recipe: SynthesisRecipe) -> list[float]:
    """CSF, GM, WM mean target intensities: least squares of the target on the posteriors.

    Fitted on the first `prior_subjects` training subjects of the run's seed (never validation
    or held-out subjects).
    """
    from deepmri.tasks.synthesize import tissue_posteriors

    rows, values = [], []
    for index in range(recipe.prior_subjects):
        seed = TRAIN_SEEDS + recipe.seed * 1_000_000 + index
        image, target, subject = make_pair(seed, recipe.source, recipe.target, recipe.grid)
        rows.append(tissue_posteriors(image, subject.brain, invert=recipe.source != "T1w"))
        values.append(target[subject.brain])
    table = np.linalg.lstsq(np.concatenate(rows), np.concatenate(values), rcond=None)[0]
    return [round(float(value), 6) for value in table]


def prior_spec(recipe: SynthesisRecipe, table: list[float]) -> dict[str, Any]:
    """The card's `input.prior`: how the task computes the prior channel at inference."""
    return {
        "method": "gmm-tissue-posteriors",
        "classes": ["csf", "gm", "wm"],
        "table": list(table),
        "invert": recipe.source != "T1w",
        "channel": 1,
    }


def brain_mae(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    return float(np.abs(prediction[brain] - truth[brain]).mean())


def brain_psnr(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    """PSNR inside the brain, the peak being the truth's maximum there (as the evaluation)."""
    error = float(np.mean((prediction[brain] - truth[brain]) ** 2))
    return float(10.0 * np.log10(float(truth[brain].max()) ** 2 / max(error, 1e-12)))


def load_generator_weights(path: Path) -> dict[str, torch.Tensor]:
    """Generator weights from a run's `.pt` state dict or a model folder / `.safetensors` file."""
    path = Path(path)
    if path.is_dir():
        path = path / "weights.safetensors"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return {key: value.float() for key, value in load_file(str(path)).items()}
    return torch.load(path, weights_only=True)


def predict(
    generator: torch.nn.Module, image: np.ndarray, patch=(64, 64, 64), flips=()
) -> tuple[np.ndarray, np.ndarray | None]:
    """The generator on a normalised volume in tiles, as the task runs it (engine, CPU)."""
    from deepmri import engine

    result = engine.infer(generator, _batch(image), roi_size=patch, device="cpu", flips=flips)
    spread = None if result.uncertainty is None else result.uncertainty[0, 0].numpy()
    return result.prediction[0, 0].numpy(), spread


def train(
    recipe: SynthesisRecipe,
    out: Path,
    log=print,
    resume: bool = False,
    pairs: FolderPairs | None = None,
) -> dict[str, Any]:
    """Train for `recipe.minutes`; keep the weights of the best validation MAE in `out`.

    Pairs are simulated unless `pairs` (a site's own folders) is given.
    """
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    generator, discriminator = build_networks(recipe)
    if recipe.init_from and not (resume and (out / "checkpoint.pt").exists()):
        # Warm start (same architecture), e.g. T1w -> FLAIR from the T1w -> T2w generator.
        generator.load_state_dict(load_generator_weights(Path(recipe.init_from)))
    opt_g = torch.optim.Adam(generator.parameters(), recipe.learning_rate, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(discriminator.parameters(), recipe.learning_rate, betas=(0.5, 0.999))
    grid = recipe.grid
    checkpoint = out / "checkpoint.pt"
    state: dict[str, Any] = {"iteration": 0, "minutes": 0.0, "best": None, "history": []}
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        generator.load_state_dict(saved["generator"])
        discriminator.load_state_dict(saved["discriminator"])
        opt_g.load_state_dict(saved["opt_g"])
        opt_d.load_state_dict(saved["opt_d"])
        state = json.loads(saved["state"])
    if recipe.tissue_prior and not state.get("prior"):
        state["prior"] = prior_spec(recipe, fit_prior_table(recipe))
        log(json.dumps({"prior": state["prior"]}))
    prior = state.get("prior")
    if pairs is not None:
        validation = pairs.validation
    else:
        validation = [
            make_pair(VALIDATION_SEEDS + i, recipe.source, recipe.target, grid)
            for i in range(recipe.validation_subjects)
        ]
    validation = [(with_prior(x, s.brain, prior), y, s) for x, y, s in validation]
    budget = recipe.minutes * 60.0
    started = time.monotonic() - state["minutes"] * 60.0

    def validate(loss_l1: float | None, adversarial: bool) -> None:
        generator.eval()
        maes, psnrs = [], []
        for x, y, s in validation:
            prediction = predict(generator, x, recipe.patch)[0]
            maes.append(brain_mae(prediction, y, s.brain))
            psnrs.append(brain_psnr(prediction, y, s.brain))
        generator.train()
        state["minutes"] = (time.monotonic() - started) / 60.0
        entry = {
            "iteration": state["iteration"],
            "minutes": round(state["minutes"], 2),
            "l1": None if loss_l1 is None else round(loss_l1, 4),
            "validation_mae": round(float(np.mean(maes)), 4),
            "validation_psnr": round(float(np.mean(psnrs)), 3),
            "adversarial": adversarial,
        }
        state["history"].append(entry)
        log(json.dumps(entry))
        if state["best"] is None or _better(entry, state["best"], recipe.select):
            state["best"] = entry
            torch.save(generator.state_dict(), out / "best_generator.pt")
        torch.save(
            {
                "generator": generator.state_dict(),
                "discriminator": discriminator.state_dict(),
                "opt_g": opt_g.state_dict(),
                "opt_d": opt_d.state_dict(),
                "state": json.dumps(state),
            },
            checkpoint,
        )

    if recipe.tissue_prior and state["iteration"] == 0 and not state["history"]:
        validate(None, False)  # iteration 0: the prior alone (the head starts at zero)

    def running() -> bool:
        if recipe.iterations is not None and state["iteration"] >= recipe.iterations:
            return False
        return time.monotonic() - started < budget

    pair = None
    while running():
        iteration = state["iteration"]
        if pair is None or iteration % PATCHES_PER_SUBJECT == 0:
            seed = TRAIN_SEEDS + recipe.seed * 1_000_000 + iteration // PATCHES_PER_SUBJECT
            if pairs is not None:
                pair = pairs.pair(iteration // PATCHES_PER_SUBJECT)
            else:
                pair = make_pair(seed, recipe.source, recipe.target, grid)
            pair = (with_prior(pair[0], pair[2].brain, prior), pair[1], pair[2])
        arrays = [pair[0], pair[1], pair[2].brain.astype(np.float32)]
        source, target, inside = _random_patch(arrays, recipe.patch, rng)
        if recipe.iterations is not None:
            elapsed = iteration / recipe.iterations
        else:
            elapsed = (time.monotonic() - started) / budget
        adversarial = recipe.adversarial_weight if elapsed > recipe.warmup_fraction else 0.0
        if recipe.cosine_after is not None and elapsed > recipe.cosine_after:
            # Cosine decay to zero over the rest of the time budget (the validation MAE of a
            # constant 1e-3 swings by +-30% between checks).
            phase = (elapsed - recipe.cosine_after) / (1.0 - recipe.cosine_after)
            rate = recipe.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(phase, 1.0)))
            for optimiser in (opt_g, opt_d):
                for group in optimiser.param_groups:
                    group["lr"] = rate
        fake = generator(source)
        weight = inside if recipe.loss_inside_brain else torch.ones_like(inside)
        count = weight.sum().clamp(min=1.0)
        loss_l1 = ((fake - target).abs() * weight).sum() / count
        loss = loss_l1
        if recipe.mse_weight > 0:
            loss = loss + recipe.mse_weight * (((fake - target) ** 2) * weight).sum() / count
        if adversarial > 0:
            score = discriminator(torch.cat([source, fake], 1))[-1]
            loss = loss + adversarial * ((score - 1.0) ** 2).mean()
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        if adversarial > 0:
            real = discriminator(torch.cat([source, target], 1))[-1]
            false = discriminator(torch.cat([source, fake.detach()], 1))[-1]
            loss_d = 0.5 * (((real - 1.0) ** 2).mean() + (false**2).mean())
            opt_d.zero_grad()
            loss_d.backward()
            opt_d.step()
        state["iteration"] = iteration + 1
        if state["iteration"] % recipe.validate_every == 0:
            validate(loss_l1.item(), adversarial > 0)
    state["minutes"] = (time.monotonic() - started) / 60.0
    (out / "training.json").write_text(
        json.dumps({"recipe": asdict(recipe), **state}, indent=1), encoding="utf-8"
    )
    return state


def _better(entry: dict[str, Any], best: dict[str, Any], select: str) -> bool:
    if select == "psnr":
        return entry["validation_psnr"] > best.get("validation_psnr", -math.inf)
    return entry["validation_mae"] < best["validation_mae"]


def load_generator(recipe: SynthesisRecipe, path: Path) -> torch.nn.Module:
    generator, _ = build_networks(recipe)
    generator.load_state_dict(torch.load(path, weights_only=True))
    return generator.eval()


def card_for(recipe: SynthesisRecipe, state: dict[str, Any], command: str) -> dict[str, Any]:
    """The model card of a trained synthesis model (weights filled in by `save_model`)."""
    model_id = f"{recipe.source.lower()}-to-{recipe.target.lower()}"
    return {
        "id": model_id,
        "version": "0.1.0",
        "task": "synthesis",
        "description": (
            f"Synthetic {recipe.target} from a skull-stripped {recipe.source} brain MRI. "
            "Trained on SIMULATED images only (MR physics simulator on the MNI152 2009a tissue "
            "maps); never trained or checked on real paired scans. The output is synthetic."
            + (
                " The network adds a learnt correction to a per-tissue prior computed from the "
                "input (Gaussian-mixture tissue posteriors times each tissue's mean target "
                "intensity, card input.prior)."
                if recipe.tissue_prior
                else ""
            )
        ),
        "architecture": {"name": recipe.architecture, "config": recipe.network_config()},
        "input": _card_input(recipe, state),
        "output": {
            "contrast": recipe.target,
            "scale": "target scaled so its 99.5th percentile inside the brain is 1",
            "protocol": _target_protocol(recipe.target),
        },
        "preprocessing": {
            "spacing": [recipe.spacing] * 3,
            "orientation": "RAS",
            "normalization": {"method": "percentile", "lower": 0.5, "upper": 99.5},
            "mask": "brain-extraction",
        },
        "inference": {
            "patch_size": list(recipe.patch),
            "overlap": 0.5,
            "flips": [[4]],
            "average_flips": True,
        },
        "labels": [],
        "metrics": [],
        "training": {
            "data": (
                "Simulated pairs only: deepmri.simulate on the MNI ICBM152 2009a GM/WM maps "
                "(CSF = rest of the brain), random affine + smooth warps, literature relaxation "
                f"times at 1.5/3 T with 5% jitter, random {recipe.source} protocols "
                "(MPRAGE or spoiled GRE), bias field and Rician noise on the input; the target "
                f"is the fixed reference {recipe.target} protocol, clean. One anatomy (MNI): "
                "no real subjects, no pathology in training."
            ),
            "command": command,
            "recipe": asdict(recipe),
            "iterations": state["iteration"],
            "minutes": round(state["minutes"], 1),
            "best": state["best"],
            "validation_set": (
                f"{recipe.validation_subjects} simulated subjects, seeds {VALIDATION_SEEDS}+i "
                "(never trained on); the weights are those of the best validation "
                f"{recipe.select.upper()}"
            ),
        },
        "license": (
            "Apache-2.0 (weights); trained on images simulated from MNI ICBM152 2009a "
            "(\u00a9 McConnell Brain Imaging Centre)"
        ),
        "citation": (
            "Isola et al., CVPR 2017 (pix2pix); Fonov et al., NeuroImage 2011 (MNI ICBM152 "
            "2009a); Iglesias et al., Sci Adv 2023 (SynthSR)"
        ),
    }


def _card_input(recipe: SynthesisRecipe, state: dict[str, Any]) -> dict[str, Any]:
    """What the network takes: the normalised source, and with a prior how the task makes it."""
    if not recipe.tissue_prior:
        return {"contrasts": [recipe.source], "channels": 1}
    return {
        "contrasts": [recipe.source, "prior"],
        "channels": 2,
        "prior": state["prior"],
    }


def _target_protocol(target: str) -> dict[str, Any]:
    from deepmri.simulate import PROTOCOLS

    return PROTOCOLS[target].to_dict()


def run_recipe(
    source: str,
    target: str,
    out: Path,
    *,
    minutes: float = 60.0,
    seed: int = 0,
    threads: int = 1,
    resume: bool = False,
    adversarial_weight: float = 0.01,
    cosine_after: float = 0.5,
    learning_rate: float = 1e-3,
    mse_weight: float = 0.0,
    select: str = "mae",
    init_from: Path | None = None,
    loss_inside_brain: bool = False,
    tissue_prior: bool = False,
    iterations: int | None = None,
    export: Path | None = None,
    source_dir: Path | None = None,
    target_dir: Path | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Train on simulator pairs (or a site's folder pairs) and optionally export the best weights.

    `deepmri train synthesize` calls this; `command` (the exact command line) goes on the card.
    """
    torch.set_num_threads(threads)
    recipe = SynthesisRecipe(
        source=source,
        target=target,
        minutes=minutes,
        seed=seed,
        cosine_after=cosine_after,
        adversarial_weight=adversarial_weight,
        learning_rate=learning_rate,
        mse_weight=mse_weight,
        select=select,
        init_from=str(init_from) if init_from else None,
        loss_inside_brain=loss_inside_brain,
        tissue_prior=tissue_prior,
        iterations=iterations,
    )
    if init_from and not Path(init_from).exists():
        raise DeepMRIError(f"--init-from {init_from}: no such file or model folder.")
    pairs = None
    if source_dir or target_dir:
        if not (source_dir and target_dir):
            raise DeepMRIError("--source-dir and --target-dir go together.")
        pairs = FolderPairs(source_dir, target_dir, recipe.spacing, recipe.patch)
    state = train(recipe, out, resume=resume, pairs=pairs)
    if export:
        from deepmri.models import save_model

        generator = load_generator(recipe, out / "best_generator.pt")
        save_model(generator, card_for(recipe, state, command), export)
    return state


def main(argv: list[str] | None = None) -> int:
    """`python -m deepmri.train.synthesize ...` is `deepmri train synthesize ...`."""
    import sys

    from deepmri.cli import main as deepmri_main

    return deepmri_main(["train", "synthesize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

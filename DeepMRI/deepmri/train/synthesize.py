"""Training recipe for contrast synthesis (T1w -> T2w, ...): pix2pix on simulated pairs, sized for a CPU.

Pairs come from the MR physics simulator (`deepmri.simulate`): the same warped anatomy seen by a
randomly drawn input protocol (with bias field and Rician noise) and by the fixed target
protocol (clean). The generator is MONAI's 3D UNet, the discriminator MONAI's PatchGAN
(`PatchDiscriminator`, conditioned on the input); loss L1 + lambda x least-squares adversarial
(Isola et al., CVPR 2017; Mao et al., ICCV 2017), the adversarial term after an L1-only warm-up.

`--source any` is the SynthSR idea: inputs of any contrast (a random sequence family and
random timings per subject) and any resolution (thick slices along a random axis, half the
time), the target the reference T1w (MPRAGE) on the 2 mm synthesis grid.

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
from deepmri.simulate import (
    ANY,
    ANY_FAMILIES,
    Grid,
    SimulatedSubject,
    SubjectParameters,
    sample_subject,
    simulate_subject,
)
from deepmri.tasks.synthesize import with_prior

TRAIN_SEEDS = 0  # training subjects: seed = TRAIN_SEEDS + run seed * 1_000_000 + i
VALIDATION_SEEDS = 900_000_000  # model selection (never trained on)
TEST_SEEDS = 950_000_000  # held-out evaluation (never trained on, never used for selection)
TARGET_SCALE_PERCENTILE = 99.5
PATCHES_PER_SUBJECT = 4  # simulating a subject costs about as much as two training steps
# `--source any`: this share of the training subjects is acquired in thick slices (4-8 mm).
ANY_THICK_PROBABILITY = 0.5


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
    bf16: bool = False  # bfloat16 autocast for the training steps (validation stays fp32)
    # Unpaired (CycleGAN, `deepmri.train.synthesize_unpaired`): loss = adversarial (LSGAN)
    # + cycle_weight x cycle L1 + identity_weight x identity L1 (Zhu et al., ICCV 2017: 10, 5).
    unpaired: bool = False
    cycle_weight: float = 10.0
    identity_weight: float = 0.0
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
    """One simulated subject's normalised (input, target) arrays on `grid`, and the subject.

    `source` "any": a random contrast, in thick slices with `ANY_THICK_PROBABILITY`.
    """
    thick = ANY_THICK_PROBABILITY if source == ANY else 0.0
    params = sample_subject(seed, (source,), grid=grid, lesion=lesion, thick_probability=thick)
    return pair_from_parameters(params, source, target)


def pair_from_parameters(
    params: SubjectParameters, source: str, target: str
) -> tuple[np.ndarray, np.ndarray, SimulatedSubject]:
    """The normalised (input, target) of subject `params` (its input named `source`)."""
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
    source's grid (the pairs must already be registered, or `register` names the registration
    task's method, "rigid", "affine" or "deformable", that aligns each source onto its target
    first). Inputs are brain-only (skull-stripped): the source's non-zero voxels are the brain.
    The last `validation` pairs select the weights.

    Examples:
        >>> pairs = FolderPairs("site/t1", "site/t2", spacing=2.0)  # doctest: +SKIP
        >>> pairs = FolderPairs("t1", "t2", 2.0, (64,) * 3, register="affine")  # doctest: +SKIP
    """

    def __init__(
        self,
        source_dir,
        target_dir,
        spacing: float,
        patch,
        validation: int = 1,
        register: str | None = None,
    ):
        from deepmri.geometry import resample_like
        from deepmri.io import read_image

        source_dir, target_dir = Path(source_dir), Path(target_dir)
        names = sorted(p.name for p in source_dir.iterdir() if (target_dir / p.name).exists())
        if len(names) < validation + 1:
            raise DeepMRIError(
                f"Found {len(names)} file name(s) present in both {source_dir} and {target_dir}; "
                f"training needs at least {validation + 1} pairs with matching names."
            )
        self.pairs = []
        for name in names:
            source_image = read_image(source_dir / name)
            target_image = read_image(target_dir / name)
            if register:
                source_image = registered(source_image, target_image, register)
            source = on_grid(source_image, spacing)
            target = resample_like(target_image, source)
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


def read_on_grid(path: Path, spacing: float):
    """A volume from a file, reoriented to RAS and resampled to `spacing` mm (the model grid)."""
    from deepmri.io import read_image

    return on_grid(read_image(path), spacing)


def on_grid(image, spacing: float):
    """`image` reoriented to RAS and resampled to `spacing` mm (the model grid)."""
    from deepmri.geometry import reorient, resample_to_spacing

    return resample_to_spacing(reorient(image, "RAS"), [spacing] * 3)


def registered(moving, fixed, method: str):
    """`moving` aligned onto `fixed` (on its grid) by the project's registration task."""
    from deepmri.tasks import get_task

    result = get_task("register")({"fixed": fixed, "moving": moving}, {"method": method})
    return result.images["warped"]


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
        rows.append(tissue_posteriors(image, subject.brain, **_posterior_options(recipe)))
        values.append(target[subject.brain])
    table = np.linalg.lstsq(np.concatenate(rows), np.concatenate(values), rcond=None)[0]
    return [round(float(value), 6) for value in table]


def _posterior_options(recipe: SynthesisRecipe) -> dict[str, Any]:
    """How the classes of the input are named: by intensity for a known contrast, by anatomy
    for `--source any` (`deepmri.tasks.synthesize.anatomical_order`)."""
    if recipe.source == ANY:
        return {"invert": False, "order": "anatomy"}
    return {"invert": recipe.source != "T1w", "order": "intensity"}


def prior_spec(recipe: SynthesisRecipe, table: list[float]) -> dict[str, Any]:
    """The card's `input.prior`: how the task computes the prior channel at inference."""
    return {
        "method": "gmm-tissue-posteriors",
        "classes": ["csf", "gm", "wm"],
        "table": list(table),
        **_posterior_options(recipe),
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


class SynthesisRun:
    """What every synthesis training run shares, paired or not.

    The networks and their optimisers in one checkpoint (by name, so `--resume` restores them
    all), the clock and the learning-rate schedule (cosine after `recipe.cosine_after` of the
    iterations or the minutes), the validation history, and the best weights of the networks
    named in `record(keep=...)` as `best_<name>.pt`.

    Examples:
        >>> run = SynthesisRun(recipe, out, {"generator": g}, {"opt_g": opt})  # doctest: +SKIP
        >>> while run.running(): ...; run.step_done()  # doctest: +SKIP
    """

    def __init__(
        self,
        recipe: SynthesisRecipe,
        out: Path,
        networks: dict[str, torch.nn.Module],
        optimisers: dict[str, torch.optim.Optimizer],
        *,
        resume: bool = False,
        command: str = "",
        log=print,
    ) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.recipe, self.out, self.log = recipe, out, log
        self.networks, self.optimisers = networks, optimisers
        self.checkpoint = out / "checkpoint.pt"
        self.resumed = resume and self.checkpoint.exists()
        self.state: dict[str, Any] = {"iteration": 0, "minutes": 0.0, "best": None, "history": []}
        if self.resumed:
            saved = torch.load(self.checkpoint, weights_only=True)
            for name, part in {**networks, **optimisers}.items():
                part.load_state_dict(saved[name])
            self.state = json.loads(saved["state"])
        self.state.setdefault("commands", [])
        if command:
            self.state["commands"].append(command)
        self.budget = recipe.minutes * 60.0
        self.start_clock()

    def start_clock(self) -> None:
        """Count the budget from now (plus the minutes of earlier legs): call it once the
        validation set is made, which the budget does not pay for."""
        self.started = time.monotonic() - self.state["minutes"] * 60.0

    @property
    def iteration(self) -> int:
        return self.state["iteration"]

    def running(self) -> bool:
        if self.recipe.iterations is not None and self.iteration >= self.recipe.iterations:
            return False
        return time.monotonic() - self.started < self.budget

    def elapsed(self) -> float:
        """The share of the run done: of the iterations if given, else of the minutes."""
        if self.recipe.iterations is not None:
            return self.iteration / self.recipe.iterations
        return (time.monotonic() - self.started) / self.budget

    def schedule(self) -> float:
        """Set the learning rate for this step; returns `elapsed()`."""
        elapsed = self.elapsed()
        cosine_after = self.recipe.cosine_after
        if cosine_after is not None and elapsed > cosine_after:
            # Cosine decay to zero over the rest of the run (the validation MAE of a constant
            # 1e-3 swings by +-30% between checks).
            phase = (elapsed - cosine_after) / (1.0 - cosine_after)
            rate = self.recipe.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(phase, 1.0)))
            for optimiser in self.optimisers.values():
                for group in optimiser.param_groups:
                    group["lr"] = rate
        return elapsed

    def step_done(self) -> bool:
        """Count the step; True when it is time to validate."""
        self.state["iteration"] += 1
        return self.iteration % self.recipe.validate_every == 0

    def record(self, figures: dict[str, Any], keep: dict[str, torch.nn.Module]) -> dict[str, Any]:
        """Log a validation entry, keep the `keep` weights if it is the best, save the checkpoint."""
        self.state["minutes"] = (time.monotonic() - self.started) / 60.0
        entry = {"iteration": self.iteration, "minutes": round(self.state["minutes"], 2)}
        entry.update(figures)
        self.state["history"].append(entry)
        self.log(json.dumps(entry))
        if self.state["best"] is None or _better(entry, self.state["best"], self.recipe.select):
            self.state["best"] = entry
            for name, network in keep.items():
                torch.save(network.state_dict(), self.out / f"best_{name}.pt")
        saved = {name: part.state_dict() for name, part in self.networks.items()}
        saved.update({name: part.state_dict() for name, part in self.optimisers.items()})
        torch.save({**saved, "state": json.dumps(self.state)}, self.checkpoint)
        return entry

    def finish(self) -> dict[str, Any]:
        """Write `training.json` (recipe and state); returns the state."""
        self.state["minutes"] = (time.monotonic() - self.started) / 60.0
        (self.out / "training.json").write_text(
            json.dumps({"recipe": asdict(self.recipe), **self.state}, indent=1), encoding="utf-8"
        )
        return self.state


def _adam(networks, learning_rate: float) -> torch.optim.Adam:
    parameters = [p for network in networks for p in network.parameters()]
    return torch.optim.Adam(parameters, learning_rate, betas=(0.5, 0.999))


def masked_losses(
    fake, target, inside, recipe: SynthesisRecipe
) -> tuple[torch.Tensor, torch.Tensor]:
    """(L1, L1 + mse_weight x MSE) over the patch, or over brain voxels with `loss_inside_brain`."""
    weight = inside if recipe.loss_inside_brain else torch.ones_like(inside)
    count = weight.sum().clamp(min=1.0)
    loss_l1 = ((fake - target).abs() * weight).sum() / count
    loss = loss_l1
    if recipe.mse_weight > 0:
        loss = loss + recipe.mse_weight * (((fake - target) ** 2) * weight).sum() / count
    return loss_l1, loss


def validation_figures(generator, validation, patch) -> dict[str, float]:
    """Mean brain MAE and PSNR of `generator` over (input, truth, subject-with-brain) triples."""
    generator.eval()
    maes, psnrs = [], []
    for x, y, s in validation:
        prediction = predict(generator, x, patch)[0]
        maes.append(brain_mae(prediction, y, s.brain))
        psnrs.append(brain_psnr(prediction, y, s.brain))
    generator.train()
    return {
        "validation_mae": round(float(np.mean(maes)), 4),
        "validation_psnr": round(float(np.mean(psnrs)), 3),
    }


def train(
    recipe: SynthesisRecipe,
    out: Path,
    log=print,
    resume: bool = False,
    pairs: FolderPairs | None = None,
    command: str = "",
) -> dict[str, Any]:
    """Train for `recipe.minutes`; keep the weights of the best validation MAE in `out`.

    Pairs are simulated unless `pairs` (a site's own folders) is given. `command` is appended
    to the run's `commands` (the first run and each resume, in order).
    """
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    generator, discriminator = build_networks(recipe)
    run = SynthesisRun(
        recipe,
        out,
        {"generator": generator, "discriminator": discriminator},
        {
            "opt_g": _adam([generator], recipe.learning_rate),
            "opt_d": _adam([discriminator], recipe.learning_rate),
        },
        resume=resume,
        command=command,
        log=log,
    )
    opt_g, opt_d = run.optimisers["opt_g"], run.optimisers["opt_d"]
    if recipe.init_from and not run.resumed:
        # Warm start (same architecture), e.g. T1w -> FLAIR from the T1w -> T2w generator.
        generator.load_state_dict(load_generator_weights(Path(recipe.init_from)))
    state = run.state
    if recipe.tissue_prior and not state.get("prior"):
        state["prior"] = prior_spec(recipe, fit_prior_table(recipe))
        log(json.dumps({"prior": state["prior"]}))
    prior = state.get("prior")
    if pairs is not None:
        validation = pairs.validation
    else:
        validation = [
            make_pair(VALIDATION_SEEDS + i, recipe.source, recipe.target, recipe.grid)
            for i in range(recipe.validation_subjects)
        ]
    validation = [(with_prior(x, s.brain, prior), y, s) for x, y, s in validation]
    run.start_clock()

    def validate(loss_l1: float | None, adversarial: bool) -> None:
        figures = validation_figures(generator, validation, recipe.patch)
        l1 = None if loss_l1 is None else round(loss_l1, 4)
        run.record({"l1": l1, **figures, "adversarial": adversarial}, {"generator": generator})

    if recipe.tissue_prior and run.iteration == 0 and not state["history"]:
        validate(None, False)  # iteration 0: the prior alone (the head starts at zero)

    pair = None
    while run.running():
        iteration = run.iteration
        if pair is None or iteration % PATCHES_PER_SUBJECT == 0:
            seed = TRAIN_SEEDS + recipe.seed * 1_000_000 + iteration // PATCHES_PER_SUBJECT
            if pairs is not None:
                pair = pairs.pair(iteration // PATCHES_PER_SUBJECT)
            else:
                pair = make_pair(seed, recipe.source, recipe.target, recipe.grid)
            pair = (with_prior(pair[0], pair[2].brain, prior), pair[1], pair[2])
        arrays = [pair[0], pair[1], pair[2].brain.astype(np.float32)]
        source, target, inside = _random_patch(arrays, recipe.patch, rng)
        elapsed = run.schedule()
        adversarial = recipe.adversarial_weight if elapsed > recipe.warmup_fraction else 0.0
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            fake = generator(source).float()
        loss_l1, loss = masked_losses(fake, target, inside, recipe)
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
        if run.step_done():
            validate(loss_l1.item(), adversarial > 0)
    return run.finish()


def _better(entry: dict[str, Any], best: dict[str, Any], select: str) -> bool:
    if select == "psnr":
        return entry["validation_psnr"] > best.get("validation_psnr", -math.inf)
    return entry["validation_mae"] < best["validation_mae"]


def load_generator(recipe: SynthesisRecipe, path: Path) -> torch.nn.Module:
    generator, _ = build_networks(recipe)
    generator.load_state_dict(torch.load(path, weights_only=True))
    return generator.eval()


def card_for(
    recipe: SynthesisRecipe,
    state: dict[str, Any],
    command: str,
    version: str = "0.1.0",
    site: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The model card of a trained synthesis model (weights filled in by `save_model`).

    `training.commands` is the whole chain behind the weights: the commands on the card of the
    model warm-started from (`init_from`, a model folder), then this run's (first and resumes).
    `site`: trained on a site's own folders (`source_dir`, `target_dir`, `volumes`), not on
    simulated images; the card says so.
    """
    model_id = f"{recipe.source.lower()}-to-{recipe.target.lower()}"
    source = (
        "brain MRI of any contrast (T1w, T2w, PDw, FLAIR, gradient or inversion recovery "
        "echo of any timing) and resolution (thick slices resampled to 2 mm)"
        if recipe.source == ANY
        else f"{recipe.source} brain MRI"
    )
    return {
        "id": model_id,
        "version": version,
        "task": "synthesis",
        "description": (
            f"Synthetic {recipe.target} from a skull-stripped {source}. "
            + (
                _site_description(recipe, site)
                if site
                else "Trained on SIMULATED images only (MR physics simulator on the MNI152 "
                "2009a tissue maps); never trained or checked on real paired scans. "
            )
            + "The output is synthetic."
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
            "data": _site_description(recipe, site)
            if site
            else (
                "Simulated pairs only: deepmri.simulate on the MNI ICBM152 2009a GM/WM maps "
                "(CSF = rest of the brain), random affine + smooth warps, literature relaxation "
                f"times at 1.5/3 T with 5% jitter, {_input_protocols(recipe.source)}, bias "
                "field and Rician noise on the input; the target "
                f"is the fixed reference {recipe.target} protocol, clean. One anatomy (MNI): "
                "no real subjects, no pathology in training."
            ),
            "command": command,
            "commands": [*_warm_start_commands(recipe.init_from), *state.get("commands", [])],
            "recipe": asdict(recipe),
            "iterations": state["iteration"],
            "minutes": round(state["minutes"], 1),
            "best": state["best"],
            "validation_set": (
                f"{recipe.validation_subjects} simulated subjects, seeds {VALIDATION_SEEDS}+i "
                "(never trained on)"
                if not site
                else "the last volume(s) of each folder by file name (never trained on)"
            )
            + f"; the weights are those of the best validation {recipe.select.upper()}"
            + (" of the cycle (source -> target -> source, and back)" if recipe.unpaired else ""),
        },
        "license": (
            "Apache-2.0 (weights); trained on images simulated from MNI ICBM152 2009a "
            "(\u00a9 McConnell Brain Imaging Centre)"
        ),
        "citation": (
            ("Zhu et al., ICCV 2017 (CycleGAN); " if recipe.unpaired else "")
            + "Isola et al., CVPR 2017 (pix2pix); Fonov et al., NeuroImage 2011 (MNI ICBM152 "
            "2009a); Iglesias et al., Sci Adv 2023 (SynthSR)"
        ),
    }


def _site_description(recipe: SynthesisRecipe, site: dict[str, Any]) -> str:
    """What a model trained on a site's own folders was trained on."""
    if recipe.unpaired:
        return (
            f"Trained on a site's own UNPAIRED volumes (CycleGAN: cycle consistency + "
            f"least-squares adversarial losses): {site['volumes'][0]} {recipe.source} in "
            f"{site['source_dir']}, {site['volumes'][1]} {recipe.target} in "
            f"{site['target_dir']}, brain-only, drawn in independent random orders. "
        )
    aligned = (
        f"each source aligned onto its target by the registration task ({site['register']})"
        if site.get("register")
        else "co-registered beforehand"
    )
    return (
        f"Trained on a site's own pairs ({site['volumes'][0]} pairs of the same file name in "
        f"{site['source_dir']} and {site['target_dir']}, {aligned}), brain-only. "
    )


def _input_protocols(source: str) -> str:
    """The card's words for the inputs the network saw in training."""
    if source == ANY:
        return (
            f"inputs of any contrast (per subject one of {', '.join(ANY_FAMILIES)} with random "
            "TR/TE/TI/flip), half of them acquired in 4-8 mm slices along a random axis"
        )
    if source == "T1w":
        return "random T1w protocols (MPRAGE or spoiled GRE)"
    return f"random {source} protocols"


def _warm_start_commands(init_from: str | None) -> list[str]:
    """The training commands on the card of the model folder a run was warm-started from."""
    card = Path(init_from) / "card.json" if init_from else None
    if card is None or not card.is_file():
        return []
    training = json.loads(card.read_text(encoding="utf-8")).get("training") or {}
    return list(
        training.get("commands") or [training.get("command")] * bool(training.get("command"))
    )


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


def main(argv: list[str] | None = None) -> int:
    """`python -m deepmri.train.synthesize ...` is `deepmri train synthesize ...`."""
    import sys

    from deepmri.cli import main as deepmri_main

    return deepmri_main(["train", "synthesize", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

"""Training recipe for the pretrained thick-to-thin model: real 1 mm heads made thick, a small 3D CNN.

Training volumes: the MNI ICBM152 2009a T1 (nilearn; skull-stripped) and the pydeface mean whole
head (pydeface wheel), each normalised as the task normalises its input. Never Colin27 or
ch2better (the evaluation volumes). Each training patch is:

1. resampled from a volume with a random rotation (any axis may become the thick one, random
   flips, up to 15 degrees more) and a random voxel size of 0.6-1.4 source voxels (so sharper and
   smoother detail per voxel than the source has: 1 mm and 0.5 mm inputs look like that);
   With `elastic`, the sampling points are bent by a smooth random field too (new shapes of
   the same anatomy);
2. given a random contrast (gamma), scale and smooth bias field: this is the truth;
3. acquired as thick slices along its first axis by the forward model of `deepmri.superres.profile`
   (the one the evaluation uses): Gaussian (FWHM = thickness) or rect profile, a factor from
   `FACTORS`, thickness 60-100% of the spacing (a gap for the rest), random slice phase; Rician
   noise on the thick slices for a fifth of them;
4. interpolated back to the thin grid by cubic B-spline (`cubic_matrix`, as the task does).

The network (`deepmri.superres.net3d.ThickSliceNet3d`) sees the cubic volume with the spacing,
thickness and slice phase as channels (with `profile_channel`, also the profile's shape) and
predicts the residual; MSE loss on the patch interior. `init_from` starts from a model folder's
weights (new input channels get zero weights, so the start computes what that model does).
A fixed set of validation patches (the same training volumes, seeds never trained on, factors 4
and 6, both profiles, no noise) picks the weights: the least PSNR gain over cubic among the four
(factor, profile) cases.

Run: deepmri train superresolve --out DIR --minutes 60 [--resume] [--export FOLDER]
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.ndimage import map_coordinates, spline_filter
from scipy.spatial.transform import Rotation

from deepmri.superres.net3d import (
    ARCHITECTURE,
    PROFILE_INPUT_CHANNELS,
    ThickSliceNet3d,
    acquired_input,
    widen_inputs,
)
from deepmri.train.averaging import CHECKPOINT_KEY, weight_average

MODEL_ID = "thick-to-thin-3d"
# channels-last 3D convolutions take two thirds of the CPU time of the default layout (oneDNN)
CHANNELS_LAST = torch.channels_last_3d
FACTORS = (2, 3, 4, 5, 6)
VALIDATION_SEED = 900_000_000  # validation patches: this seed and up, never trained on
VALIDATION_CASES = (
    (4, "gaussian", 1.0),
    (4, "rect", 0.75),
    (6, "gaussian", 1.0),
    (6, "rect", 0.75),
)


@dataclass
class SuperResolveRecipe:
    """Everything that defines a training run (written into the card)."""

    width: int = 16
    depth: int = 7
    patch: tuple[int, int, int] = (40, 32, 32)  # network input: thick axis first
    border: int = 4  # voxels each side left out of the loss
    # "mse" or "l1". At learning rate 2e-3 neither learnt in 100-200 steps (output residual std
    # 3e-5 against 0.01-0.04 needed); MSE at 3e-4 did (+0.2 dB in 150 steps). PSNR is MSE.
    loss: str = "mse"
    batch: int = 4
    learning_rate: float = 3e-4  # 2e-3 (the per-volume network's) learnt nothing in 200 steps
    warmup: int = 50
    iterations: int = 1500
    minutes: float | None = None
    seed: int = 0
    factors: tuple[int, ...] = FACTORS
    thickness_share: tuple[float, float] = (0.6, 1.0)
    scale: tuple[float, float] = (0.6, 1.4)
    max_rotation_degrees: float = 15.0
    # Rician sigma on the thick slices, for a share of the patches. On half of them with up to
    # 0.03 the first 200 steps learnt denoising and no detail (validation gain +0.007 dB).
    noise: tuple[float, float] = (0.0, 0.02)
    noise_share: float = 0.2
    validation_patches: int = 32
    validate_every: int = 100
    # bfloat16 autocast for the training steps (validation and export stay fp32): 2.2-3.1x faster
    # steps on this recipe's networks with AMX-BF16 (Testing/benchmarks/bench_superresolve_step.py)
    bf16: bool = False
    # Exponential moving average of the weights (decay per step; 0: off). Validated, kept and
    # exported instead of the raw weights: with 4 patches a step the raw weights are noisy.
    ema: float = 0.0
    # The profile's shape (Gaussian or rect) as an input channel. Without it a rect slice of
    # thickness t and a Gaussian of FWHM t get the same conditioning, and 0.3.0's gain on the
    # 4x rect-with-gap validation patches at the source's own voxel size was 1.2 dB below its
    # Gaussian one (+1.94 vs +3.13 dB).
    profile_channel: bool = False
    rect_share: float = 0.5  # share of training patches with a rect profile
    # Smooth random displacement of the sampling points (up to this many source voxels; 0: off).
    # Two training volumes are two anatomies: the full-volume gain on them (+2.1/+2.5 dB, 4x rect
    # with a gap) is above the held-out one (+1.6), so the run sees them bent into new shapes.
    elastic: float = 0.0
    # Whole heads made from MNI152's real brain in synthetic shells (CSF rim, skull tables,
    # diploe, scalp, fat: the brain-extraction generator's hybrid images), this many, beside the
    # two real volumes. MNI152 is skull-stripped: its sharp artificial edge carried much of the
    # validation gain (+2.85 dB on its rim against +1.29 inside, 4x rect with a gap), while
    # whole heads such as Colin27 have a skull and scalp there. Never validated on.
    shelled_heads: int = 0
    init_from: str | None = None  # a model folder whose weights the run starts from
    extras: dict[str, Any] = field(default_factory=dict)

    def network_config(self) -> dict[str, Any]:
        config: dict[str, Any] = {"width": self.width, "depth": self.depth}
        if self.profile_channel:
            config["in_channels"] = PROFILE_INPUT_CHANNELS
        return config

    def network(self) -> ThickSliceNet3d:
        return ThickSliceNet3d(**self.network_config())


@dataclass
class TrainingVolume:
    """A normalised training volume (background 0, bright tissue near 1) and where to sample it."""

    name: str
    values: np.ndarray  # (k, j, i) float32
    coefficients: np.ndarray  # cubic spline coefficients of `values`
    centres: np.ndarray  # (m, 3) voxel indices inside the head
    validated: bool = True  # the fixed validation patches come from these volumes only

    @classmethod
    def of(cls, name: str, values: np.ndarray, validated: bool = True) -> TrainingVolume:
        from deepmri.superres.restore import _normalisation

        values = values.astype(np.float32)
        offset, scale = _normalisation(values)
        values = (values - offset) / scale
        centres = np.argwhere(values > 0.15)
        step = max(1, len(centres) // 200_000)
        coefficients = spline_filter(values, order=3, mode="nearest").astype(np.float32)
        return cls(name, values, coefficients, centres[::step], validated)


def training_volumes(cache_dir: Path, shelled_heads: int = 0) -> list[TrainingVolume]:
    """The MNI152 2009a T1 and the pydeface mean head (fetched with pip once, cached), then
    `shelled_heads` whole heads made from MNI152 (`shelled_mni_heads`)."""
    import SimpleITK as sitk

    from deepmri.data import load_mni152
    from deepmri.train.labels import fetch_pydeface_head

    mni = sitk.GetArrayFromImage(load_mni152("t1"))
    head = sitk.GetArrayFromImage(sitk.ReadImage(str(fetch_pydeface_head(Path(cache_dir)))))
    return [
        TrainingVolume.of("mni152-2009a", mni),
        TrainingVolume.of("pydeface-mean-head", head),
        *shelled_mni_heads(shelled_heads),
    ]


SHELLED_HEAD_SEED = 800_000_000
SHELLED_HEAD_GRID = (224, 256, 224)  # 1 mm, (z, y, x): the MNI brain, 25 mm of layers, pose


def _head_means(count: int, rng: np.random.Generator) -> list[float]:
    """Means of the generator's `count` label values, made like a T1 head: dark air, the real
    brain at its own scale (the hybrid image multiplies it by the grey-matter mean / 0.6), CSF
    around it dark as in the real brain, the other layers anywhere up to a little above it."""
    from deepmri.train.labels import CSF, GREY, OUTER_CSF

    means = [float(value) for value in rng.uniform(0.0, 1.2, count)]
    means[0] = float(rng.uniform(0.0, 0.05))
    means[GREY] = 0.6
    means[CSF] = float(rng.uniform(0.05, 0.35))
    means[OUTER_CSF] = means[CSF] * float(rng.uniform(0.85, 1.0))
    return means


def shelled_mni_heads(
    count: int, grid_shape: tuple[int, int, int] = SHELLED_HEAD_GRID
) -> list[TrainingVolume]:
    """`count` whole 1 mm heads: MNI152's real T1 inside its brain, synthetic layers around it.

    The brain-extraction generator's hybrid mode (`deepmri.train.synth`), seeded, with its
    pose, deformation and contrast of the layers, but none of its degradations (thick slices,
    noise, blur beyond half a voxel, bias, inversion, field-of-view crops): the recipe degrades
    the patches itself. The layers' within-class noise is a quarter of the generator's, so the
    truth holds little detail that no acquisition could keep.
    """
    from dataclasses import replace

    from deepmri.train.labels import mni_source
    from deepmri.train.synth import (
        BRAIN_EXTRACTION,
        GridSpec,
        draw_shells,
        generate,
        sample_parameters,
    )

    sources = {"mni": mni_source()}
    grid = GridSpec(grid_shape, 1.0)
    heads = []
    for index in range(count):
        rng = np.random.default_rng(SHELLED_HEAD_SEED + index)
        params = sample_parameters(SHELLED_HEAD_SEED + index, BRAIN_EXTRACTION, sources, 1.0)
        params = replace(
            params,
            source="mni",
            mode="hybrid",
            shells_mm=draw_shells(rng),
            translation_mm=[0.0, 0.0, 0.0],
            means=_head_means(len(params.means), rng),
            stds=[0.25 * value for value in params.stds],
            blur_voxels=float(rng.uniform(0.3, 0.6)),
            bias_strength=0.0,
            thick_axis=-1,
            noise=0.0,
            gamma=1.0,
            invert=False,
            crop_mm=[0.0] * 6,
        )
        image, _ = generate(params, sources, grid)
        heads.append(TrainingVolume.of(f"mni152-shelled-{index}", image, validated=False))
    return heads


@dataclass
class Acquisition:
    """One simulated thick-slice acquisition of a patch, in patch voxels."""

    spacing: float
    thickness: float
    shape: str
    phase: float  # first slice centre's offset, as a share of the spacing
    noise: float


def random_acquisition(rng: np.random.Generator, recipe: SuperResolveRecipe) -> Acquisition:
    spacing = float(rng.choice(recipe.factors))
    share = float(rng.uniform(*recipe.thickness_share))
    shape = "gaussian" if rng.random() < 1.0 - recipe.rect_share else "rect"
    noise = float(rng.uniform(*recipe.noise)) if rng.random() < recipe.noise_share else 0.0
    return Acquisition(spacing, share * spacing, shape, float(rng.random()), noise)


def _rotation(rng: np.random.Generator, max_degrees: float) -> np.ndarray:
    """A random axis permutation with flips, then a small random rotation: (3, 3)."""
    permutation = np.eye(3)[rng.permutation(3)] * rng.choice([-1.0, 1.0], size=(3, 1))
    small = Rotation.from_rotvec(
        rng.normal(size=3) / math.sqrt(3) * math.radians(max_degrees) * rng.random()
    ).as_matrix()
    return small @ permutation


def sample_patch(
    volume: TrainingVolume,
    recipe: SuperResolveRecipe,
    rng: np.random.Generator,
    acquisition: Acquisition,
    augment: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """(network input (channels, *patch), truth (*patch)) of one random patch of `volume`."""
    depth, rows, cols = recipe.patch
    margin = int(math.ceil(2.5 * acquisition.spacing)) + 2
    length = depth + 2 * margin
    scale = math.exp(rng.uniform(math.log(recipe.scale[0]), math.log(recipe.scale[1])))
    rotation = _rotation(rng, recipe.max_rotation_degrees if augment else 0.0)
    centre = volume.centres[rng.integers(len(volume.centres))].astype(float)
    grid = np.stack(
        np.meshgrid(
            np.arange(length) - (length - 1) / 2.0,
            np.arange(rows) - (rows - 1) / 2.0,
            np.arange(cols) - (cols - 1) / 2.0,
            indexing="ij",
        )
    ).reshape(3, -1)
    points = centre[:, None] + scale * (rotation @ grid)
    if augment and recipe.elastic > 0:
        points = points + _displacement(rng, (length, rows, cols), recipe.elastic)
    truth = map_coordinates(
        volume.coefficients, points, order=3, mode="nearest", prefilter=False
    ).reshape(length, rows, cols)
    truth = np.clip(truth, 0.0, None).astype(np.float64)
    if augment:
        truth = truth ** math.exp(rng.uniform(math.log(0.7), math.log(1.4)))
        truth = truth * rng.uniform(0.85, 1.15) * _bias(rng, truth.shape)
    window = slice(margin, margin + depth)
    inputs = acquired_input(
        truth,
        acquisition.spacing,
        acquisition.thickness,
        acquisition.shape,
        acquisition.phase * acquisition.spacing,
        window,
        recipe.profile_channel,
        noise=acquisition.noise,
        rng=rng,
    )
    return inputs, truth[window].astype(np.float32)


def _displacement(
    rng: np.random.Generator, shape: tuple[int, int, int], largest: float
) -> np.ndarray:
    """A smooth random field (3, prod(shape)): 4x4x4 control values, linear between them.

    Separable interpolation matrices: scipy's `zoom` took 0.24 s a patch, longer than the step.
    """
    control = rng.uniform(-1.0, 1.0, size=(3, 4, 4, 4)) * largest * rng.random()
    along = [
        np.stack([np.interp(np.linspace(0, 3, n), np.arange(4), row) for row in np.eye(4)], 1)
        for n in shape
    ]
    field = np.einsum("ai,bj,ck,xijk->xabc", *along, control, optimize=True)
    return field.reshape(3, -1)


def _bias(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """A smooth multiplicative field (linear in the patch coordinates), up to +-10%."""
    axes = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    slope = rng.uniform(-0.1, 0.1, size=3) / math.sqrt(3)
    return np.exp(sum(s * a for s, a in zip(slope, axes, strict=True)))


def batch(
    volumes: list[TrainingVolume], recipe: SuperResolveRecipe, rng: np.random.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    inputs, truths = [], []
    for _ in range(recipe.batch):
        volume = volumes[rng.integers(len(volumes))]
        source, truth = sample_patch(volume, recipe, rng, random_acquisition(rng, recipe))
        inputs.append(source)
        truths.append(truth)
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(truths)[:, None])


def validation_set(
    volumes: list[TrainingVolume], recipe: SuperResolveRecipe
) -> list[tuple[np.ndarray, np.ndarray, tuple[int, str, float]]]:
    """Fixed patches (seeds never trained on): factors 4 and 6, both profiles, no noise."""
    volumes = [volume for volume in volumes if volume.validated]
    patches = []
    for index in range(recipe.validation_patches):
        rng = np.random.default_rng(VALIDATION_SEED + index)
        factor, shape, share = VALIDATION_CASES[index % len(VALIDATION_CASES)]
        acquisition = Acquisition(float(factor), share * factor, shape, float(rng.random()), 0.0)
        volume = volumes[index // len(VALIDATION_CASES) % len(volumes)]
        source, truth = sample_patch(volume, recipe, rng, acquisition, augment=False)
        patches.append((source, truth, (factor, shape, share)))
    return patches


def _interior(array: np.ndarray, border: int) -> np.ndarray:
    return array[..., border:-border, border:-border, border:-border]


def validate(
    network: torch.nn.Module, patches: list, recipe: SuperResolveRecipe
) -> dict[str, float]:
    """PSNR (peak 1, the normalised bright tissue) of network and cubic on the patch interiors.

    Per factor (`net_4x`, `cubic_4x`, ...) and per (factor, profile) case (`gain_4x_rect`, ...);
    `gain_min` is the least gain over the cases, what selects the weights.
    """
    network.eval()
    errors: dict[str, list[float]] = {}
    with torch.no_grad():
        for first in range(0, len(patches), 8):
            group = patches[first : first + 8]
            inputs = torch.from_numpy(np.stack([source for source, _, _ in group]))
            outputs = network(inputs.to(memory_format=CHANNELS_LAST)).numpy()
            for (source, truth, (factor, shape, _)), output in zip(
                group, outputs[:, 0], strict=True
            ):
                inner = _interior(truth, recipe.border)
                for name, values in (("net", output), ("cubic", source[0])):
                    error = float(np.mean((_interior(values, recipe.border) - inner) ** 2))
                    errors.setdefault(f"{name}_{factor}x", []).append(error)
                    errors.setdefault(f"{name}_{factor}x_{shape}", []).append(error)
    network.train()
    psnr = {key: 10.0 * math.log10(1.0 / max(np.mean(v), 1e-12)) for key, v in errors.items()}
    scores = {key: value for key, value in psnr.items() if key.count("_") == 1}
    cases = sorted(
        {key[len("net_") :] for key in psnr if key.startswith("net_") and key.count("_") == 2}
    )
    for case in cases:
        scores[f"gain_{case}"] = psnr[f"net_{case}"] - psnr[f"cubic_{case}"]
    scores["gain_min"] = min(scores[f"gain_{case}"] for case in cases)
    return {key: round(value, 4) for key, value in scores.items()}


def _rate(recipe: SuperResolveRecipe, iteration: int, progress: float) -> float:
    """Linear warm-up, then cosine decay to a tenth over the run (`progress` from 0 to 1)."""
    if iteration < recipe.warmup:
        return recipe.learning_rate * (iteration + 1) / recipe.warmup
    return recipe.learning_rate * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def train(
    recipe: SuperResolveRecipe,
    out: Path,
    volumes: list[TrainingVolume],
    resume: bool = False,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train to `recipe.iterations` (or `recipe.minutes`, whichever ends first), resumable.

    The learning rate follows whichever of the two is further along. The weights of the best
    validation `gain_min` are kept in OUT/best.pt; OUT/log.jsonl has one line per validation.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    network = recipe.network().to(memory_format=CHANNELS_LAST)
    if recipe.init_from and not (resume and (out / "checkpoint.pt").exists()):
        network.load_state_dict(_weights_of(Path(recipe.init_from), network))
    optimiser = torch.optim.Adam(network.parameters(), lr=recipe.learning_rate)
    state: dict[str, Any] = {"iteration": 0, "seconds": 0.0, "best": None, "best_scores": None}
    checkpoint = out / "checkpoint.pt"
    saved: dict[str, Any] = {}
    if resume and checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        network.load_state_dict(saved["network"])
        optimiser.load_state_dict(saved["optimiser"])
        state = json.loads(saved["state"])
    # the weights that are validated and kept: the raw ones, or their moving average (from
    # scratch, so its decay is warmed up and the random start does not linger in it)
    averaged = weight_average(network, recipe.ema, saved, warm_up=True)
    kept = averaged.module if averaged is not None else network
    patches = validation_set(volumes, recipe)
    if state["best"] is None:
        scores = validate(kept, patches, recipe)
        log(f"start: validation {scores}")
    budget = recipe.minutes * 60.0 if recipe.minutes else math.inf
    started = time.monotonic() - state["seconds"]
    window_start, window_iteration = time.monotonic(), state["iteration"]
    losses: list[float] = []
    while state["iteration"] < recipe.iterations and time.monotonic() - started < budget:
        iteration = state["iteration"]
        rng = np.random.default_rng((recipe.seed, iteration))
        progress = max(iteration / recipe.iterations, (time.monotonic() - started) / budget)
        for group in optimiser.param_groups:
            group["lr"] = _rate(recipe, iteration, progress)
        inputs, truths = batch(volumes, recipe, rng)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=recipe.bf16):
            output = network(inputs.to(memory_format=CHANNELS_LAST))
        loss_function = (
            torch.nn.functional.mse_loss if recipe.loss == "mse" else torch.nn.functional.l1_loss
        )
        loss = loss_function(
            _interior(output.float(), recipe.border), _interior(truths, recipe.border)
        )
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if averaged is not None:
            averaged.update_parameters(network)
        losses.append(float(loss.detach()))
        state["iteration"] = iteration + 1
        done = state["iteration"]
        # the last step before the time runs out is validated too, so no steps are lost
        out_of_time = time.monotonic() - started >= budget
        if done % recipe.validate_every == 0 or done == recipe.iterations or out_of_time:
            state["seconds"] = time.monotonic() - started
            scores = validate(kept, patches, recipe)
            per_minute = (done - window_iteration) / max(time.monotonic() - window_start, 1e-6)
            record = {
                "iteration": done,
                "minutes": round(state["seconds"] / 60.0, 2),
                "iterations_per_minute": round(60.0 * per_minute, 2),
                "loss": round(float(np.mean(losses)), 5),
                "lr": optimiser.param_groups[0]["lr"],
                **scores,
            }
            losses = []
            window_start, window_iteration = time.monotonic(), done
            if state["best"] is None or scores["gain_min"] > state["best"]:
                state["best"], state["best_scores"] = (
                    scores["gain_min"],
                    {**scores, "iteration": done},
                )
                torch.save(kept.state_dict(), out / "best.pt")
            with (out / "log.jsonl").open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            log(json.dumps(record))
            torch.save(
                {
                    "network": network.state_dict(),
                    "optimiser": optimiser.state_dict(),
                    "state": json.dumps(state),
                    **({CHECKPOINT_KEY: averaged.state_dict()} if averaged is not None else {}),
                },
                checkpoint,
            )
    state["seconds"] = time.monotonic() - started
    (out / "training.json").write_text(
        json.dumps({"recipe": asdict(recipe), **state}, indent=1), encoding="utf-8"
    )
    return state


def _weights_of(folder: Path, network: ThickSliceNet3d) -> dict[str, torch.Tensor]:
    """A model folder's weights for `network` (fp32), with zero weights for inputs it lacked."""
    from deepmri.models.store import ModelStore

    found = ModelStore().get(str(folder))
    state = {
        key: value.float()
        for key, value in found.load_network(torch.device("cpu")).state_dict().items()
    }
    return widen_inputs(state, network.in_channels)


def card_for(
    recipe: SuperResolveRecipe,
    state: dict[str, Any],
    command: str,
    version: str = "0.1.0",
    commands: list[str] | None = None,
) -> dict[str, Any]:
    """The model card of the trained network (weights filled in by `save_model`).

    `commands`: the whole chain that made the weights (first run, resumes), oldest first; the
    iterations and minutes in the state are already cumulative over it.
    """
    chain = {"commands": list(commands)} if commands else {}
    return {
        "id": MODEL_ID,
        "version": version,
        "task": "super-resolution",
        "description": (
            "Thick-slice MRI to thin slices along the through-plane axis (factors 2-6, Gaussian or "
            "rectangular slice profile, with or without a gap): a small residual 3D CNN applied "
            "to the cubic B-spline interpolation, in voxels of the in-plane spacing."
        ),
        "architecture": {"name": ARCHITECTURE, "config": recipe.network_config()},
        "input": {
            "contrasts": ["any"],
            "channels": 1,
            "conditioning": (
                "slice spacing, thickness, slice phase"
                + (
                    " and profile shape (Gaussian or rect, as the user says)"
                    if recipe.profile_channel
                    else ""
                )
                + ", from the header and the task's options"
            ),
        },
        "preprocessing": {
            "spacing": [1.0, 1.0, 1.0],
            "spacing_note": (
                "in voxel units: the thick axis is resampled to the mean in-plane spacing, and "
                "the network runs on that grid whatever its spacing in mm"
            ),
            "orientation": "RAS",
            "orientation_note": "not reoriented: the thick axis is put first in the array",
            "normalization": {"method": "percentile", "lower": 0.0, "upper": 99.5},
            "normalization_note": "(x - min) / (99.5th percentile - min), as restore._normalisation",
        },
        "inference": {
            "patch_size": list(recipe.patch),
            "overlap": 0.0,
            "flips": [[3], [4]],
            # Chosen on the whole training volumes (Docs/superresolution.md): +0.12 dB on the
            # least case for three times the network's time.
            "average_flips": True,
            "note": (
                "whole volume in slabs with a halo; the plain pass and the two in-plane flips are "
                "averaged (average_flips) and their spread is the uncertainty map"
            ),
        },
        "labels": [],
        "metrics": [],
        "training": {
            "data": (
                ("Real 1 mm volumes" if recipe.shelled_heads else "Real 1 mm volumes only")
                + ": the MNI ICBM152 2009a T1 (nilearn) and the pydeface mean whole head "
                "(pydeface wheel)"
                + (
                    f", and {recipe.shelled_heads} whole heads made of the MNI T1's brain in "
                    "synthetic layers (CSF rim, skull, scalp, fat)"
                    if recipe.shelled_heads
                    else ""
                )
                + ", randomly rotated, rescaled (0.6-1.4 voxels)"
                + (
                    f", bent by a smooth random field of up to {recipe.elastic:g} voxels"
                    if recipe.elastic
                    else ""
                )
                + ", gamma/scale/bias-augmented, made thick along the first patch axis by the "
                "deepmri.superres.profile forward model (Gaussian or rect profile, rect on "
                f"{round(100 * recipe.rect_share)}%, factor "
                f"{'/'.join(str(f) for f in recipe.factors)}, thickness 60-100% of the spacing, "
                "random slice phase, Rician noise on a fifth), cubic B-spline back. Never Colin27 "
                "or ch2better (the evaluation volumes)."
            ),
            "command": command,
            **chain,
            **({"init_from": recipe.init_from} if recipe.init_from else {}),
            "recipe": asdict(recipe),
            "iterations": state["iteration"],
            "minutes": round(state["seconds"] / 60.0, 1),
            "validation": state["best_scores"],
            "validation_set": (
                f"{recipe.validation_patches} fixed patches of the training volumes (seeds "
                f"{VALIDATION_SEED}+i, never trained on), factors 4 and 6, Gaussian and "
                "rect-with-gap profiles, no noise; PSNR with peak 1 (normalised bright tissue) "
                "on the patch interior; the weights are those of the best minimum gain over cubic "
                "among the four (factor, profile) cases"
            ),
        },
        "license": (
            "Apache-2.0 (weights); trained on MNI ICBM152 2009a (\u00a9 McConnell Brain Imaging "
            "Centre) and the pydeface mean head (MIT)"
        ),
        "citation": (
            "Zhao et al., IEEE TMI 2020 (SMORE); Kim et al., CVPR 2016 (VDSR); Fonov et al., "
            "NeuroImage 2011 (MNI ICBM152 2009a)"
        ),
    }


def export(
    recipe: SuperResolveRecipe,
    out: Path,
    folder: Path,
    command: str,
    version: str = "0.1.0",
    commands: list[str] | None = None,
) -> Path:
    """Save OUT's best weights (fp16 safetensors) and card to `folder`."""
    from deepmri.models import save_model

    state = json.loads((Path(out) / "training.json").read_text(encoding="utf-8"))
    saved = dict(state.get("recipe") or {})
    recipe = (
        SuperResolveRecipe(
            **{key: tuple(v) if isinstance(v, list) else v for key, v in saved.items()}
        )
        if saved
        else recipe
    )
    network = recipe.network()
    network.load_state_dict(torch.load(Path(out) / "best.pt", weights_only=True))
    card = card_for(
        recipe,
        state,
        state.get("command") or command,
        version=version,
        commands=commands or state.get("commands"),
    )
    return save_model(network.eval(), card, folder).path


def run_recipe(
    out: Path,
    *,
    iterations: int = 1500,
    minutes: float | None = None,
    seed: int = 0,
    threads: int = 1,
    resume: bool = False,
    width: int = 16,
    depth: int = 7,
    batch_size: int = 4,
    learning_rate: float = 3e-4,
    warmup: int = 50,
    loss: str = "mse",
    bf16: bool = False,
    ema: float = 0.0,
    profile_channel: bool = False,
    rect_share: float = 0.5,
    elastic: float = 0.0,
    shelled_heads: int = 0,
    init_from: Path | str | None = None,
    validation_patches: int = 32,
    validate_every: int = 100,
    cache_dir: Path | None = None,
    export_to: Path | None = None,
    export_only: bool = False,
    command: str = "",
    volumes: list[TrainingVolume] | None = None,
    version: str = "0.1.0",
) -> dict[str, Any]:
    """`deepmri train superresolve`: train (or resume), then export the best weights if asked."""
    torch.set_num_threads(threads)
    recipe = SuperResolveRecipe(
        width=width,
        depth=depth,
        batch=batch_size,
        learning_rate=learning_rate,
        warmup=warmup,
        loss=loss,
        bf16=bf16,
        ema=ema,
        profile_channel=profile_channel,
        rect_share=rect_share,
        elastic=elastic,
        shelled_heads=shelled_heads,
        init_from=str(init_from) if init_from else None,
        iterations=iterations,
        minutes=minutes,
        seed=seed,
        validation_patches=validation_patches,
        validate_every=validate_every,
    )
    out = Path(out)
    state: dict[str, Any] = {}
    if not export_only:
        if volumes is None:
            volumes = training_volumes(Path(cache_dir or out / "cache"), shelled_heads)
        before = _commands_so_far(out) if resume else []
        state = train(recipe, out, volumes, resume=resume)
        saved = json.loads((out / "training.json").read_text(encoding="utf-8"))
        saved["command"] = command
        saved["commands"] = [*before, command]
        (out / "training.json").write_text(json.dumps(saved, indent=1), encoding="utf-8")
    if export_to is not None:
        export(recipe, out, Path(export_to), command, version=version)
    return state


def _commands_so_far(out: Path) -> list[str]:
    """The commands recorded in OUT/training.json (the chain a resume continues), oldest first."""
    path = Path(out) / "training.json"
    if not path.exists():
        return []
    saved = json.loads(path.read_text(encoding="utf-8"))
    return list(saved.get("commands") or ([saved["command"]] if saved.get("command") else []))


def main(argv: list[str] | None = None) -> int:
    """`python -m deepmri.train.superresolve ...` is `deepmri train superresolve ...`."""
    import sys

    from deepmri.cli import main as deepmri_main

    return deepmri_main(["train", "superresolve", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    raise SystemExit(main())

"""Synthesis task: a new, synthetic contrast (T2w, FLAIR, T1w) computed from an acquired one.

The output is a new volume on the exact input grid, labelled synthetic in its key ("synthetic"),
its name suffix ("-> T2w (synthetic)") and its description; the input is never replaced. An
uncertainty map (spread over test-time flips) comes beside it on request.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri import preprocess
from deepmri.errors import InvalidImageError, ModelError
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.runconfig import RunConfig
from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskResult,
)
from deepmri.validation import validate_image

TARGETS = ("T2w", "FLAIR", "T1w")
# What the user may say the input is; "any": not said, or a contrast no dedicated model takes.
SOURCES = ("any", "T1w", "T2w", "FLAIR", "PDw")
# The model for (source, target); ("any", target) is a model that takes every input contrast
# and resolution. Only models that exist are listed; a listed one may still not be installed.
# T1w comes from any-to-t1w for every source: on held-out T2w inputs it beats the T2w-only
# t2w-to-t1w (18.58 vs 18.25 dB, thick slices 17.72 vs 16.53; Docs/synthesis.md), which is
# used only when named.
MODELS = {
    ("T1w", "T2w"): "t1w-to-t2w",
    ("T1w", "FLAIR"): "t1w-to-flair",
    ("any", "T1w"): "any-to-t1w",
}


def default_model(target: str, source: str = "any") -> str:
    """The model used for `target` from a `source` contrast unless a model is named.

    The dedicated model of (source, target) where there is one (it was trained on that input
    alone); else the target's any-contrast model; with the source not said and no any-contrast
    model, the target's one model (T2w and FLAIR: from T1w).

    Examples:
        >>> default_model("T1w"), default_model("T1w", "T2w"), default_model("T1w", "FLAIR")
        ('any-to-t1w', 'any-to-t1w', 'any-to-t1w')
        >>> default_model("T2w")
        't1w-to-t2w'
    """
    for key in ((source, target), ("any", target)):
        if key in MODELS:
            return MODELS[key]
    makers = [model for (_, made), model in MODELS.items() if made == target]
    if source == "any" and makers:
        return makers[0]
    takes = ", ".join(f"{a} -> {b}" for a, b in MODELS)
    raise ModelError(
        f"No model makes a synthetic {target} from {source}; the models are {takes}. "
        "Name another with `model`, or see Docs/synthesis.md to train one."
    )


# The model each target uses when the source contrast is not said.
DEFAULT_MODELS = {target: default_model(target) for target in TARGETS}


@dataclass
class SynthesisResult:
    """A synthetic image on the input grid, its optional uncertainty, and where it came from."""

    image: sitk.Image
    target: str
    model_id: str
    uncertainty: sitk.Image | None = None
    provenance: dict[str, Any] = field(default_factory=dict)

    @property
    def name_suffix(self) -> str:
        return f" -> {self.target} (synthetic)"

    @property
    def description(self) -> str:
        return (
            f"SYNTHETIC {self.target}: computed by the model '{self.model_id}' from another "
            "contrast, not acquired. It may miss or invent structure; do not use it alone "
            "for diagnosis."
        )


def synthesize(
    image: sitk.Image,
    target: str = "T2w",
    model: str | None = None,
    *,
    source: str = "any",
    uncertainty: bool = False,
    skull_stripped: bool = False,
    config: RunConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
    store: Any = None,
) -> SynthesisResult:
    """A synthetic `target` contrast of a 3D brain MRI; the input image is never modified.

    The model (default: `default_model(target, source)`: the dedicated model of that input
    contrast, else the any-contrast one) names in its card the brain extraction it needs; `skull_stripped=True` takes the input's non-zero voxels as the brain instead.
    Intensities are the model's scale (99.5th percentile inside the brain near 1), zero outside
    the brain.

    Examples:
        >>> result = synthesize(t1_image, "T2w", uncertainty=True)  # doctest: +SKIP
        >>> result.name_suffix  # doctest: +SKIP
        ' -> T2w (synthetic)'
    """
    progress = progress or no_progress
    config = config or RunConfig()
    validate_image(image)
    if target not in TARGETS:
        raise ModelError(f"Target contrast must be one of {', '.join(TARGETS)}, not '{target}'.")
    if source not in SOURCES:
        raise ModelError(f"Source contrast must be one of {', '.join(SOURCES)}, not '{source}'.")
    torch_device = config.resolve_device()
    config.apply_threads()
    store = store if store is not None else _default_store()
    model_id = model or default_model(target, source)
    try:
        network_model = store.get(model_id)
    except ModelError as error:
        raise ModelError(
            f"No synthesis model '{model_id}' for {target} is installed ({error}). "
            "See Docs/synthesis.md for the models that exist and how to train one."
        ) from error
    card = network_model.card
    produced = (card.extra.get("output") or {}).get("contrast")
    if card.task != "synthesis" or (produced and produced != target):
        raise ModelError(
            f"Model '{card.id}' makes {produced or card.task}, not a synthetic {target}; "
            f"choose a {target} synthesis model."
        )
    working = sitk.Cast(image, sitk.sitkFloat32)
    provenance: dict[str, Any] = {"device": str(torch_device), "models": []}
    mask, mask_share = _brain_mask(working, card, skull_stripped, config, progress, cancel, store)
    if mask is not None and not mask.any():
        raise InvalidImageError("No brain was found in the input; is this a brain MRI?")
    if card.preprocessing.get("mask") and not skull_stripped:
        provenance["models"].append(card.preprocessing["mask"])
    check_cancel(cancel)
    output, spread = _run_model(
        working,
        network_model,
        torch_device,
        config.precision,
        mask,
        uncertainty,
        sub_progress(progress, mask_share, 0.97),
        cancel,
    )
    check_cancel(cancel)
    provenance["models"].append(
        {"id": card.id, "version": card.version, "sha256": card.weights["sha256"]}
    )
    result = SynthesisResult(
        image=_like(output, image),
        target=target,
        model_id=card.id,
        uncertainty=_like(spread, image) if spread is not None else None,
        provenance=provenance,
    )
    progress(1.0, f"Synthetic {target} finished")
    return result


def _default_store() -> Any:
    from deepmri.models import ModelStore

    return ModelStore()


def _brain_mask(image, card, skull_stripped, config, progress, cancel, store):
    """The brain on the input grid: non-zero voxels, the card's extraction model, or none."""
    if skull_stripped:
        return sitk.GetArrayFromImage(image) > 0, 0.0
    mask_model = card.preprocessing.get("mask")
    if not mask_model:
        return None, 0.0
    from deepmri.tasks.segment import segment

    labels = segment(
        image,
        mask_model,
        config=config,
        progress=sub_progress(progress, 0.0, 0.45),
        cancel=cancel,
        store=store,
    ).labels
    return sitk.GetArrayFromImage(labels) > 0, 0.45


def _run_model(image, model, device, precision, mask, with_uncertainty, progress, cancel):
    """Card preprocessing to the model grid, tiled inference, back onto the exact input grid."""
    import torch

    from deepmri import engine
    from deepmri.models.card import flips_to_run

    card = model.card
    progress(0.0, f"Preparing the input for {card.id}")
    steps = preprocess.from_card(card.preprocessing, mask)
    model_grid, trace = steps(image)
    check_cancel(cancel)
    network = model.load_network(device=device)
    flips = flips_to_run(card.inference, with_uncertainty)
    values = sitk.GetArrayFromImage(model_grid)
    prior = card.input.get("prior")
    if prior:
        progress(0.02, "Tissue prior (Gaussian mixture) on the model grid")
        values = with_prior(values, _model_grid_brain(mask, image, card, model_grid), prior)
    tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))
    tensor = tensor[None] if prior else tensor[None, None]
    result = engine.infer(
        network,
        tensor,
        roi_size=card.patch_size,
        overlap=card.inference.get("overlap", 0.5),
        device=device,
        precision=precision,
        flips=[tuple(flip) for flip in flips],
        progress=sub_progress(progress, 0.05, 0.9),
        cancel=cancel,
    )
    check_cancel(cancel)
    progress(0.92, "Resampling the result to the input grid")
    channels = [result.prediction[0, 0].float().numpy()]
    if result.uncertainty is not None and with_uncertainty:
        channels.append(result.uncertainty[0, 0].float().numpy())
    back = []
    for channel in channels:
        on_grid = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        on_grid.CopyInformation(model_grid)
        values = sitk.GetArrayFromImage(steps.invert(on_grid, trace))
        back.append(np.where(mask, values, 0.0) if mask is not None else values)
    output = np.clip(back[0], 0.0, None)
    return output, (back[1] if len(back) > 1 else None)


def tissue_posteriors(
    image: np.ndarray,
    brain: np.ndarray,
    *,
    invert: bool = False,
    order: str = "intensity",
    seed: int = 0,
):
    """CSF/GM/WM posteriors (N, 3) of the brain voxels: a 3-class Gaussian mixture on intensity.

    The same mixture as the per-tissue baseline (`classical_tissue`: up to 200,000 voxels fit,
    classes ordered by mean, darkest = CSF on T1 contrast; `invert` for T2-like inputs), soft.
    `order` "anatomy": the input's contrast is unknown, so the classes are named by where they
    lie instead (`anatomical_order`).
    """
    from deepmri.tasks.segment_classical import fit_tissue_mixture

    values = np.asarray(image, dtype=np.float64)[brain].reshape(-1, 1)
    if invert:
        values = -values
    mixture, by_mean = fit_tissue_mixture(values, seed)
    posteriors = mixture.predict_proba(values)[:, by_mean]
    if order == "anatomy":
        posteriors = posteriors[:, anatomical_order(posteriors, brain)]
    return posteriors


def anatomical_order(posteriors: np.ndarray, brain: np.ndarray) -> list[int]:
    """Which of three intensity classes is CSF, GM and WM, from where each lies in the brain.

    White matter is the class deepest inside the brain mask on average (distance to its edge);
    of the other two, CSF is the one with more of its voxels in the outer two voxels (the
    subarachnoid space that skull stripping keeps). Soft: each voxel counts by its posterior.
    On simulated subjects this names the classes as the truth does for T1w, T2w, FLAIR and
    spoiled gradient echo, thick slices included; proton-density inputs, whose mixture does
    not separate CSF, are where it errs.

    Examples:
        >>> z, y, x = np.mgrid[-8:9, -8:9, -8:9]
        >>> radius = np.sqrt(z**2 + y**2 + x**2)
        >>> brain = radius < 8  # class 1 inside, class 0 around it, class 2 at the edge
        >>> classes = np.where(radius < 4, 1, np.where(radius < 6, 0, 2))[brain]
        >>> anatomical_order(np.eye(3)[classes], brain)
        [2, 0, 1]
    """
    from scipy import ndimage

    depth = ndimage.distance_transform_edt(np.pad(brain, 1))[1:-1, 1:-1, 1:-1][brain]
    weights = posteriors / np.maximum(posteriors.sum(0, keepdims=True), 1e-12)
    mean_depth = depth @ weights
    outer = (depth <= 2.0).astype(np.float64) @ weights
    white = int(np.argmax(mean_depth))
    rest = [k for k in range(3) if k != white]
    csf = max(rest, key=lambda k: outer[k])
    grey = next(k for k in rest if k != csf)
    return [csf, grey, white]


def tissue_prior(image: np.ndarray, brain: np.ndarray, prior: dict[str, Any]) -> np.ndarray:
    """The per-tissue prior of a normalised input: posteriors times the card's tissue table.

    `prior` is a card's `input.prior`: `table` (mean target intensity of CSF, GM, WM, fitted on
    simulated training subjects by least squares), `invert` and `order` ("intensity", or
    "anatomy" for inputs of any contrast). Zero outside `brain`.

    Examples:
        >>> image = np.zeros((8, 8, 8), np.float32); brain = image == 0
        >>> image[:, :, 3:5], image[:, :, 5:] = 0.5, 1.0
        >>> out = tissue_prior(image, brain, {"table": [0.2, 1.0, 0.8]})
        >>> [round(float(out[0, 0, k]), 2) for k in (0, 4, 7)]
        [0.2, 1.0, 0.8]
    """
    out = np.zeros(np.shape(image), dtype=np.float32)
    if brain.sum() >= 3:
        posteriors = tissue_posteriors(
            image,
            brain,
            invert=bool(prior.get("invert", False)),
            order=prior.get("order", "intensity"),
        )
        out[brain] = posteriors @ np.asarray(prior["table"], dtype=np.float64)
    return out


def with_prior(image: np.ndarray, brain: np.ndarray, prior: dict[str, Any] | None) -> np.ndarray:
    """The network input: the normalised image, and its per-tissue prior as channel 1 if any.

    One place for what a model with a card `input.prior` takes, so that training and the task
    feed it the same.
    """
    if not prior:
        return image
    return np.stack([image, tissue_prior(image, brain, prior)]).astype(np.float32)


def _model_grid_brain(mask, image, card, model_grid) -> np.ndarray:
    """The brain on the model grid: the mask through the card's geometric steps (no intensity)."""
    if mask is None:
        return sitk.GetArrayFromImage(model_grid) > 0
    mask_image = _like(mask.astype(np.float32), image)
    on_grid, _ = preprocess.from_card(card.preprocessing, None, normalise=False)(mask_image)
    return sitk.GetArrayFromImage(on_grid) > 0.5


def _like(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image


class SynthesizeTask(Task):
    """Contrast synthesis with a model from the store: T1w -> T2w, T1w -> FLAIR, any -> T1w.

    Examples:
        >>> from deepmri.tasks import get_task
        >>> task = get_task("synthesize")
        >>> [option.name for option in task.options]
        ['target', 'source', 'model', 'skull_stripped']
        >>> result = task({"image": image}, {"target": "T2w"})  # doctest: +SKIP
        >>> result.info["name_suffix"]  # doctest: +SKIP
        ' -> T2w (synthetic)'
    """

    name = "synthesize"
    title = "Synthesis"
    help = "compute a synthetic contrast (T2w, FLAIR, T1w) from an acquired one; labelled synthetic"
    inputs = (InputSpec("image", Kind.VOLUME, "the acquired volume (NIfTI/NRRD/MHA/DICOM)"),)
    options = (
        OptionSpec("target", str, "T2w", "contrast to synthesise", choices=TARGETS),
        OptionSpec(
            "source",
            str,
            "any",
            "the input's contrast, if known: picks that contrast's model where there is one",
            choices=SOURCES,
        ),
        OptionSpec("model", str, None, "model id or folder (default: the target's model)"),
        OptionSpec(
            "skull_stripped",
            bool,
            False,
            "the input is brain-only: its non-zero voxels are the brain",
        ),
    )
    outputs = (
        OutputSpec("synthetic", Kind.VOLUME, "the SYNTHETIC contrast on the input grid"),
        OutputSpec(
            "uncertainty",
            Kind.VOLUME,
            "spread over test-time flips, on the same grid (asking for it runs the flips)",
            optional=True,
        ),
    )

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        result = synthesize(
            inputs["image"],
            options["target"],
            options["model"],
            source=options["source"],
            uncertainty=context.wants("uncertainty"),
            skull_stripped=options["skull_stripped"],
            config=context.config,
            progress=context.progress,
            cancel=context.cancel,
            store=context.store,
        )
        return synthesis_to_task_result(result, self.name)


def synthesis_to_task_result(result: SynthesisResult, task: str = "synthesize") -> TaskResult:
    """The files of a synthesis: "synthetic" (and "uncertainty"), with the synthetic labelling."""
    images = {"synthetic": result.image}
    if result.uncertainty is not None:
        images["uncertainty"] = result.uncertainty
    info = {
        "synthetic": True,
        "target": result.target,
        "name_suffix": result.name_suffix,
        "description": result.description,
        "model_id": result.model_id,
        "provenance": result.provenance,
    }
    return TaskResult(task, images=images, info=info)

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
# The model each target uses unless told otherwise; only models that exist are installed.
DEFAULT_MODELS = {"T2w": "t1w-to-t2w", "FLAIR": "t1w-to-flair", "T1w": "t2w-to-t1w"}


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
    uncertainty: bool = False,
    skull_stripped: bool = False,
    config: RunConfig | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
    store: Any = None,
) -> SynthesisResult:
    """A synthetic `target` contrast of a 3D brain MRI; the input image is never modified.

    The model (default: `DEFAULT_MODELS[target]`) names in its card the brain extraction it
    needs; `skull_stripped=True` takes the input's non-zero voxels as the brain instead.
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
    torch_device = config.resolve_device()
    config.apply_threads()
    store = store if store is not None else _default_store()
    model_id = model or DEFAULT_MODELS[target]
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

    card = model.card
    progress(0.0, f"Preparing the input for {card.id}")
    steps = preprocess.from_card(card.preprocessing, mask)
    model_grid, trace = steps(image)
    check_cancel(cancel)
    network = model.load_network(device=device)
    # "average_flips": the synthetic image is always the mean over the card's test-time flips
    # (the same image with or without the uncertainty map); otherwise flips run only for the map.
    averaged = bool(card.inference.get("average_flips"))
    flips = card.inference.get("flips", []) if (with_uncertainty or averaged) else []
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


def tissue_posteriors(image: np.ndarray, brain: np.ndarray, *, invert: bool = False, seed: int = 0):
    """CSF/GM/WM posteriors (N, 3) of the brain voxels: a 3-class Gaussian mixture on intensity.

    The same mixture as the per-tissue baseline (`classical_tissue`: up to 200,000 voxels fit,
    classes ordered by mean, darkest = CSF on T1 contrast; `invert` for T2-like inputs), soft.
    """
    from deepmri.tasks.segment_classical import fit_tissue_mixture

    values = np.asarray(image, dtype=np.float64)[brain].reshape(-1, 1)
    if invert:
        values = -values
    mixture, order = fit_tissue_mixture(values, seed)
    return mixture.predict_proba(values)[:, order]


def tissue_prior(image: np.ndarray, brain: np.ndarray, prior: dict[str, Any]) -> np.ndarray:
    """The per-tissue prior of a normalised input: posteriors times the card's tissue table.

    `prior` is a card's `input.prior`: `table` (mean target intensity of CSF, GM, WM, fitted on
    simulated training subjects by least squares) and `invert`. Zero outside `brain`.

    Examples:
        >>> image = np.zeros((8, 8, 8), np.float32); brain = image == 0
        >>> image[:, :, 3:5], image[:, :, 5:] = 0.5, 1.0
        >>> out = tissue_prior(image, brain, {"table": [0.2, 1.0, 0.8]})
        >>> [round(float(out[0, 0, k]), 2) for k in (0, 4, 7)]
        [0.2, 1.0, 0.8]
    """
    out = np.zeros(np.shape(image), dtype=np.float32)
    if brain.sum() >= 3:
        posteriors = tissue_posteriors(image, brain, invert=bool(prior.get("invert", False)))
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
    """Contrast synthesis with a model from the store: T1w -> T2w, T1w -> FLAIR, T2w -> T1w.

    Examples:
        >>> from deepmri.tasks import get_task
        >>> task = get_task("synthesize")
        >>> [option.name for option in task.options]
        ['target', 'model', 'skull_stripped']
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

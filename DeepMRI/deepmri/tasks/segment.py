"""Segmentation task: brain extraction and tissue classes (CSF, GM, WM) on any 3D brain MRI.

Input of any contrast, resolution and orientation goes to the model's grid (the card's
preprocessing steps, `deepmri.preprocess`), through the engine, and back to the exact input grid,
so the labels overlay the input voxel for voxel. `SegmentTask` is the declaration every front
door runs; `segment` is the same work as a plain function.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri import preprocess
from deepmri.errors import InvalidImageError, ModelError
from deepmri.masks import distance_outside_mm
from deepmri.progress import (
    CancelLike,
    ProgressCallback,
    check_cancel,
    no_progress,
    sub_progress,
)
from deepmri.results import SegmentationResult
from deepmri.runconfig import RunConfig
from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskError,
    TaskResult,
    slug,
)
from deepmri.validation import validate_image

BRAIN_EXTRACTION = "brain-extraction"
BRAIN_TISSUE = "brain-tissue"


@dataclass
class _ModelOutput:
    probabilities: np.ndarray  # (C, k, j, i) on the input grid, summing to 1 over C
    uncertainty: np.ndarray | None  # (C, k, j, i) on the input grid: each class's spread
    card: dict[str, Any]
    members: tuple[dict[str, Any], ...] = ()  # the cards averaged in (`average_with`)


class SegmentTask(Task):
    """Learned segmentation with a model from the store (brain extraction, tissue classes).

    Examples:
        >>> from deepmri.tasks import get_task
        >>> task = get_task("segment")
        >>> [option.name for option in task.options]
        ['model', 'csf', 'csf_border_mm', 'skull_stripped']
        >>> result = task({"image": image}, {"model": "brain-extraction"})  # doctest: +SKIP
        >>> result.measures  # doctest: +SKIP
        {'Brain (mL)': 1510.2}
    """

    name = "segment"
    title = "Segmentation"
    help = "segment a brain MRI (brain mask or CSF/GM/WM); labels on the exact input grid"
    inputs = (InputSpec("image", Kind.VOLUME, "NIfTI/NRRD/MHA file or DICOM folder"),)
    options = (
        OptionSpec("model", str, BRAIN_TISSUE, "model id or model folder (default: brain-tissue)"),
        OptionSpec(
            "csf",
            bool,
            True,
            "brain mask with the CSF around the brain (the default, as SynthStrip and deepbet "
            "give it); --no-csf: the tight brain (brain-extraction models with two labels)",
        ),
        OptionSpec(
            "csf_border_mm",
            float,
            None,
            "how far (mm) the CSF around the brain may reach beyond the tight brain in the "
            "default mask, as SynthStrip's -b sets its border (default: the model card's; "
            "brain-extraction models with two labels)",
        ),
        OptionSpec(
            "skull_stripped",
            bool,
            False,
            "the input is brain-only: its non-zero voxels are the brain (tissue models skip "
            "brain extraction)",
        ),
    )
    outputs = (
        OutputSpec("labels", Kind.LABELS, "label map on the input grid"),
        OutputSpec(
            "probability",
            Kind.VOLUME,
            "per-label probability maps (probability-<label>)",
            optional=True,
            many=True,
        ),
        OutputSpec("uncertainty", Kind.VOLUME, "test-time-flip uncertainty map", optional=True),
        OutputSpec(
            "stripped",
            Kind.VOLUME,
            "the input with every voxel outside the mask set to 0 (a skull-stripped scan, as "
            "SynthStrip's -o writes it)",
            optional=True,
        ),
    )

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        result = segment(
            inputs["image"],
            options["model"],
            csf=options["csf"],
            csf_border_mm=options["csf_border_mm"],
            skull_stripped=options["skull_stripped"],
            config=context.config,
            probabilities=context.wants("probability"),
            uncertainty=context.wants("uncertainty"),
            progress=context.progress,
            cancel=context.cancel,
            store=context.store,
        )
        task_result = segmentation_to_task_result(result, self.name)
        if context.wants("stripped"):
            task_result.images["stripped"] = result.masked(inputs["image"])
        return task_result


def segmentation_to_task_result(result: SegmentationResult, task: str = "segment") -> TaskResult:
    """The one way a `SegmentationResult` becomes files: labels, probability-<slug>, uncertainty."""
    images = {"labels": result.labels}
    for name, probability in (result.probabilities or {}).items():
        images[f"probability-{slug(name)}"] = probability
    if result.uncertainty is not None:
        images["uncertainty"] = result.uncertainty
    measures = {f"{name} (mL)": round(ml, 2) for name, ml in result.volumes_ml().items()}
    info = {
        "label_info": result.label_info,
        "model_id": result.model_id,
        "provenance": result.provenance,
    }
    return TaskResult(task, images=images, measures=measures, info=info)


def task_result_to_segmentation(result: TaskResult) -> SegmentationResult:
    """Back from a `TaskResult` (a background job's files) to a `SegmentationResult`."""
    label_info = list(result.info.get("label_info", []))
    by_slug = {slug(label["name"]): label["name"] for label in label_info}
    probabilities = {
        by_slug.get(key.removeprefix("probability-"), key.removeprefix("probability-")): image
        for key, image in result.images.items()
        if key.startswith("probability-")
    }
    return SegmentationResult(
        labels=result.images["labels"],
        label_info=label_info,
        model_id=str(result.info.get("model_id", "")),
        probabilities=probabilities or None,
        uncertainty=result.images.get("uncertainty"),
        provenance=dict(result.info.get("provenance", {})),
    )


def segment(
    image: sitk.Image,
    model: str = BRAIN_TISSUE,
    *,
    device: str | None = None,
    precision: str | None = None,
    config: RunConfig | None = None,
    csf: bool = True,
    csf_border_mm: float | None = None,
    skull_stripped: bool = False,
    probabilities: bool = False,
    uncertainty: bool = False,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
    store: Any = None,
) -> SegmentationResult:
    """Segment a 3D brain MRI with a model from the store; the input image is never modified.

    For `brain-tissue` the brain is extracted first (the `brain-extraction` model), so whole-head
    and skull-stripped scans both work. `config` (device, precision, threads) is how the front
    doors pass the user's choice; `device`/`precision` are shorthands on top of it. `csf=False`
    gives the tight brain mask (no CSF around the brain) of a model whose card lists
    `tight_labels`; other models raise ModelError before any work. `csf_border_mm` replaces the
    card's `csf_border_mm` for this run: how far the CSF around the brain may reach beyond the
    tight brain (0 keeps only the CSF enclosed by it), the one convention a user may want to move
    (SynthStrip's `-b`); the tight mask ignores it. `skull_stripped=True` takes the input's
    non-zero voxels as the brain where the model would extract it first.

    Examples:
        >>> from deepmri.data import load_mni152
        >>> result = segment(load_mni152(), "brain-tissue")  # doctest: +SKIP
        >>> sorted(result.volumes_ml())  # doctest: +SKIP
        ['CSF', 'Grey matter', 'White matter']
    """
    progress = progress or no_progress
    config = config or RunConfig()
    if device is not None or precision is not None:
        config = RunConfig(
            device=device if device is not None else config.device,
            precision=precision if precision is not None else config.precision,
            threads=config.threads,
        )
    validate_image(image)
    torch_device = config.resolve_device()
    config.apply_threads()
    store = store if store is not None else _default_store()
    working = sitk.Cast(image, sitk.sitkFloat32)
    mask = None
    provenance: dict[str, Any] = {
        "device": str(torch_device),
        "precision": config.precision,
        "models": [],
    }
    main_model = store.get(model)
    _check_mask_convention(main_model.card, csf, csf_border_mm)
    # A model trained on skull-stripped brains names the model that extracts the brain first.
    mask_model = main_model.card.preprocessing.get("mask")
    first_share = 0.45 if mask_model and not skull_stripped else 0.0
    if mask_model and skull_stripped:
        mask = sitk.GetArrayFromImage(working) > 0
        if not mask.any():
            raise InvalidImageError("The skull-stripped input has no non-zero voxel.")
        provenance["brain"] = "the input's non-zero voxels (skull_stripped)"
    elif mask_model:
        brain = _run_averaged(
            working,
            store.get(mask_model),
            store,
            torch_device,
            config.precision,
            None,
            False,
            sub_progress(progress, 0.0, first_share),
            cancel,
        )
        mask = (
            postprocess_labels(
                np.argmax(brain.probabilities, axis=0), brain.card, working.GetSpacing()
            )
            > 0
        )
        provenance["models"] += _models_provenance(brain)
        if not mask.any():
            raise InvalidImageError("No brain was found in the input; is this a brain MRI?")
    output = _run_averaged(
        working,
        main_model,
        store,
        torch_device,
        config.precision,
        mask,
        uncertainty,
        sub_progress(progress, first_share, 0.97),
        cancel,
    )
    check_cancel(cancel)
    refinement = output.card.get("inference", {}).get("refinement")
    if refinement:
        # The brain is the mask where there is one, else what the network calls foreground.
        region = mask if mask is not None else np.argmax(output.probabilities, axis=0) > 0
        progress(0.97, "Fitting the tissue intensities of this image (Gaussian mixture)")
        output = _refine_with_mixture(working, output, region, refinement)
        provenance["refinement"] = dict(refinement)
        check_cancel(cancel)
    provenance["models"] += _models_provenance(output)
    if not csf:
        provenance["mask"] = "tight (no CSF around the brain)"
    elif csf_border_mm is not None:
        provenance["csf_border_mm"] = float(csf_border_mm)
    result = _assemble_result(
        image, output, mask, probabilities, uncertainty, provenance, csf, csf_border_mm
    )
    progress(1.0, "Segmentation finished")
    return result


def _check_mask_convention(card: Any, csf: bool, csf_border_mm: float | None) -> None:
    """Refuse, before any work, a mask convention the model cannot give."""
    if csf and csf_border_mm is None:
        return
    asked = "the tight brain mask (--no-csf)" if not csf else "a CSF border (--csf-border-mm)"
    if not card.tight_labels:
        raise ModelError(
            f"Model '{card.id}' {card.version} gives one mask convention only; {asked} needs a "
            "brain-extraction model whose card lists 'tight_labels'."
        )
    if csf_border_mm is not None and not (np.isfinite(csf_border_mm) and csf_border_mm >= 0):
        raise TaskError(f"The CSF border is a distance of 0 mm or more, not {csf_border_mm}.")


def _default_store() -> Any:
    from deepmri.models import ModelStore

    return ModelStore()


def _card_dict(model: Any) -> dict[str, Any]:
    return model.card.to_dict()


def _model_provenance(card: dict[str, Any]) -> dict[str, Any]:
    return {"id": card["id"], "version": card["version"], "sha256": card["weights"]["sha256"]}


def _models_provenance(output: _ModelOutput) -> list[dict[str, Any]]:
    return [_model_provenance(card) for card in (output.card, *output.members)]


def _run_averaged(
    image: sitk.Image,
    model: Any,
    store: Any,
    device: Any,
    precision: str,
    mask: np.ndarray | None,
    with_uncertainty: bool,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> _ModelOutput:
    """`_run_model`, averaged with the models the card's `inference.average_with` names.

    Networks trained on different grids draw the brain's edge at different places; the mean of
    their probabilities on the input grid is drawn with this card's labels and steps. Each member
    runs on its own card's grid (its own `average_with` is not followed) and must have this
    card's labels, checked before its networks run. The uncertainty is the spread over every
    pass of every network (`_pooled_spread`), so where the networks disagree it is high even if
    each is sure of itself.
    """
    card = _card_dict(model)
    members = [store.get(name) for name in card.get("inference", {}).get("average_with", [])]
    for member in members:
        if _label_values(_card_dict(member)) != _label_values(card):
            raise ModelError(
                f"{card['id']} averages with {_card_dict(member)['id']}, whose labels differ; "
                "a model can only be averaged with one that has the same labels."
            )
    share = 1.0 / (len(members) + 1)
    outputs = [
        _run_model(
            image,
            each,
            device,
            precision,
            mask,
            with_uncertainty,
            sub_progress(progress, index * share, (index + 1) * share),
            cancel,
        )
        for index, each in enumerate([model, *members])
    ]
    if not members:
        return outputs[0]
    return _ModelOutput(
        np.mean([output.probabilities for output in outputs], axis=0),
        _pooled_spread(outputs),
        outputs[0].card,
        tuple(output.card for output in outputs[1:]),
    )


def _pooled_spread(outputs: list[_ModelOutput]) -> np.ndarray | None:
    """Each class's standard deviation over the passes of all the networks averaged, each network
    weighing the same: the law of total variance, the mean of the networks' own (flip) variances
    plus the variance of their mean probabilities. None unless every network gave a spread."""
    if any(output.uncertainty is None for output in outputs):
        return None
    within = np.mean([np.square(output.uncertainty) for output in outputs], axis=0)
    between = np.var([output.probabilities for output in outputs], axis=0)
    return np.sqrt(within + between).astype(np.float32)


def _label_values(card: dict[str, Any]) -> list[int]:
    return sorted(int(label["value"]) for label in card["labels"])


def _run_model(
    image: sitk.Image,
    model: Any,
    device: Any,
    precision: str,
    mask: np.ndarray | None,
    with_uncertainty: bool,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> _ModelOutput:
    """Preprocess to the model grid, run the engine, and bring probabilities back to `image`'s grid."""
    import torch

    from deepmri import engine
    from deepmri.models.card import flips_to_run

    card = _card_dict(model)
    progress(0.0, f"Preparing the input for {card['id']}")
    steps = preprocess.from_card(card["preprocessing"], mask)
    model_grid, trace = steps(image)
    check_cancel(cancel)
    network = model.load_network(device=device)
    inference = card.get("inference", {})
    flips = flips_to_run(inference, with_uncertainty)
    tensor = torch.from_numpy(sitk.GetArrayFromImage(model_grid))[None, None]
    result = engine.infer(
        network,
        tensor,
        roi_size=inference["patch_size"],
        overlap=inference.get("overlap", 0.5),
        device=device,
        precision=precision,
        flips=[tuple(flip) for flip in flips],
        postprocess=lambda logits: torch.softmax(logits.float(), dim=1),
        progress=sub_progress(progress, 0.05, 0.9),
        cancel=cancel,
    )
    check_cancel(cancel)
    progress(0.92, "Resampling the result to the input grid")
    class_probabilities = _back_to_input_grid(
        result.prediction[0].numpy(), model_grid, steps, trace
    )
    class_probabilities /= np.clip(class_probabilities.sum(axis=0, keepdims=True), 1e-6, None)
    spread = None
    if result.uncertainty is not None:
        spread = _back_to_input_grid(result.uncertainty[0].numpy(), model_grid, steps, trace)
    return _ModelOutput(class_probabilities, spread, card)


def _refine_with_mixture(
    image: sitk.Image, output: _ModelOutput, mask: np.ndarray, refinement: dict[str, Any]
) -> _ModelOutput:
    """The card's per-image mixture (`deepmri.mixture`) redraws the classes inside the brain.

    Channel 0 (background) is left out inside the brain: every brain voxel is one of the tissue
    classes, with the network's probabilities as the prior and the image deciding the boundary.
    """
    from deepmri.mixture import MixtureSettings, refine_with_mixture

    intensities = sitk.GetArrayViewFromImage(image)[mask]
    indices = np.argwhere(mask)[:, ::-1].astype(np.float64)  # (i, j, k) order, as ITK indexes
    matrix = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    coordinates = indices @ matrix.T + np.asarray(image.GetOrigin())
    tissue = output.probabilities[1:, mask].T
    posterior = refine_with_mixture(
        intensities,
        tissue,
        coordinates,
        MixtureSettings.from_card(refinement),
    )
    probabilities = output.probabilities.copy()
    probabilities[:, mask] = 0.0
    probabilities[1:, mask] = posterior.T.astype(probabilities.dtype)
    return _ModelOutput(probabilities, output.uncertainty, output.card)


def _back_to_input_grid(
    channels: np.ndarray,
    model_grid: sitk.Image,
    steps: preprocess.Compose,
    trace: list[sitk.Image],
) -> np.ndarray:
    """Linear resampling of each channel from the model grid to the exact input grid."""
    resampled = []
    for channel in channels:
        channel_image = sitk.GetImageFromArray(np.ascontiguousarray(channel, dtype=np.float32))
        channel_image.CopyInformation(model_grid)
        resampled.append(sitk.GetArrayFromImage(steps.invert(channel_image, trace)))
    return np.stack(resampled)


def postprocess_labels(
    class_index: np.ndarray,
    card: dict[str, Any],
    spacing: Sequence[float],
    csf_border_mm: float | None = None,
) -> np.ndarray:
    """Card-listed clean-up of the foreground: keep the largest component, fill its holes, and
    ("csf_border") drop CSF around the brain beyond the card's `csf_border_mm`.

    `spacing` is the (x, y, z) voxel size in mm of `class_index`'s grid. A `csf_border_mm` given
    here is the user's border: it replaces the card's, and applies even where the card lists no
    "csf_border" step (a model with `tight_labels` whose CSF reaches as far as its network drew).
    """
    steps = list(card.get("postprocessing", []))
    if csf_border_mm is not None:
        card = {**card, "csf_border_mm": float(csf_border_mm)}
        if "csf_border" not in steps:
            steps.append("csf_border")
    if not steps:
        return class_index
    foreground = class_index > 0
    if "largest_component" in steps:
        foreground = _largest_component(foreground)
    if "fill_holes" in steps:
        foreground = _fill_holes(foreground)
    cleaned = np.where(foreground, class_index, 0)
    # Filled holes take the foreground class that is most common, so they are never background.
    if "fill_holes" in steps:
        newly_filled = foreground & (class_index == 0)
        if newly_filled.any():
            labels = class_index[foreground & (class_index > 0)]
            cleaned[newly_filled] = np.bincount(labels).argmax() if labels.size else 1
    if "csf_border" in steps:
        cleaned = limit_csf_border(
            cleaned, _tight_channels(card), spacing, float(card["csf_border_mm"])
        )
    return cleaned


def limit_csf_border(
    class_index: np.ndarray,
    tight: Sequence[int],
    spacing: Sequence[float],
    border_mm: float,
    core: np.ndarray | None = None,
) -> np.ndarray:
    """Foreground that is not tight brain and lies farther than `border_mm` from it becomes 0.

    The training labels call CSF around the brain only what lies within a border of the tight
    brain (`deepmri.train.labels.split_outer_csf`, the same `distance_outside_mm`); farther CSF is
    background. The network learns that border only to its own voxel size, so inference draws it
    in mm; the card's border is the one of best mask Dice on the synthetic validation set.
    `core` (a boolean array), where given, is what the distance is measured from instead of the
    tight brain (a confident part of it); the tight brain itself is kept either way.
    """
    brain = _fill_holes(np.isin(class_index, tight))
    if not brain.any():
        return class_index
    distance = distance_outside_mm(brain if core is None or not core.any() else core, spacing)
    return np.where((class_index > 0) & ~brain & (distance > border_mm), 0, class_index)


def _tight_channels(card: dict[str, Any]) -> list[int]:
    """Output channels (1 + the label's rank by value) of the card's tight labels."""
    values = sorted(label["value"] for label in card["labels"])
    return [values.index(value) + 1 for value in card.get("tight_labels", [])]


def tight_brain(labels: np.ndarray, tight_labels: list[int]) -> np.ndarray:
    """The tight-brain label map: only `tight_labels`, their union's holes filled.

    The brain label of a two-label brain-extraction model stops at the sulci and ventricles'
    CSF, which lie inside the brain as `ch2bet`-style tight masks draw it: filled holes take the
    first tight label.
    """
    tight = np.isin(labels, tight_labels)
    filled = _fill_holes(tight)
    return np.where(tight, labels, np.where(filled, tight_labels[0], 0)).astype(labels.dtype)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    if not mask.any():
        return mask
    components = sitk.ConnectedComponent(sitk.GetImageFromArray(mask.astype(np.uint8)))
    largest = sitk.RelabelComponent(components, sortByObjectSize=True) == 1
    return sitk.GetArrayFromImage(largest).astype(bool)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    filled = sitk.BinaryFillhole(
        sitk.GetImageFromArray(mask.astype(np.uint8)), fullyConnected=False
    )
    return sitk.GetArrayFromImage(filled).astype(bool)


def _assemble_result(
    image: sitk.Image,
    output: _ModelOutput,
    mask: np.ndarray | None,
    with_probabilities: bool,
    with_uncertainty: bool,
    provenance: dict[str, Any],
    csf: bool = True,
    csf_border_mm: float | None = None,
) -> SegmentationResult:
    card = output.card
    class_index = np.argmax(output.probabilities, axis=0)
    if mask is not None:
        class_index = np.where(mask, class_index, 0)
    class_index = postprocess_labels(class_index, card, image.GetSpacing(), csf_border_mm)
    label_info = sorted(card["labels"], key=lambda label: label["value"])
    values = np.zeros(len(output.probabilities), dtype=np.uint8)
    for channel, label in enumerate(label_info, start=1):
        if channel < len(values):
            values[channel] = label["value"]
    label_values = values[class_index]
    if not csf:
        label_values = tight_brain(label_values, card["tight_labels"])
    labels = _like(label_values, image, sitk.sitkUInt8)
    probability_images = None
    if with_probabilities:
        probability_images = {
            label["name"]: _like(output.probabilities[channel], image, sitk.sitkFloat32)
            for channel, label in enumerate(label_info, start=1)
            if channel < len(output.probabilities)
        }
    uncertainty_image = None
    if with_uncertainty and output.uncertainty is not None:
        # One map: the largest spread of any class (where any of them is in doubt).
        uncertainty_image = _like(output.uncertainty.max(axis=0), image, sitk.sitkFloat32)
    return SegmentationResult(
        labels=labels,
        label_info=label_info,
        model_id=card["id"],
        probabilities=probability_images,
        uncertainty=uncertainty_image,
        provenance=provenance,
    )


def _like(array: np.ndarray, reference: sitk.Image, pixel_type: int) -> sitk.Image:
    image = sitk.Cast(sitk.GetImageFromArray(np.ascontiguousarray(array)), pixel_type)
    image.CopyInformation(reference)
    return image

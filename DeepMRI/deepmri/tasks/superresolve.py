"""Super-resolution task: a thick-slice volume to thin slices on the same physical extent.

Declares the inputs, options and outputs every front door builds from (CLI, batch, worker,
Slicer); the work is `deepmri.superres.superresolve`.
"""

from __future__ import annotations

from typing import Any

from deepmri.superres.profile import PROFILE_SHAPES
from deepmri.superres.settings import BUDGETS, METHODS, PRETRAINED_MODEL
from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskError,
    TaskResult,
)


def parse_budget(value: Any) -> str | float:
    """'quick', 'standard', 'best', or seconds (a positive number, also as text)."""
    text = str(value).strip().lower()
    if text in BUDGETS:
        return text
    try:
        seconds = float(text.removesuffix("s"))
    except ValueError:
        seconds = -1.0
    if not seconds > 0:
        raise TaskError(
            f"Option 'budget' must be {', '.join(BUDGETS)} or a number of seconds, not {value!r}."
        )
    return seconds


class SuperResolveTask(Task):
    """Thick slices to thin: self-supervised per volume ("ssl"), the pretrained 3D network
    ("pretrained"), or cubic / sinc interpolation."""

    name = "superresolve"
    title = "Super-resolution"
    help = (
        "Restore thin slices from a thick-slice MRI (for example 1 x 1 x 4 mm to 1 mm isotropic) "
        "on the same physical extent. 'ssl' trains a small network on the volume's own in-plane "
        "detail (no downloaded weights, any contrast); 'pretrained' applies the shipped 3D "
        "thick-to-thin network (seconds to a minute, no training); 'cubic' and 'sinc' interpolate"
    )
    inputs = (InputSpec("image", Kind.VOLUME, "The thick-slice volume (one axis coarser)"),)
    options = (
        OptionSpec(
            "spacing",
            float,
            None,
            "Output spacing in mm (three values, i j k); default: the in-plane spacing",
            count=3,
        ),
        OptionSpec(
            "factor", float, None, "Divide the thick-axis spacing by this (instead of spacing)"
        ),
        OptionSpec(
            "method",
            str,
            "ssl",
            "ssl (self-supervised), pretrained (3D network), cubic or sinc",
            choices=METHODS,
        ),
        OptionSpec(
            "budget",
            str,
            "quick",
            "For ssl: quick (about a minute on a CPU), standard, best, or seconds",
        ),
        OptionSpec(
            "slice_thickness",
            float,
            None,
            "Acquired slice thickness in mm, if not the slice spacing (slices with a gap)",
        ),
        OptionSpec("slice_gap", float, None, "Gap between slices in mm (instead of thickness)"),
        OptionSpec(
            "profile",
            str,
            "gaussian",
            "Assumed slice profile: gaussian (FWHM = thickness) or rect",
            choices=PROFILE_SHAPES,
        ),
        OptionSpec("seed", int, 0, "Random seed of the per-volume training"),
        OptionSpec(
            "model",
            str,
            PRETRAINED_MODEL,
            "For pretrained: a model id in the model store, or a model folder",
        ),
        OptionSpec(
            "finetune_steps",
            int,
            0,
            "For pretrained: first fine-tune it on the volume's own in-plane detail for this "
            "many steps (0: as shipped)",
        ),
    )
    outputs = (
        OutputSpec("superresolved", Kind.VOLUME, "the restored volume (float32)"),
        OutputSpec(
            "uncertainty",
            Kind.VOLUME,
            "where the passes disagree (spread over the orthogonal passes for ssl, over in-plane "
            "flips for pretrained; image units)",
            optional=True,
        ),
    )

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        from dataclasses import replace

        from deepmri.superres.restore import superresolve
        from deepmri.superres.settings import settings_for_budget

        context.config.apply_threads()
        budget = parse_budget(options["budget"])
        settings = replace(settings_for_budget(budget), seed=options["seed"])
        result = superresolve(
            inputs["image"],
            spacing=options["spacing"],
            factor=options["factor"],
            method=options["method"],
            budget=budget,
            slice_thickness=options["slice_thickness"],
            slice_gap=options["slice_gap"],
            profile=options["profile"],
            settings=settings,
            device=context.config.resolve_device(),
            uncertainty=context.wants("uncertainty"),
            model=options["model"],
            finetune_steps=options["finetune_steps"],
            progress=context.progress,
            cancel=context.cancel,
        )
        images = {"superresolved": result.image}
        if result.uncertainty is not None:
            images["uncertainty"] = result.uncertainty
        info = dict(result.info)
        if context.wants("uncertainty") and result.uncertainty is None:
            info["uncertainty"] = (
                f"not made: the {options['method']} method has no passes to compare"
            )
        return TaskResult(
            task=self.name,
            images=images,
            measures={"seconds": round(result.seconds, 2), "factor": round(result.factor, 4)},
            info=info,
        )

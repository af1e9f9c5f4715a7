"""The task contract: what every DeepMRI capability declares, and the one result type it returns.

A task says what it needs (named inputs of a kind), what it can be told (typed options with defaults
and help) and what it gives (named outputs of a kind). Everything that runs tasks (the CLI, batch,
the background worker, the Slicer logic) reads these declarations and knows no task by name.

Examples:
    >>> from deepmri.tasks import get_task
    >>> task = get_task("segment")  # doctest: +SKIP
    >>> result = task(inputs={"image": image}, options={"model": "brain-tissue"})  # doctest: +SKIP
    >>> result.write("out/")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

import SimpleITK as sitk

from deepmri.errors import DeepMRIError
from deepmri.progress import CancelLike, ProgressCallback, no_progress
from deepmri.runconfig import RunConfig

RESULT_FILE = "result.json"


class Kind(str, Enum):
    """What an input or output is, so a front door knows how to read, write or show it."""

    VOLUME = "volume"  # a scalar image (sitk.Image, float or int)
    LABELS = "labels"  # a label map (sitk.Image of integers); names/colours in result.info
    TRANSFORM = "transform"  # a SimpleITK transform in physical (LPS) space
    KSPACE = "kspace"  # complex k-space samples as an image with a complex pixel type


class TaskError(DeepMRIError):
    """A task was asked for with unknown inputs or options, or options of the wrong type."""


@dataclass(frozen=True)
class InputSpec:
    """A named input: `kind` says how front doors read it (a volume node, a file, a CSV column)."""

    name: str
    kind: Kind
    help: str
    optional: bool = False


@dataclass(frozen=True)
class OptionSpec:
    """A typed option with its default and help; `choices` limits it; `type` is a callable.

    `type` is `str`, `int`, `float` or `bool`; `count` > 1 makes it a tuple of that many values
    (for example a target spacing of 3 floats); None is allowed only where `default` is None.
    """

    name: str
    type: type
    default: Any
    help: str
    choices: tuple[Any, ...] | None = None
    count: int = 1

    def coerce(self, value: Any) -> Any:
        """The value converted to this option's type, or a `TaskError` naming the option."""
        if value is None:
            if self.default is None:
                return None
            raise TaskError(f"Option '{self.name}' needs a value ({self.help}).")
        if self.count > 1:
            values = _as_sequence(value, self.name)
            if len(values) != self.count:
                raise TaskError(
                    f"Option '{self.name}' takes {self.count} values, not {len(values)}."
                )
            return tuple(self._coerce_one(item) for item in values)
        return self._coerce_one(value)

    def _coerce_one(self, value: Any) -> Any:
        try:
            if self.type is bool:
                converted = _as_bool(value)
            else:
                converted = self.type(value)
        except (TypeError, ValueError):
            raise TaskError(
                f"Option '{self.name}' must be {self.type.__name__}, not {value!r}."
            ) from None
        if self.choices is not None and converted not in self.choices:
            raise TaskError(
                f"Option '{self.name}' must be one of {', '.join(map(str, self.choices))}, "
                f"not {converted!r}."
            )
        return converted


@dataclass(frozen=True)
class OutputSpec:
    """A named output. `optional` outputs are made only on request (`RunContext.wants`).

    `many` outputs are a family of images whose keys are "<name>-<slug>" (one probability map
    per label, say); every other output is stored under its own name.
    """

    name: str
    kind: Kind
    help: str
    optional: bool = False
    many: bool = False


@dataclass
class RunContext:
    """How a run is carried out: device/precision/threads, progress, cancel, outputs wanted."""

    config: RunConfig = field(default_factory=RunConfig)
    progress: ProgressCallback = no_progress
    cancel: CancelLike | None = None
    wanted: frozenset[str] = frozenset()
    store: Any = None  # a deepmri.models.ModelStore; None means the default store

    def wants(self, output: str) -> bool:
        return output in self.wanted


@dataclass
class TaskResult:
    """What a task returns: images and transforms by output key, measures, and metadata.

    `images` keys are output names ("labels", "uncertainty") or, for `many` outputs,
    "<name>-<slug>"; the key is also the file stem everywhere (CLI, batch, worker), so there is
    one naming scheme. `measures` is a flat table (name -> number or text) for summaries;
    `info` holds what a front door needs to present the outputs (label names, colours,
    terminology under "label_info"; model id; provenance), all JSON-serialisable.
    """

    task: str
    images: dict[str, sitk.Image] = field(default_factory=dict)
    transforms: dict[str, sitk.Transform] = field(default_factory=dict)
    measures: dict[str, float | str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: str | Path, suffix: str = ".nii.gz") -> dict[str, str]:
        """Write every output into `folder` as "<key><suffix>" / "<key>.h5" plus result.json.

        Each file is written atomically; result.json is written last, so a folder with a
        result.json holds a complete result. Returns key -> file name.
        """
        from deepmri.io import write_image, write_json, write_transform

        folder = Path(folder)
        files: dict[str, str] = {}
        for key, image in self.images.items():
            files[key] = write_image(image, folder / f"{key}{suffix}", suffix != ".nrrd").name
        for key, transform in self.transforms.items():
            files[key] = write_transform(transform, folder / f"{key}.h5").name
        record = {
            "task": self.task,
            "files": files,
            "images": sorted(self.images),
            "transforms": sorted(self.transforms),
            "measures": self.measures,
            "info": self.info,
        }
        write_json(record, folder / RESULT_FILE)
        return files

    @classmethod
    def read(cls, folder: str | Path) -> TaskResult:
        """Read back a result that `write` produced (the background job's way home)."""
        from deepmri.io import read_image, read_transform

        folder = Path(folder)
        try:
            record = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            raise DeepMRIError(f"No complete result in '{folder}': {error}") from error
        files = record["files"]
        return cls(
            task=record["task"],
            images={key: read_image(folder / files[key]) for key in record["images"]},
            transforms={key: read_transform(folder / files[key]) for key in record["transforms"]},
            measures=dict(record.get("measures", {})),
            info=dict(record.get("info", {})),
        )

    def outputs_of(self, spec: OutputSpec) -> dict[str, sitk.Image | sitk.Transform]:
        """The images or transforms that belong to one declared output (several if `many`)."""
        pool: Mapping[str, Any] = self.transforms if spec.kind is Kind.TRANSFORM else self.images
        if spec.many:
            return {key: value for key, value in pool.items() if key.startswith(spec.name + "-")}
        return {spec.name: pool[spec.name]} if spec.name in pool else {}


class Task:
    """Base class of every task: declarations as class attributes, the work in `run`.

    Subclasses set `name`, `title`, `help`, `inputs`, `options`, `outputs` and implement `run`.
    Call the task (`task(inputs, options, context)`) rather than `run`: the call checks inputs
    and options against the declarations first, so every front door refuses bad requests the
    same way and before any work.
    """

    name: str = ""
    title: str = ""  # for menus and node names: "Segmentation"
    help: str = ""
    inputs: tuple[InputSpec, ...] = ()
    options: tuple[OptionSpec, ...] = ()
    outputs: tuple[OutputSpec, ...] = ()

    def run(
        self, inputs: dict[str, Any], options: dict[str, Any], context: RunContext
    ) -> TaskResult:
        raise NotImplementedError

    def __call__(
        self,
        inputs: Mapping[str, Any],
        options: Mapping[str, Any] | None = None,
        context: RunContext | None = None,
    ) -> TaskResult:
        checked_inputs = self.check_inputs(inputs)
        checked_options = self.resolve_options(options or {})
        context = context or RunContext()
        self.check_wanted(context.wanted)
        return self.run(checked_inputs, checked_options, context)

    def check_inputs(self, inputs: Mapping[str, Any]) -> dict[str, Any]:
        known = {spec.name for spec in self.inputs}
        unknown = sorted(set(inputs) - known)
        if unknown:
            raise TaskError(
                f"Task '{self.name}' has no input named {', '.join(unknown)}; "
                f"its inputs are {', '.join(sorted(known))}."
            )
        missing = [
            spec.name for spec in self.inputs if not spec.optional and spec.name not in inputs
        ]
        if missing:
            raise TaskError(f"Task '{self.name}' needs the input(s) {', '.join(missing)}.")
        return {name: value for name, value in inputs.items() if value is not None}

    def resolve_options(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """Defaults filled in, values converted to their declared types, unknown names refused."""
        specs = {spec.name: spec for spec in self.options}
        unknown = sorted(set(options) - set(specs))
        if unknown:
            raise TaskError(
                f"Task '{self.name}' has no option named {', '.join(unknown)}; "
                f"its options are {', '.join(sorted(specs)) or 'none'}."
            )
        return {
            name: spec.coerce(options[name]) if name in options else spec.default
            for name, spec in specs.items()
        }

    def check_wanted(self, wanted: frozenset[str]) -> None:
        optional = {spec.name for spec in self.outputs if spec.optional}
        unknown = sorted(set(wanted) - optional)
        if unknown:
            raise TaskError(
                f"Task '{self.name}' has no optional output named {', '.join(unknown)}; "
                f"it offers {', '.join(sorted(optional)) or 'none'}."
            )

    def output_spec(self, key: str) -> OutputSpec:
        """The declared output a result key belongs to ("probability-csf" -> "probability")."""
        for spec in self.outputs:
            if key == spec.name or (spec.many and key.startswith(spec.name + "-")):
                return spec
        raise TaskError(f"Task '{self.name}' declares no output for '{key}'.")


def slug(text: str) -> str:
    """A file-name-safe, lower-case form of a label or structure name ("Grey matter" -> "grey-matter")."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unnamed"


def _as_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(value)


def _as_sequence(value: Any, name: str) -> Sequence[Any]:
    if isinstance(value, str):
        return value.replace(",", " ").split()
    if isinstance(value, Sequence):
        return value
    raise TaskError(f"Option '{name}' takes several values, not {value!r}.")

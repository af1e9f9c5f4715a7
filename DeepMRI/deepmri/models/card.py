"""The model card: what a model expects, what it outputs, how it was trained and how well it does.

`card.json` sits beside `weights.safetensors` in every model folder. It is validated on load, and
each error names the field that is wrong, so a user completing an imported model's card can fix it.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepmri.errors import CardError
from deepmri.io import atomic_path

CARD_FILE = "card.json"
TASKS = (
    "segmentation",
    "registration",
    "super-resolution",
    "synthesis",
    "reconstruction",
    "denoising",
)
WEIGHT_FORMATS = ("safetensors", "torchscript", "onnx", "monai-bundle")
NORMALIZATIONS = ("percentile", "zscore", "none")
_ID = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def _fail(field_name: str, expected: str, got: Any) -> CardError:
    return CardError(f"card.json field '{field_name}' must be {expected}, got {got!r}")


def _require(mapping: dict[str, Any], key: str, prefix: str = "") -> Any:
    if key not in mapping or mapping[key] is None:
        raise CardError(f"card.json is missing the field '{prefix}{key}'")
    return mapping[key]


def _positive_numbers(value: Any, count: int | None, field_name: str) -> list[float]:
    ok = isinstance(value, list | tuple) and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and v > 0
        for v in value
    )
    if not ok or (count is not None and len(value) != count):
        amount = f"{count} positive numbers" if count else "a list of positive numbers"
        raise _fail(field_name, amount, value)
    return [float(v) for v in value]


def _colour(value: Any, field_name: str) -> list[float]:
    ok = isinstance(value, list | tuple) and len(value) == 3
    ok = ok and all(
        isinstance(v, int | float) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in value
    )
    if not ok:
        raise _fail(field_name, "[r, g, b] with each value from 0 to 1", value)
    return [float(v) for v in value]


@dataclass
class Label:
    """One output label: its value in the label map, name, colour and optional terminology."""

    value: int
    name: str
    color: list[float]
    terminology: dict[str, Any] | None = None

    @classmethod
    def from_dict(cls, data: Any, index: int) -> Label:
        prefix = f"labels[{index}]."
        if not isinstance(data, dict):
            raise _fail(f"labels[{index}]", "an object with value, name and color", data)
        value = _require(data, "value", prefix)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 < value < 256:
            raise _fail(prefix + "value", "a whole number from 1 to 255", value)
        name = _require(data, "name", prefix)
        if not isinstance(name, str) or not name.strip():
            raise _fail(prefix + "name", "a non-empty name", name)
        color = _colour(_require(data, "color", prefix), prefix + "color")
        terminology = data.get("terminology")
        if terminology is not None and not isinstance(terminology, dict):
            raise _fail(prefix + "terminology", "an object or null", terminology)
        return cls(value, name, color, terminology)

    def to_dict(self) -> dict[str, Any]:
        return {
            "value": self.value,
            "name": self.name,
            "color": self.color,
            "terminology": self.terminology,
        }


@dataclass
class ModelCard:
    """A validated card.json. Unknown fields are kept in `extra` and written back unchanged.

    Examples:
        >>> card = ModelCard.from_dict(example_card())
        >>> card.id, card.task, card.spacing
        ('example', 'segmentation', [2.0, 2.0, 2.0])
    """

    id: str
    version: str
    task: str
    architecture: dict[str, Any]
    input: dict[str, Any]
    preprocessing: dict[str, Any]
    inference: dict[str, Any]
    labels: list[Label]
    weights: dict[str, Any]
    license: str
    postprocessing: list[str] = field(default_factory=list)
    # Label values whose union (holes filled) is the tight brain, without the CSF around it: a
    # brain-extraction model that lists them offers both mask conventions (`--no-csf`).
    tight_labels: list[int] = field(default_factory=list)
    # How far (mm) from the tight brain the default mask keeps CSF around the brain: the
    # "csf_border" post-processing step drops predicted CSF beyond it, as the training labels drop
    # CSF beyond their own border (deepmri.train.labels.CSF_BORDER_MM).
    csf_border_mm: float | None = None
    # The id of the model that averages with this one (its `inference.average_with`): a part, not
    # a model to pick alone, so task menus leave it out; listings say whose part it is.
    part_of: str = ""
    metrics: list[dict[str, Any]] = field(default_factory=list)
    training: dict[str, Any] = field(default_factory=dict)
    citation: str = ""
    description: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def spacing(self) -> list[float]:
        return [float(v) for v in self.preprocessing["spacing"]]

    @property
    def patch_size(self) -> list[int]:
        return [int(v) for v in self.inference["patch_size"]]

    @property
    def task_text(self) -> str:
        """The task as listings show it: "segmentation", or "segmentation, part of X" for a
        network that ships inside another model."""
        return f"{self.task}, part of {self.part_of}" if self.part_of else self.task

    @property
    def weights_format(self) -> str:
        return self.weights.get("format", "safetensors")

    @classmethod
    def from_dict(cls, data: Any) -> ModelCard:
        """Validate a card dictionary; the CardError names the first bad field."""
        if not isinstance(data, dict):
            raise CardError("card.json must hold a JSON object")
        card_id = _require(data, "id")
        if not isinstance(card_id, str) or not _ID.match(card_id):
            raise _fail("id", "lower-case letters, digits, '.', '_' or '-'", card_id)
        version = str(_require(data, "version"))
        task = _require(data, "task")
        if task not in TASKS:
            raise _fail("task", f"one of {', '.join(TASKS)}", task)
        architecture = _validate_architecture(_require(data, "architecture"))
        input_spec = _validate_input(_require(data, "input"))
        preprocessing = _validate_preprocessing(_require(data, "preprocessing"))
        inference = _validate_inference(_require(data, "inference"))
        labels_data = data.get("labels", [])
        if not isinstance(labels_data, list):
            raise _fail("labels", "a list", labels_data)
        labels = [Label.from_dict(item, index) for index, item in enumerate(labels_data)]
        if task == "segmentation" and not labels:
            raise CardError(
                "card.json field 'labels' must list at least one label for segmentation"
            )
        values = [label.value for label in labels]
        if len(set(values)) != len(values):
            raise _fail("labels", "labels with distinct values", values)
        weights = _validate_weights(_require(data, "weights"))
        license_text = _require(data, "license")
        if not isinstance(license_text, str) or not license_text.strip():
            raise _fail("license", "the licence of the weights", license_text)
        postprocessing = data.get("postprocessing") or []
        if not isinstance(postprocessing, list) or not all(
            isinstance(s, str) for s in postprocessing
        ):
            raise _fail("postprocessing", "a list of step names", postprocessing)
        tight_labels = data.get("tight_labels") or []
        if not isinstance(tight_labels, list) or not set(tight_labels) <= set(values):
            raise _fail("tight_labels", f"a list of label values from {values}", tight_labels)
        csf_border_mm = data.get("csf_border_mm")
        if csf_border_mm is not None and (
            not isinstance(csf_border_mm, (int, float)) or not tight_labels or csf_border_mm <= 0
        ):
            raise _fail(
                "csf_border_mm", "a positive distance in mm, with 'tight_labels'", csf_border_mm
            )
        if "csf_border" in postprocessing and csf_border_mm is None:
            raise _fail("csf_border_mm", "the border of the 'csf_border' step", csf_border_mm)
        part_of = data.get("part_of") or ""
        if not isinstance(part_of, str) or (part_of and not _ID.match(part_of)):
            raise _fail("part_of", "the id of the model that averages with this one", part_of)
        metrics = data.get("metrics") or []
        _validate_metrics(metrics)
        known = set(cls.__dataclass_fields__) - {"extra"}
        return cls(
            id=card_id,
            version=version,
            task=task,
            architecture=architecture,
            input=input_spec,
            preprocessing=preprocessing,
            inference=inference,
            labels=labels,
            weights=weights,
            license=license_text,
            postprocessing=list(postprocessing),
            tight_labels=[int(value) for value in tight_labels],
            csf_border_mm=None if csf_border_mm is None else float(csf_border_mm),
            part_of=part_of,
            metrics=list(metrics),
            training=dict(data.get("training") or {}),
            citation=str(data.get("citation") or ""),
            description=str(data.get("description") or ""),
            extra={key: value for key, value in data.items() if key not in known},
        )

    def to_dict(self) -> dict[str, Any]:
        data = {
            "id": self.id,
            "version": self.version,
            "task": self.task,
            "description": self.description,
            "architecture": self.architecture,
            "input": self.input,
            "preprocessing": self.preprocessing,
            "inference": self.inference,
            "postprocessing": self.postprocessing,
            "labels": [label.to_dict() for label in self.labels],
            **({"tight_labels": self.tight_labels} if self.tight_labels else {}),
            **({"csf_border_mm": self.csf_border_mm} if self.csf_border_mm is not None else {}),
            **({"part_of": self.part_of} if self.part_of else {}),
            "metrics": self.metrics,
            "training": self.training,
            "license": self.license,
            "citation": self.citation,
            "weights": self.weights,
        }
        data.update(self.extra)
        return data

    @classmethod
    def from_file(cls, path: str | Path) -> ModelCard:
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise CardError(f"No model card at {path}") from None
        except json.JSONDecodeError as error:
            raise CardError(
                f"{path} is not valid JSON (line {error.lineno}: {error.msg})"
            ) from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            path = path / CARD_FILE
        text = json.dumps(self.to_dict(), indent=2) + "\n"
        with atomic_path(path, ".json") as partial:
            partial.write_text(text, encoding="utf-8")
        return path


def sha256_of(path: str | Path) -> str:
    """The sha256 a card records for a weights (or config) file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _validate_architecture(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail("architecture", "an object with name and config", data)
    name = _require(data, "name", "architecture.")
    if not isinstance(name, str):
        raise _fail("architecture.name", "a network name such as 'monai.UNet'", name)
    config = data.get("config", {})
    if not isinstance(config, dict):
        raise _fail("architecture.config", "an object of network arguments", config)
    return {**data, "config": config}


def _validate_input(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail("input", "an object with contrasts and channels", data)
    contrasts = data.get("contrasts", ["any"])
    if not isinstance(contrasts, list) or not contrasts:
        raise _fail("input.contrasts", "a list of contrasts in channel order", contrasts)
    channels = data.get("channels", len(contrasts))
    if not isinstance(channels, int) or channels < 1:
        raise _fail("input.channels", "a whole number of at least 1", channels)
    return {**data, "contrasts": contrasts, "channels": channels}


def _is_orientation(value: Any) -> bool:
    """Three axis letters, one from each of the pairs R/L, A/P and S/I ('RAS', 'LPS', 'PIR'...)."""
    if not isinstance(value, str) or len(value) != 3:
        return False
    pair_of = {"R": 0, "L": 0, "A": 1, "P": 1, "S": 2, "I": 2}
    return sorted(pair_of.get(letter, -1) for letter in value.upper()) == [0, 1, 2]


def _validate_preprocessing(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail("preprocessing", "an object with spacing and normalization", data)
    spacing = _positive_numbers(
        _require(data, "spacing", "preprocessing."), 3, "preprocessing.spacing"
    )
    orientation = data.get("orientation", "RAS")
    if not _is_orientation(orientation):
        raise _fail(
            "preprocessing.orientation",
            "one letter of each pair R/L, A/P, S/I, e.g. 'RAS'",
            orientation,
        )
    normalization = data.get("normalization", {"method": "percentile"})
    if not isinstance(normalization, dict) or normalization.get("method") not in NORMALIZATIONS:
        raise _fail(
            "preprocessing.normalization.method",
            f"one of {', '.join(NORMALIZATIONS)}",
            normalization,
        )
    return {**data, "spacing": spacing, "orientation": orientation, "normalization": normalization}


def flips_to_run(inference: dict[str, Any], with_uncertainty: bool) -> list[list[int]]:
    """The flips a run of this card's `inference` makes: all of them when the card asks for
    `average_flips` (the result is always their mean, so the same with or without the
    uncertainty map), otherwise only when the uncertainty map is asked for."""
    wanted = with_uncertainty or bool(inference.get("average_flips"))
    return list(inference.get("flips", [])) if wanted else []


def _validate_inference(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail("inference", "an object with patch_size and overlap", data)
    patch = _require(data, "patch_size", "inference.")
    if (
        not isinstance(patch, list)
        or len(patch) != 3
        or not all(isinstance(v, int) and v > 0 for v in patch)
    ):
        raise _fail("inference.patch_size", "3 positive whole numbers", patch)
    overlap = data.get("overlap", 0.5)
    if not isinstance(overlap, int | float) or not 0.0 <= overlap < 1.0:
        raise _fail("inference.overlap", "a number from 0 to below 1", overlap)
    flips = data.get("flips", [])
    if not isinstance(flips, list) or not all(
        isinstance(f, list) and all(isinstance(d, int) and 2 <= d <= 4 for d in f) for f in flips
    ):
        raise _fail("inference.flips", "lists of tensor dims 2, 3 or 4", flips)
    _validate_refinement(data.get("refinement"))
    members = data.get("average_with", [])
    if not isinstance(members, list) or not all(isinstance(m, str) and m for m in members):
        raise _fail("inference.average_with", "a list of model ids", members)
    return {**data, "patch_size": patch, "overlap": float(overlap), "flips": flips}


REFINEMENT_METHODS = ("gaussian-mixture",)


def _validate_refinement(refinement: Any) -> None:
    """`inference.refinement`: the per-image mixture a tissue model's output goes through."""
    if refinement is None:
        return
    if not isinstance(refinement, dict) or refinement.get("method") not in REFINEMENT_METHODS:
        raise _fail(
            "inference.refinement", f"an object with method {REFINEMENT_METHODS}", refinement
        )
    for key in ("prior_power", "final_prior_power"):
        value = refinement.get(key, 1.0)
        if not isinstance(value, int | float) or value < 0:
            raise _fail(f"inference.refinement.{key}", "a number >= 0", value)
    for key, lowest in (("bias_degree", 0), ("iterations", 1)):
        value = refinement.get(key, lowest)
        if not isinstance(value, int) or value < lowest:
            raise _fail(f"inference.refinement.{key}", f"a whole number >= {lowest}", value)


def _validate_weights(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise _fail("weights", "an object with file, sha256 and size", data)
    file_name = _require(data, "file", "weights.")
    if (
        not isinstance(file_name, str)
        or "/" in file_name
        or "\\" in file_name
        or file_name.startswith(".")
    ):
        raise _fail("weights.file", "a file name inside the model folder", file_name)
    sha256 = _require(data, "sha256", "weights.")
    if not isinstance(sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise _fail("weights.sha256", "64 lower-case hexadecimal digits", sha256)
    size = _require(data, "size", "weights.")
    if not isinstance(size, int) or size <= 0:
        raise _fail("weights.size", "the file size in bytes", size)
    weight_format = data.get("format", "safetensors")
    if weight_format not in WEIGHT_FORMATS:
        raise _fail("weights.format", f"one of {', '.join(WEIGHT_FORMATS)}", weight_format)
    return {**data, "format": weight_format}


def _validate_metrics(metrics: Any) -> None:
    if not isinstance(metrics, list):
        raise _fail("metrics", "a list", metrics)
    for index, metric in enumerate(metrics):
        if not isinstance(metric, dict):
            raise _fail(f"metrics[{index}]", "an object with name, value and dataset", metric)
        for key in ("name", "value", "dataset"):
            _require(metric, key, f"metrics[{index}].")
        if not isinstance(metric["value"], int | float):
            raise _fail(f"metrics[{index}].value", "a number", metric["value"])
        for key in ("baseline", "after_brain_extraction"):
            if key in metric and not isinstance(metric[key], int | float):
                raise _fail(f"metrics[{index}].{key}", "a number", metric[key])
        peers = metric.get("peers", {})
        if not isinstance(peers, dict) or not all(
            isinstance(value, int | float) for value in peers.values()
        ):
            raise _fail(f"metrics[{index}].peers", "an object of tool name: number", peers)


def measuring_commands(metrics: list[dict[str, Any]]) -> list[str]:
    """The commands that measured a card's metrics, each once, in order: an evaluation writes
    many figures with one command, and a listing names it once, not on every figure."""
    return list(dict.fromkeys(m["command"] for m in metrics if m.get("command")))


def metric_comparison(metric: dict[str, Any]) -> str:
    """What a card's metric was measured beside, as one line: "baseline (cubic B-spline) 0.81,
    deepbet 0.936, robex 0.940" ("" when it stands alone). The evaluations write these keys
    into the cards so that whoever reads a card sees the tools they could pick instead."""
    parts = []
    if "baseline" in metric:
        method = metric.get("baseline_method")
        parts.append(f"baseline{f' ({method})' if method else ''} {metric['baseline']:g}")
    parts += [f"{name} {value:g}" for name, value in metric.get("peers", {}).items()]
    if "after_brain_extraction" in metric:
        parts.append(f"after the model's own brain extraction {metric['after_brain_extraction']:g}")
    return ", ".join(parts)


def example_card(**overrides: Any) -> dict[str, Any]:
    """A complete, valid card dictionary to start from (tests, imports, documentation)."""
    card = {
        "id": "example",
        "version": "0.1.0",
        "task": "segmentation",
        "architecture": {
            "name": "monai.UNet",
            "config": {
                "spatial_dims": 3,
                "in_channels": 1,
                "out_channels": 2,
                "channels": [4, 8],
                "strides": [2],
            },
        },
        "input": {"contrasts": ["any"], "channels": 1},
        "preprocessing": {
            "spacing": [2.0, 2.0, 2.0],
            "orientation": "RAS",
            "normalization": {"method": "percentile", "lower": 0.5, "upper": 99.5},
        },
        "inference": {"patch_size": [32, 32, 32], "overlap": 0.5, "flips": [[4]]},
        "postprocessing": [],
        "labels": [{"value": 1, "name": "Foreground", "color": [1.0, 0.0, 0.0]}],
        "metrics": [],
        "training": {},
        "license": "Apache-2.0",
        "weights": {"file": "weights.safetensors", "sha256": "0" * 64, "size": 1},
    }
    card.update(overrides)
    return card

"""The model manager behind the DeepMRI Models module, and the settings every DeepMRI module uses.

Rows and card pages for the models table, verify/import/fetch/remove, device detection, and the
saved choices (device, precision, CPU threads, extra model folders) that become the explicit
`RunConfig`, model store and worker environment of every run. No Qt: the settings object is
passed in (Slicer's `qt.QSettings()`, or anything with `value`/`setValue`).
"""

from __future__ import annotations

import html
import os
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from deepmri.models.card import measuring_commands, metric_comparison
from deepmri.progress import CancelLike, ProgressCallback
from deepmri.runconfig import PRECISIONS, RunConfig

from DeepMRILib import jobs

DEVICES = ("auto", "cpu", "cuda", "mps")
DEFAULT_SEGMENTATION_MODEL = "brain-tissue"
# Where each saved choice lives in Slicer's application settings.
SETTINGS_KEYS = {
    "device": "DeepMRI/Device",
    "precision": "DeepMRI/Precision",
    "threads": "DeepMRI/Threads",
    "extra_model_paths": "DeepMRI/ModelPaths",
}
_WHERE = {"bundled": "bundled", "cache": "cache", "extra": "folder"}


@dataclass(frozen=True)
class SavedSettings:
    """The user's DeepMRI choices as saved in the application settings.

    `threads` 0 leaves torch's default; `extra_model_paths` is os.pathsep-separated.

    Examples:
        >>> SavedSettings(precision="bf16").run_config().precision
        'bf16'
        >>> SavedSettings(device="cuda").run_config(device="cpu").device
        'cpu'
    """

    device: str = "auto"
    precision: str = "auto"
    threads: int = 0
    extra_model_paths: str = ""

    @classmethod
    def load(cls, settings: Any) -> SavedSettings:
        """Read from `settings` (a QSettings); values never saved, or no longer valid, default."""
        values: dict[str, Any] = {}
        for name, key in SETTINGS_KEYS.items():
            value = settings.value(key)
            if value is None or value == "":
                continue
            if name == "device" and str(value) not in DEVICES:
                continue
            if name == "precision" and str(value) not in PRECISIONS:
                continue
            if name == "threads":
                try:
                    value = max(0, int(value))
                except (TypeError, ValueError):
                    continue
            values[name] = value if name == "threads" else str(value)
        return cls(**values)

    def save(self, settings: Any) -> bool:
        """Write to `settings`; True if anything changed."""
        changed = False
        for name, key in SETTINGS_KEYS.items():
            value = str(getattr(self, name))
            if settings.value(key) != value:
                settings.setValue(key, value)
                changed = True
        return changed

    @classmethod
    def from_parameters(cls, parameters: Any) -> SavedSettings:
        """The panel's parameter node (fields device, precision, threads, extraModelPaths)."""
        return cls(
            device=str(parameters.device),
            precision=str(parameters.precision),
            threads=int(parameters.threads),
            extra_model_paths=str(parameters.extraModelPaths),
        )

    def to_parameters(self, parameters: Any) -> None:
        """Show these settings in the panel's parameter node (only fields that differ are set)."""
        for name, value in (
            ("device", self.device),
            ("precision", self.precision),
            ("threads", self.threads),
            ("extraModelPaths", self.extra_model_paths),
        ):
            if getattr(parameters, name) != value:
                setattr(parameters, name, value)

    def run_config(self, **overrides: Any) -> RunConfig:
        """The `RunConfig` a run gets: these choices, with explicit overrides ("auto" = none)."""
        from deepmri.settings import Settings

        overrides = {k: v for k, v in overrides.items() if v not in (None, "", "auto")}
        chosen = Settings(
            device=self.device, precision=self.precision, threads=self.threads or None
        )
        return RunConfig.from_settings(chosen, **overrides)

    @property
    def model_paths(self) -> tuple[Path, ...]:
        return tuple(Path(p).expanduser() for p in self.extra_model_paths.split(os.pathsep) if p)

    def core_settings(self) -> Any:
        """`deepmri.settings.Settings` of this process with the saved model folders added."""
        from deepmri.settings import Settings

        base = Settings.from_environment()
        return replace(base, extra_model_paths=base.extra_model_paths + self.model_paths)

    def store(self) -> Any:
        """The model store (bundled, cache, environment and saved folders)."""
        from deepmri.models import ModelStore

        return ModelStore(settings=self.core_settings())

    def worker_environment(self) -> dict[str, str]:
        """What a background worker needs to see the same models (its store reads the path)."""
        paths = self.core_settings().extra_model_paths
        return {"DEEPMRI_MODEL_PATH": os.pathsep.join(map(str, paths))} if paths else {}

    def apply_to(self, logic: Any) -> Any:
        """Give a `TaskLogic` these settings: where its store looks for models (the store itself
        is made at the first run: it loads torch), its worker's model folders, its default run
        configuration. Returns the logic."""
        logic.store = None
        logic.core_settings = self.core_settings()
        logic.worker_environment.update(self.worker_environment())
        logic.config = self.run_config()
        return logic


class ModelsLogic:
    """Model management for the DeepMRI Models panel and the Python console.

    Examples (Slicer's Python console):
        >>> logic = slicer.util.getModuleLogic("DeepMRIModels")  # doctest: +SKIP
        >>> [row["id"] for row in logic.list_models()]  # doctest: +SKIP
        ['brain-extraction', 'brain-tissue']
        >>> logic.verify("brain-tissue")  # doctest: +SKIP
    """

    def __init__(self, saved: SavedSettings | None = None) -> None:
        self.saved = saved or SavedSettings()

    def store(self) -> Any:
        return self.saved.store()

    def cache_folder(self) -> Path:
        return self.saved.core_settings().model_cache

    def open_cache_folder(self) -> None:
        """Show the model cache in the system's file browser (Qt; created if missing)."""
        import qt

        folder = self.cache_folder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def list_models(self) -> list[dict[str, Any]]:
        """One row per model: id, version, task, licence, metrics, where it is, status, path."""
        rows = []
        for info in self.store().list():
            card = info.card.to_dict() if info.card is not None else {}
            rows.append(
                {
                    "id": info.id,
                    "version": info.version,
                    "task": info.task_text,
                    "license": info.license,
                    "metrics": metrics_text(card.get("metrics", [])),
                    "source": _WHERE.get(info.source, info.source),
                    "status": info.status,
                    "path": info.path,
                    "removable": info.source == "cache",
                }
            )
        return sorted(rows, key=lambda row: row["id"])

    def models_for_task(
        self, task: str = "segmentation", default: str = DEFAULT_SEGMENTATION_MODEL
    ) -> list[dict[str, Any]]:
        """Usable models of one task for a menu: id, title, one-line description, whether it
        offers the tight brain mask and its CSF border (mm, None if it draws none); default
        first. A network that is part of another model (`part_of`) is not offered alone."""
        models = []
        for info in self.store().list():
            if info.card is None or info.status != "ok" or info.task != task:
                continue  # listed with the reason in the DeepMRI Models module
            if info.card.part_of:
                continue  # runs inside the model it is part of
            card = info.card.to_dict()
            labels = ", ".join(label["name"] for label in card.get("labels", []))
            title = card["id"].replace("-", " ").capitalize()
            description = (
                f"{title} v{card.get('version', '?')}: {labels or 'no labels listed'}. "
                f"Licence: {card.get('license', 'not stated')}."
            )
            models.append(
                {
                    "id": card["id"],
                    "title": title,
                    "description": description,
                    "tight_mask": bool(card.get("tight_labels")),  # offers --no-csf
                    "csf_border_mm": card.get("csf_border_mm"),
                }
            )
        return sorted(models, key=lambda model: (model["id"] != default, model["id"]))

    def card(self, model_id: str) -> dict[str, Any]:
        return self.store().get(model_id).card.to_dict()

    def card_html(self, model_id: str) -> str:
        """The card as a short HTML page for the details box (an error in red if unreadable)."""
        try:
            card = self.card(model_id)
        except Exception as error:
            return f"<p style='color:#c0392b'>{html.escape(str(error))}</p>"
        return card_html(card)

    def verify(self, model_id: str, config: RunConfig | None = None) -> str:
        """Check the weights' size and checksum against the card, then load the network once."""
        config = config or self.saved.run_config()
        model = self.store().get(model_id)
        model.verify()
        device = None if config.device == "auto" else config.resolve_device()
        network = model.load_network(device=device)
        count = sum(parameter.numel() for parameter in network.parameters())
        return f"{model_id}: checksum verified, network loaded ({count:,} parameters)."

    def import_model(self, path: str | os.PathLike, card: str | os.PathLike | None = None) -> str:
        """Import a DeepMRI model folder, a MONAI bundle, or a TorchScript/ONNX file with `card`.

        The model is copied into the cache and loaded once before it is listed; returns its id.
        A network file without a complete card fails with the list of fields to fill in.
        """
        from deepmri.models import importers

        model = importers.import_model(
            Path(path), self.cache_folder(), card=None if card is None else Path(card)
        )
        return model.card.id

    def fetch(
        self,
        url: str,
        sha256: str | None = None,
        progress: ProgressCallback | None = None,
        cancel: CancelLike | None = None,
    ) -> str:
        """Download a model (resumable, checksum-checked) into the cache; returns its id."""
        from deepmri.models.fetch import fetch_model

        model = fetch_model(
            url, self.cache_folder(), sha256=sha256, progress=progress, cancel=cancel
        )
        return model.card.id

    def start_fetch(self, url: str, sha256: str | None = None) -> jobs.ThreadJob:
        """`fetch` in a thread: a job to poll and cancel; its result is the model id."""
        return jobs.ThreadJob(
            lambda progress, cancel: self.fetch(url, sha256, progress=progress, cancel=cancel)
        )

    def remove(self, model_id: str) -> None:
        """Delete a model from the user's cache (bundled models are read-only)."""
        self.store().remove(model_id)

    @staticmethod
    def detect_devices() -> str:
        """Which devices PyTorch sees here, as one readable line."""
        import torch

        found = ["CPU"]
        if torch.cuda.is_available():
            found += [
                f"CUDA {i}: {torch.cuda.get_device_name(i)}"
                for i in range(torch.cuda.device_count())
            ]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("Apple MPS")
        return f"PyTorch {torch.__version__} can use: {', '.join(found)}"


def card_html(card: Mapping[str, Any]) -> str:
    """A model card as HTML: labels with their colours, input, accuracy, data, licence, citation."""

    def escape(value: Any) -> str:
        return html.escape(str(value))

    parts = [f"<h3>{escape(card['id'])} {escape(card.get('version', ''))}</h3>"]
    labels = "".join(
        f"<li><span style='color:{hex_color(label.get('color'))}'>&#9632;</span> "
        f"{escape(label['value'])}: {escape(label['name'])}</li>"
        for label in card.get("labels", [])
    )
    parts.append(f"<p><b>Labels</b></p><ul>{labels}</ul>")
    contrasts = ", ".join(card.get("input", {}).get("contrasts", [])) or "any"
    preprocessing = card.get("preprocessing", {})
    parts.append(
        f"<p><b>Input</b>: {escape(contrasts)}; "
        f"resampled to {escape(preprocessing.get('spacing', '?'))} mm, "
        f"{escape(preprocessing.get('orientation', ''))}</p>"
    )
    metrics = "".join(
        f"<li>{escape(m.get('name'))} = {escape(m.get('value'))} ({escape(m.get('dataset', ''))})"
        + (f"<br/>beside: {escape(beside)}" if (beside := metric_comparison(m)) else "")
        + "</li>"
        for m in card.get("metrics", [])
    )
    parts.append(f"<p><b>Measured accuracy</b></p><ul>{metrics or '<li>-</li>'}</ul>")
    parts += [
        f"<p>Measured by <code>{escape(command)}</code></p>"
        for command in measuring_commands(card.get("metrics", []))
    ]
    training = card.get("training", {})
    parts.append(f"<p><b>Training data</b>: {escape(training.get('data', 'not stated'))}</p>")
    parts.append(f"<p><b>Licence</b>: {escape(card.get('license', 'not stated'))}</p>")
    parts.append(f"<p><b>Citation</b>: {escape(card.get('citation', 'not stated'))}</p>")
    return "".join(parts)


def metrics_text(metrics: list[Mapping[str, Any]]) -> str:
    return "; ".join(f"{m.get('name')} {m.get('value')}" for m in metrics[:3])


def hex_color(color: Any) -> str:
    if not color:
        return "#888888"
    return "#" + "".join(f"{int(round(255 * float(c))):02x}" for c in list(color)[:3])


def mask_options(model: dict[str, Any], include_csf: bool, border_mm: float) -> dict[str, Any]:
    """The segment task's mask options from the panel, for a model of the model menu.

    Only a model that offers both conventions takes the tight brain and a CSF border; a border
    below 0 (the box's "model default") is the card's, and the tight brain needs none.
    """
    both = bool(model.get("tight_mask"))
    border = border_mm if both and include_csf and border_mm >= 0 else None
    return {"csf": include_csf or not both, "csf_border_mm": border}


def border_text(model: dict[str, Any]) -> str:
    """The card's CSF border as the panel shows it: "3.5 mm", or "none" where it draws none."""
    border = model.get("csf_border_mm")
    return "none" if border is None else f"{border:g} mm"

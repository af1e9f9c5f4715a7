"""Where models live and how they are loaded: bundled, the user's cache, and extra folders.

Weights load only through safetensors (or `torch.load(weights_only=True)` for state dicts), after
their size and sha256 are checked against the card, so a tampered file is refused, never run.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepmri.errors import CardError, ModelError
from deepmri.models.card import CARD_FILE, ModelCard
from deepmri.nets import build_network
from deepmri.settings import BUNDLED_MODELS_DIR, Settings

WEIGHTS_FILE = "weights.safetensors"
_HASH_CHUNK = 1 << 20


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass
class ModelInfo:
    """One row of `ModelStore.list()`: enough to show in a table without loading weights."""

    id: str
    version: str
    task: str
    license: str
    source: str  # "bundled", "cache" or "extra"
    path: Path
    status: str  # "ok", "weights missing", or the card error
    card: ModelCard | None = None  # None where the card is invalid (see status)


class Model:
    """A model folder: its validated card and its (verified) network."""

    def __init__(self, path: str | os.PathLike, card: ModelCard | None = None) -> None:
        self.path = Path(path)
        self.card = card or ModelCard.from_file(self.path / CARD_FILE)

    @property
    def weights_path(self) -> Path:
        return self.path / self.card.weights["file"]

    def verify(self) -> None:
        """Check the weights' size and sha256 against the card; ModelError says what differs."""
        weights = self.weights_path
        if not weights.exists():
            raise ModelError(
                f"Model '{self.card.id}' has no weights file ({weights}); fetch or import it again."
            )
        expected_size = self.card.weights["size"]
        actual_size = weights.stat().st_size
        if actual_size != expected_size:
            raise ModelError(
                f"Model '{self.card.id}': weights file is {actual_size} bytes but the card says "
                f"{expected_size}; the file is incomplete or was changed. Fetch it again."
            )
        actual_hash = sha256_of(weights)
        if actual_hash != self.card.weights["sha256"]:
            raise ModelError(
                f"Model '{self.card.id}': weights sha256 is {actual_hash[:12]}... but the card says "
                f"{self.card.weights['sha256'][:12]}...; the file was changed and will not be loaded."
            )

    def load_network(self, device: str | torch.device | None = None) -> torch.nn.Module:
        """The network in eval mode, weights verified first; float32 whatever the stored dtype."""
        self.verify()
        weight_format = self.card.weights_format
        if weight_format == "safetensors":
            network = self._load_safetensors()
        else:
            from deepmri.models.importers import load_imported_network

            network = load_imported_network(self)
        network = network.eval()
        if device is not None:
            network = network.to(device)
        return network

    def _load_safetensors(self) -> torch.nn.Module:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        architecture = self.card.architecture
        network = build_network(architecture["name"], architecture.get("config", {}))
        try:
            state = load_file(str(self.weights_path))
        except (SafetensorError, OSError) as error:
            raise ModelError(
                f"Model '{self.card.id}': cannot read its weights ({error})."
            ) from error
        state = {key: value.float() for key, value in state.items()}
        try:
            network.load_state_dict(state)
        except RuntimeError as error:
            first_line = str(error).splitlines()[0]
            raise ModelError(
                f"Model '{self.card.id}': weights do not fit the card's architecture ({first_line})."
            ) from error
        return network


class ModelStore:
    """Finds models in the bundled folder, the user's cache and extra paths (first found wins).

    Examples:
        >>> store = ModelStore()
        >>> [info.id for info in store.list()]  # doctest: +SKIP
        ['brain-extraction', 'brain-tissue']
    """

    def __init__(
        self, settings: Settings | None = None, extra_paths: tuple[str | os.PathLike, ...] = ()
    ) -> None:
        self.settings = settings or Settings.from_environment()
        self.roots: list[tuple[str, Path]] = [("bundled", BUNDLED_MODELS_DIR)]
        self.roots.append(("cache", self.settings.model_cache))
        for path in (*self.settings.extra_model_paths, *extra_paths):
            self.roots.append(("extra", Path(path)))

    @property
    def cache(self) -> Path:
        return self.settings.model_cache

    def _folders(self) -> list[tuple[str, Path]]:
        found = []
        for source, root in self.roots:
            if root.is_dir():
                found.extend(
                    (source, folder)
                    for folder in sorted(root.iterdir())
                    if (folder / CARD_FILE).is_file()
                )
        return found

    def list(self) -> list[ModelInfo]:
        """Every model found, valid or not, with a status a user can act on."""
        rows, seen = [], set()
        for source, folder in self._folders():
            try:
                card = ModelCard.from_file(folder / CARD_FILE)
            except CardError as error:
                rows.append(ModelInfo(folder.name, "?", "?", "?", source, folder, str(error)))
                continue
            if card.id in seen:
                continue
            seen.add(card.id)
            status = "ok" if (folder / card.weights["file"]).exists() else "weights missing"
            rows.append(
                ModelInfo(
                    card.id, card.version, card.task, card.license, source, folder, status, card
                )
            )
        return rows

    def get(self, model_id_or_path: str | os.PathLike) -> Model:
        """A model by id, or by the path of its folder."""
        candidate = Path(model_id_or_path)
        if (candidate / CARD_FILE).is_file():
            return Model(candidate)
        for _, folder in self._folders():
            if folder.name == str(model_id_or_path):
                return Model(folder)
        for _, folder in self._folders():
            try:
                if ModelCard.from_file(folder / CARD_FILE).id == str(model_id_or_path):
                    return Model(folder)
            except CardError:
                continue
        known = ", ".join(info.id for info in self.list()) or "none"
        raise ModelError(
            f"No model '{model_id_or_path}' is installed (installed: {known}). Use "
            "'deepmri models fetch URL' or 'deepmri models import' to add it."
        )

    def fetch(self, url: str, *, sha256: str | None = None, **options: Any) -> Model:
        """Download a model into the cache (see `deepmri.models.fetch.fetch_model`)."""
        from deepmri.models.fetch import fetch_model

        return fetch_model(url, self.cache, sha256=sha256, **options)

    def import_model(self, source: str | os.PathLike, card: Any = None, **options: Any) -> Model:
        """Copy an outside network into the cache (see `deepmri.models.importers.import_model`)."""
        from deepmri.models.importers import import_model

        return import_model(source, self.cache, card=card, **options)

    def remove(self, model_id: str) -> None:
        """Delete a model from the user's cache; bundled and extra folders are never touched."""
        import shutil

        model = self.get(model_id)
        cache = self.cache.resolve()
        if cache not in model.path.resolve().parents:
            raise ModelError(
                f"Model '{model_id}' is not in the user's cache ({model.path}); only cached "
                "models can be removed here."
            )
        shutil.rmtree(model.path)


def save_model(
    network: torch.nn.Module,
    card: ModelCard | dict[str, Any],
    folder: str | os.PathLike,
    dtype: str = "float16",
) -> Model:
    """Write `weights.safetensors` (fp16 by default) and `card.json` with sha256 and size filled.

    fp16 halves the file at no measurable cost for these networks (the card's metrics are measured
    on the fp16 weights as shipped); use dtype="float32" where it does cost.
    """
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data = card.to_dict() if isinstance(card, ModelCard) else dict(card)
    torch_dtype = {"float16": torch.float16, "float32": torch.float32, "bfloat16": torch.bfloat16}[
        dtype
    ]
    state = {
        key: (value.detach().to(torch_dtype) if value.is_floating_point() else value.detach())
        .contiguous()
        .cpu()
        for key, value in network.state_dict().items()
    }
    weights_path = folder / WEIGHTS_FILE
    partial = folder / (WEIGHTS_FILE + ".partial")
    save_file(state, str(partial))
    partial.replace(weights_path)
    data["weights"] = {
        **(data.get("weights") or {}),
        "file": WEIGHTS_FILE,
        "sha256": sha256_of(weights_path),
        "size": weights_path.stat().st_size,
        "dtype": dtype,
        "format": "safetensors",
    }
    validated = ModelCard.from_dict(data)
    validated.save(folder / CARD_FILE)
    return Model(folder, validated)

"""Where models live: the bundled folder, the user's cache and extra folders, first found wins.

The store finds `Model`s (deepmri.models.model) and adds to the cache by fetching (fetch) or
importing (importers); those modules never import the store, so there is no import cycle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepmri.errors import CardError, ModelError
from deepmri.models.card import CARD_FILE, ModelCard, sha256_of
from deepmri.models.fetch import fetch_model
from deepmri.models.importers import import_model
from deepmri.models.model import WEIGHTS_FILE, Model, save_model
from deepmri.settings import BUNDLED_MODELS_DIR, Settings

# Model, save_model, sha256_of and WEIGHTS_FILE were defined here; they stay importable from here.
__all__ = ["WEIGHTS_FILE", "Model", "ModelInfo", "ModelStore", "save_model", "sha256_of"]


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

    @property
    def task_text(self) -> str:
        """The task as listings show it (`ModelCard.task_text`; the bare task without a card)."""
        return self.card.task_text if self.card is not None else self.task


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
        return fetch_model(url, self.cache, sha256=sha256, **options)

    def import_model(self, source: str | os.PathLike, card: Any = None, **options: Any) -> Model:
        """Copy an outside network into the cache (see `deepmri.models.importers.import_model`)."""
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

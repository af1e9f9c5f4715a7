"""One model folder: its validated card, its verified weights and the network they build.

A `Model` is found by the store, made by `save_model` (training, import) or installed by fetch;
weights load only through safetensors (or the loaders of imported formats, `loaders`), after
their size and sha256 are checked against the card, so a tampered file is refused, never run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from deepmri.errors import ModelError
from deepmri.io import atomic_path
from deepmri.models.card import CARD_FILE, ModelCard, sha256_of
from deepmri.models.loaders import load_imported_network
from deepmri.nets import build_network

WEIGHTS_FILE = "weights.safetensors"


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
    with atomic_path(weights_path, ".safetensors") as partial:
        save_file(state, str(partial))
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

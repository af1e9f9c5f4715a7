"""Models: validated cards, the store that finds and verifies them, fetching and importing.

A model is a folder with `card.json` and its weights; see Docs/models.md for the card schema.
"""

from deepmri.models.card import (
    CARD_FILE,
    Label,
    ModelCard,
    example_card,
    measuring_commands,
    metric_comparison,
    sha256_of,
)
from deepmri.models.model import WEIGHTS_FILE, Model, save_model
from deepmri.models.store import ModelInfo, ModelStore

__all__ = [
    "CARD_FILE",
    "WEIGHTS_FILE",
    "Label",
    "Model",
    "ModelCard",
    "ModelInfo",
    "ModelStore",
    "example_card",
    "measuring_commands",
    "metric_comparison",
    "save_model",
    "sha256_of",
]

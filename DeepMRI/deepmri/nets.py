"""Networks built by name from a model card: MONAI's first, small hand-written ones where it has none.

A card says `{"architecture": {"name": "monai.UNet", "config": {...}}}`; `build_network` turns that
into a module. Later tasks register their architectures here with `register_architecture`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from deepmri.errors import CardError

_ARCHITECTURES: dict[str, Callable[..., torch.nn.Module]] = {}


def register_architecture(name: str, factory: Callable[..., torch.nn.Module]) -> None:
    """Make `name` buildable from a card; `factory(**config)` returns the network."""
    _ARCHITECTURES[name] = factory


def available_architectures() -> list[str]:
    _register_monai()
    return sorted(_ARCHITECTURES)


def build_network(architecture: str, config: dict[str, Any]) -> torch.nn.Module:
    """Build the network a card names, with its config as keyword arguments.

    Examples:
        >>> net = build_network("monai.UNet", {"spatial_dims": 3, "in_channels": 1,
        ...     "out_channels": 2, "channels": [4, 8], "strides": [2]})
        >>> type(net).__name__
        'UNet'
    """
    _register_monai()
    if architecture not in _ARCHITECTURES:
        raise CardError(
            f"card.json field 'architecture.name' is '{architecture}', which this version of "
            f"DeepMRI cannot build; known: {', '.join(sorted(_ARCHITECTURES))}."
        )
    try:
        return _ARCHITECTURES[architecture](**config)
    except TypeError as error:
        raise CardError(
            f"card.json field 'architecture.config' does not fit {architecture}: {error}"
        ) from error


def _register_monai() -> None:
    if _ARCHITECTURES.keys() >= {"monai.UNet", "monai.DynUNet", "monai.SegResNet"}:
        return
    from monai.networks import nets

    for name in (
        "UNet",
        "DynUNet",
        "SegResNet",
        "BasicUNet",
        "AttentionUnet",
        "UNETR",
        "SwinUNETR",
    ):
        factory = getattr(nets, name, None)
        if factory is not None:
            _ARCHITECTURES.setdefault(f"monai.{name}", factory)

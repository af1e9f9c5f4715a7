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


PRIOR_RESIDUAL_UNET = "deepmri.PriorResidualUNet"


class PriorResidualUNet(torch.nn.Module):
    """A MONAI UNet that adds a correction to a prior image given as one of its input channels.

    Output = input channel `prior_channel` + a zero-initialised 1x1x1 convolution of the UNet's
    `features` output channels, so the untrained network returns the prior exactly and training
    only has to learn what the prior misses (the residual idea of ControlNet's zero convolution).
    Used by synthesis with a per-tissue prior: the input's Gaussian-mixture tissue posteriors
    times each tissue's mean target intensity (`deepmri.tasks.synthesize.tissue_prior`).

    Examples:
        >>> net = PriorResidualUNet(in_channels=2, channels=[4, 8], strides=[2])
        >>> x = torch.rand(1, 2, 16, 16, 16)
        >>> bool(torch.equal(net(x), x[:, 1:2]))
        True
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 2,
        features: int = 8,
        channels: list[int] | tuple[int, ...] = (8, 16, 32, 64),
        strides: list[int] | tuple[int, ...] = (2, 2, 2),
        num_res_units: int = 1,
        norm: str = "instance",
        prior_channel: int = 1,
    ) -> None:
        super().__init__()
        from monai.networks.nets import UNet

        self.prior_channel = prior_channel
        self.unet = UNet(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=features,
            channels=list(channels),
            strides=list(strides),
            num_res_units=num_res_units,
            norm=norm,
        )
        convolution = torch.nn.Conv3d if spatial_dims == 3 else torch.nn.Conv2d
        self.head = convolution(features, 1, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        prior = inputs[:, self.prior_channel : self.prior_channel + 1]
        return prior + self.head(self.unet(inputs))


register_architecture(PRIOR_RESIDUAL_UNET, PriorResidualUNet)

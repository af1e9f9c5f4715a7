"""Image similarity for deformable registration: LNCC for one contrast, MIND-SSC across contrasts.

Both are torch functions of (batch, channel, D, H, W) tensors, differentiable in the moving image,
so the same code runs on the CPU and a GPU.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

SIMILARITIES = ("lncc", "mind")

# The six face neighbours of a voxel, as offsets; MIND-SSC compares the 12 pairs of them that are
# sqrt(2) apart (the self-similarity context), which avoids using the centre voxel itself.
_SIX = ((0, 0, 1), (0, 1, 0), (1, 0, 0), (0, 0, -1), (0, -1, 0), (-1, 0, 0))
_PAIRS = tuple(
    (a, b)
    for a, b in itertools.combinations(range(6), 2)
    if sum((x - y) ** 2 for x, y in zip(_SIX[a], _SIX[b], strict=True)) == 2
)


def _shifted(padded: torch.Tensor, offset: tuple[int, ...], pad: int, shape) -> torch.Tensor:
    slices = tuple(slice(pad + o, pad + o + size) for o, size in zip(offset, shape, strict=True))
    return padded[(..., *slices)]


def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors (Heinrich et al. 2013): 12 channels per voxel, contrast-invariant.

    Each channel is exp(-D / V): D a patch distance (box of side 2*radius+1) between two
    neighbours `dilation` voxels from the centre, V the local mean of D (its noise level).

    Examples:
        >>> mind_ssc(torch.rand(1, 1, 16, 16, 16)).shape
        torch.Size([1, 12, 16, 16, 16])
    """
    shape = image.shape[2:]
    pad = dilation
    padded = F.pad(image, (pad,) * 6, mode="replicate")
    squared = []
    for a, b in _PAIRS:
        offset_a = tuple(dilation * value for value in _SIX[a])
        offset_b = tuple(dilation * value for value in _SIX[b])
        difference = _shifted(padded, offset_a, pad, shape) - _shifted(padded, offset_b, pad, shape)
        squared.append(difference * difference)
    distance = torch.cat(squared, dim=1)
    distance = F.avg_pool3d(
        F.pad(distance, (radius,) * 6, mode="replicate"), 2 * radius + 1, stride=1
    )
    distance = distance - distance.min(dim=1, keepdim=True).values
    variance = distance.mean(dim=1, keepdim=True)
    mean_variance = variance.mean()
    variance = variance.clamp(mean_variance * 1e-3, mean_variance * 1e3)
    return torch.exp(-distance / variance)


class LNCC(torch.nn.Module):
    """Local normalised cross-correlation as a loss (MONAI's), -1 for a perfect match."""

    def __init__(self, kernel_size: int = 7) -> None:
        super().__init__()
        from monai.losses import LocalNormalizedCrossCorrelationLoss

        self.loss = LocalNormalizedCrossCorrelationLoss(
            spatial_dims=3, kernel_size=kernel_size, kernel_type="rectangular"
        )

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return self.loss(warped, fixed)


class MINDLoss(torch.nn.Module):
    """Mean squared difference of MIND-SSC descriptors (warped moving descriptors vs fixed)."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(warped, fixed)

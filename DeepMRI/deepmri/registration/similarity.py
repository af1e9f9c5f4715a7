"""Image similarity for deformable registration: LNCC for one contrast; across contrasts a map of
the moving intensities onto the fixed ones (then LNCC), or MIND-SSC.

All are torch functions of (batch, channel, D, H, W) tensors, so the same code runs on the CPU
and a GPU; the losses are differentiable in the moving image.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

SIMILARITIES = ("lncc", "mind", "mapped")

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


def box_mean(values: torch.Tensor, size: int) -> torch.Tensor:
    """Mean over a cube of side `size` around each voxel (edges replicated), by running sums.

    Separable cumulative sums cost a few additions per voxel whatever the size: cheaper than a
    convolution, forwards and backwards, on the CPU.
    """
    half = size // 2
    for dim in (2, 3, 4):
        padding = [0] * 6
        padding[2 * (4 - dim)] = half + 1
        padding[2 * (4 - dim) + 1] = half
        running = F.pad(values, padding, mode="replicate").cumsum(dim)
        length = values.shape[dim]
        values = (running.narrow(dim, size, length) - running.narrow(dim, 0, length)) / size
    return values


class LNCC(torch.nn.Module):
    """Squared local normalised cross-correlation as a loss, -1 for a perfect match.

    The square (as in ANTs' CC and MONAI's LNCC loss) makes it blind to the sign of the local
    correlation: a locally inverted contrast matches as well as the same one. The fixed image's
    local means and variances are computed once, on the first call. Variances are floored at
    `eps`, as in MONAI's `LocalNormalizedCrossCorrelationLoss`, whose value this reproduces.
    """

    def __init__(self, kernel_size: int = 7, eps: float = 1e-5) -> None:
        super().__init__()
        self.kernel_size, self.eps = kernel_size, eps
        self._fixed: tuple | None = None

    def _fixed_statistics(self, fixed: torch.Tensor) -> tuple:
        if self._fixed is None or self._fixed[0] is not fixed:
            mean = box_mean(fixed, self.kernel_size)
            variance = box_mean(fixed * fixed, self.kernel_size) - mean * mean
            variance = variance.clamp_min(self.eps)
            self._fixed = (fixed, mean, variance)
        return self._fixed[1:]

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        fixed_mean, fixed_variance = self._fixed_statistics(fixed)
        moments = box_mean(
            torch.cat([warped, warped * warped, warped * fixed], 1), self.kernel_size
        )
        mean, square, product = moments.unbind(1)
        cross = product - mean * fixed_mean[:, 0]
        variance = (square - mean * mean).clamp_min(self.eps)
        correlation = cross * cross / (variance * fixed_variance[:, 0])
        return -correlation.mean()


class MINDLoss(torch.nn.Module):
    """Mean squared difference of MIND-SSC descriptors (warped moving descriptors vs fixed)."""

    def forward(self, warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(warped, fixed)


def intensity_mapping(
    moving: torch.Tensor, fixed: torch.Tensor, bins: int = 48, prior: float = 20.0
) -> torch.Tensor:
    """The mean fixed intensity for each moving intensity bin: a lookup table over [0, 1.5].

    Two images of one anatomy in different contrasts are close to a function of each other
    tissue by tissue; its conditional mean (the correlation ratio's regression) maps the moving
    contrast onto the fixed one, after which one-contrast LNCC applies. Bins with few voxels lean
    towards the global mean (`prior` pseudo-voxels), so rare intensities do not map to noise.
    """
    index = (moving.detach().flatten() / 1.5 * (bins - 1)).round().long().clamp(0, bins - 1)
    values = fixed.detach().flatten()
    counts = torch.bincount(index, minlength=bins).to(values.dtype)
    sums = torch.bincount(index, weights=values, minlength=bins)
    return (sums + prior * values.mean()) / (counts + prior)


def apply_mapping(moving: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """`moving` through the lookup table of `intensity_mapping`, linear between bin centres."""
    position = (moving / 1.5 * (len(table) - 1)).clamp(0, len(table) - 1)
    lower = position.floor().long().clamp(max=len(table) - 2)
    fraction = position - lower
    return table[lower] * (1 - fraction) + table[lower + 1] * fraction

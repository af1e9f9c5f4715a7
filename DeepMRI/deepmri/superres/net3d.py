"""The pretrained thick-to-thin 3D network: a small residual CNN on the cubic-upsampled volume.

Arrays here are (thick, a, b): the through-plane axis first, in voxels of the working grid (the
thick axis resampled to the in-plane spacing), so one network serves 1 mm and 0.5 mm inputs. Its
input channels are the cubic-upsampled image and four known facts of the acquisition at each
voxel: the slice spacing and the slice thickness (in working voxels, divided by
`CONDITION_SCALE`) and the voxel's position between two slice centres (cosine and sine of its
phase); networks trained with `profile` conditioning (`PROFILE_INPUT_CHANNELS`) also see the
profile's shape (0 Gaussian, 1 rect), without which a rect 3 mm slice and a Gaussian of FWHM 3 mm
look alike to it. The network predicts what cubic interpolation missed (a residual).

Examples:
    >>> net = ThickSliceNet3d(width=8, depth=4)
    >>> channels = condition_channels(24, spacing=4.0, thickness=4.0, first_centre=1.5)
    >>> channels.shape
    (4, 24)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from deepmri.nets import register_architecture
from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress
from deepmri.superres.profile import SliceProfile, cubic_matrix, degradation_matrix

ARCHITECTURE = "deepmri.ThickSliceNet3d"
CONDITION_SCALE = 6.0
INPUT_CHANNELS = 5
PROFILE_INPUT_CHANNELS = 6  # INPUT_CHANNELS and the profile shape
PROFILE_FLAGS = {"gaussian": 0.0, "rect": 1.0}


class ThickSliceNet3d(nn.Module):
    """Conv-ReLU layers (3x3x3, two of them dilated 2x along the thick axis) and a residual.

    A fully convolutional regressor this small has no MONAI counterpart (its networks are
    encoder-decoders); `monai.networks.blocks.Convolution` would only wrap the same Conv3d.
    Receptive field: 2 * depth + 5 voxels along the thick axis, 2 * depth + 1 across it.
    """

    def __init__(self, width: int = 16, depth: int = 7, in_channels: int = INPUT_CHANNELS) -> None:
        super().__init__()
        if depth < 4:
            raise ValueError("ThickSliceNet3d needs at least 4 layers")
        dilated = {depth // 2 - 1, depth // 2}
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(depth - 1):
            step = 2 if index in dilated else 1
            conv = nn.Conv3d(channels, width, 3, padding=(step, 1, 1), dilation=(step, 1, 1))
            # He initialisation: PyTorch's default shrinks the signal about 1.7x per ReLU layer,
            # and with it the gradients (no validation gain after 200 steps with it).
            nn.init.kaiming_normal_(conv.weight, nonlinearity="relu")
            nn.init.zeros_(conv.bias)
            layers += [conv, nn.ReLU(inplace=True)]
            channels = width
        last = nn.Conv3d(width, 1, 3, padding=1)
        nn.init.zeros_(last.weight)  # starts as the cubic interpolation itself
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.body = nn.Sequential(*layers)
        self.in_channels = in_channels
        self.halo = depth + 2  # voxels of context each side a chunk needs (thick axis: +2)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs[:, :1] + self.body(inputs)


register_architecture(ARCHITECTURE, ThickSliceNet3d)


def condition_channels(
    count: int,
    spacing: float,
    thickness: float,
    first_centre: float,
    shape: str | None = None,
) -> np.ndarray:
    """The conditioning channels along the thick axis: (4, count), or (5, count) with `shape`.

    `spacing`, `thickness` and `first_centre` (a slice centre's position, with voxel v centred at
    v + 0.5) are in working voxels; `shape` ("gaussian" or "rect") adds the profile flag that
    networks with `PROFILE_INPUT_CHANNELS` inputs expect.
    """
    position = np.arange(count) + 0.5
    phase = 2.0 * math.pi * (position - first_centre) / spacing
    rows = [
        np.full(count, spacing / CONDITION_SCALE),
        np.full(count, thickness / CONDITION_SCALE),
        np.cos(phase),
        np.sin(phase),
    ]
    if shape is not None:
        rows.append(np.full(count, PROFILE_FLAGS[shape]))
    return np.stack(rows).astype(np.float32)


def widen_inputs(state: dict[str, torch.Tensor], in_channels: int) -> dict[str, torch.Tensor]:
    """A ThickSliceNet3d state dict with zero weights for the input channels it did not have.

    The widened network computes exactly what the original did whatever the new channels hold,
    so training from it starts where the original stopped.
    """
    first = state["body.0.weight"]
    missing = in_channels - first.shape[1]
    if missing < 0:
        raise ValueError(f"the weights have {first.shape[1]} inputs, more than {in_channels}")
    zeros = first.new_zeros((first.shape[0], missing, *first.shape[2:]))
    return {**state, "body.0.weight": torch.cat([first, zeros], dim=1)}


def acquired_input(
    truth: np.ndarray,
    spacing: float,
    thickness: float,
    shape: str,
    first_centre: float,
    window: slice,
    with_shape: bool,
    noise: float = 0.0,
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The network input for `truth` (thick axis first) acquired thick, then cubic back, in `window`.

    The forward model of training and of per-volume fine-tuning alike: slices of `shape` profile
    every `spacing` voxels from `first_centre`, Rician noise of `noise` (drawn from `rng`), cubic
    B-spline back onto the voxels, the conditioning channels (the shape flag if `with_shape`).
    """
    if noise > 0 and rng is None:
        raise ValueError("acquired_input: noise needs the generator to draw it from (rng)")
    length = truth.shape[0]
    centres = first_centre + np.arange(int(length // spacing) + 1) * spacing
    centres = centres[centres < length]
    profile = SliceProfile(thickness, spacing, shape)
    thick = np.tensordot(degradation_matrix(length, 1.0, profile, centres), truth, axes=(1, 0))
    if noise > 0:
        draws = rng.normal(scale=noise, size=(2, *thick.shape))
        thick = np.sqrt((thick + draws[0]) ** 2 + draws[1] ** 2)
    positions = np.arange(length) + 0.5
    cubic = np.tensordot(cubic_matrix(centres, spacing, positions), thick, axes=(1, 0))
    channels = condition_channels(
        length, spacing, thickness, centres[0], shape if with_shape else None
    )
    return network_input(cubic[window].astype(np.float32), channels[:, window])


def network_input(volume: np.ndarray, channels: np.ndarray) -> np.ndarray:
    """(1 + conditions, thick, a, b): the volume (thick axis first), the conditioning broadcast."""
    shape = volume.shape
    condition = np.broadcast_to(channels[:, :, None, None], (channels.shape[0], *shape))
    return np.concatenate([volume[None].astype(np.float32), condition], axis=0)


def apply_network(
    network: nn.Module,
    volume: np.ndarray,
    channels: np.ndarray,
    device: torch.device,
    flips: Sequence[tuple[int, ...]] = ((),),
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
    chunk_voxels: int = 1_500_000,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the network over `volume` (thick axis first) in slabs along the last axis.

    The network should be in channels-last 3D layout on a CPU (a third faster there; see
    `deepmri.superres.restore`). Each slab carries `network.halo` voxels of context either side, so the result does not depend
    on the slab size. `flips` are sets of in-plane array axes (1, 2) flipped for a pass; the
    result is the mean over the passes and their spread (standard deviation; zero for one).
    """
    halo = int(getattr(network, "halo", 9))
    thick, rows, cols = volume.shape
    width = max(1, min(cols, chunk_voxels // max(1, thick * rows)))
    mean = np.zeros(volume.shape, dtype=np.float64)
    square = np.zeros_like(mean)
    passes = list(flips) or [()]
    work = len(passes) * math.ceil(cols / width)
    done = 0
    for flip in passes:
        source = np.flip(volume, axis=flip) if flip else volume
        output = np.empty(volume.shape, dtype=np.float32)
        for first in range(0, cols, width):
            check_cancel(cancel)
            last = min(cols, first + width)
            low, high = max(0, first - halo), min(cols, last + halo)
            part = network_input(np.ascontiguousarray(source[:, :, low:high]), channels)
            with torch.no_grad():
                tensor = torch.from_numpy(part)[None].to(device)
                result = network(tensor.to(memory_format=torch.channels_last_3d))
            output[:, :, first:last] = result[0, 0, :, :, first - low : last - low].cpu().numpy()
            done += 1
            progress(done / work, f"Applying the pretrained network: part {done}/{work}")
        restored = np.flip(output, axis=flip) if flip else output
        mean += restored
        square += restored.astype(np.float64) ** 2
    mean /= len(passes)
    spread = np.sqrt(np.maximum(square / len(passes) - mean**2, 0.0))
    return mean.astype(np.float32), spread.astype(np.float32)

"""Self-supervised per-volume super-resolution in the spirit of SMORE (Zhao et al., 2020).

The volume's own in-plane data are put through the through-plane acquisition (slice profile,
downsampling, cubic interpolation back) along one in-plane axis; a small 2D residual CNN learns to
undo that, and is then run on through-plane slices of the cubic-upsampled volume in the two
orthogonal orientations, whose outputs are averaged. Their spread is the uncertainty.
Arrays here are (k, j, i); `thick` is the array axis of the slices' normal.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress
from deepmri.superres.profile import SliceProfile, apply_along, degrade_and_upsample_matrix
from deepmri.superres.settings import SSLSettings


class ResidualSRNet(nn.Module):
    """A plain 2D residual CNN (VDSR-like): conv-ReLU layers that predict the missing detail.

    MONAI has no 2D network of this shape (a small fully convolutional residual regressor), and
    this one is five lines.
    """

    def __init__(self, width: int = 32, depth: int = 6) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1), nn.ReLU(inplace=True)]
        for _ in range(depth - 2):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.ReLU(inplace=True)]
        layers.append(nn.Conv2d(width, 1, 3, padding=1))
        self.body = nn.Sequential(*layers)
        self.depth = depth

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image + self.body(image)


@dataclass
class SliceStack:
    """Training pairs as 2D slices whose rows run along the degraded axis: (n, rows, cols)."""

    inputs: np.ndarray
    targets: np.ndarray
    centres: np.ndarray  # (m, 3) foreground voxel indices to centre patches on


def training_stacks(
    volume: np.ndarray,
    thick: int,
    spacing: tuple[float, float, float],
    profile: SliceProfile,
    foreground: float,
) -> list[SliceStack]:
    """For each in-plane axis: the volume acquired along it like the slices were, and the truth.

    `spacing` is per array axis (k, j, i). The rows of each stack run along that in-plane axis,
    the columns along the other one, as the thick axis and an in-plane axis do at inference.
    """
    in_plane = [axis for axis in range(3) if axis != thick]
    stacks = []
    for degraded, other in (in_plane, in_plane[::-1]):
        matrix = degrade_and_upsample_matrix(volume.shape[degraded], spacing[degraded], profile)
        blurred = apply_along(volume, matrix, degraded)
        order = (thick, degraded, other)
        inputs = np.ascontiguousarray(np.transpose(blurred, order))
        targets = np.ascontiguousarray(np.transpose(volume, order))
        centres = np.argwhere(targets > foreground)
        stacks.append(SliceStack(inputs, targets, centres))
    return stacks


class PatchSampler:
    """Random foreground patches from the stacks, with random flips (the profile is symmetric)."""

    def __init__(self, stacks: list[SliceStack], patch: int, seed: int) -> None:
        self.stacks = [stack for stack in stacks if len(stack.centres)]
        self.rng = np.random.default_rng(seed)
        shape = self.stacks[0].inputs.shape
        self.patch = (min(patch, shape[1]), min(patch, shape[2]))

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        inputs, targets = [], []
        rows, cols = self.patch
        for _ in range(size):
            stack = self.stacks[self.rng.integers(len(self.stacks))]
            n, height, width = stack.inputs.shape
            slice_index, row, col = stack.centres[self.rng.integers(len(stack.centres))]
            top = int(np.clip(row - rows // 2, 0, height - rows))
            left = int(np.clip(col - cols // 2, 0, width - cols))
            window = (slice_index, slice(top, top + rows), slice(left, left + cols))
            source, truth = stack.inputs[window], stack.targets[window]
            if self.rng.random() < 0.5:
                source, truth = source[::-1], truth[::-1]
            if self.rng.random() < 0.5:
                source, truth = source[:, ::-1], truth[:, ::-1]
            inputs.append(source.copy())
            targets.append(truth.copy())
        return (
            torch.from_numpy(np.stack(inputs)[:, None]),
            torch.from_numpy(np.stack(targets)[:, None]),
        )


_CALIBRATION_STEPS = 5


def _learning_rate(base: float, step: int, total: int) -> float:
    """Cosine decay to a tenth of `base` over `total` steps."""
    return base * (0.1 + 0.45 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1))))


def train_network(
    sampler: PatchSampler,
    settings: SSLSettings,
    device: torch.device,
    train_seconds: float,
    apply_seconds: float = 0.0,
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
) -> tuple[ResidualSRNet, dict[str, float]]:
    """Train on the sampler's pairs for `settings.iterations` steps, or as many as fit in time.

    After the first few steps it says how long the rest will take (with `apply_seconds`, the
    estimated time of applying the network afterwards).

    Returns the network (in eval mode) and what was done: steps, seconds, last losses.
    """
    torch.manual_seed(settings.seed)
    network = ResidualSRNet(settings.width, settings.depth).to(device)
    optimiser = torch.optim.Adam(network.parameters(), lr=settings.learning_rate)
    loss_function = nn.L1Loss()
    planned = settings.iterations or settings.max_iterations
    losses: list[float] = []
    start = time.monotonic()
    step = 0
    while step < planned:
        check_cancel(cancel)
        for group in optimiser.param_groups:
            group["lr"] = _learning_rate(settings.learning_rate, step, planned)
        inputs, targets = sampler.batch(settings.batch)
        inputs, targets = inputs.to(device), targets.to(device)
        loss = loss_function(network(inputs), targets)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        step += 1
        elapsed = time.monotonic() - start
        if step == _CALIBRATION_STEPS:
            per_step = elapsed / step
            if settings.iterations is None:
                planned = int(
                    np.clip(
                        train_seconds / per_step, settings.min_iterations, settings.max_iterations
                    )
                )
                planned = max(planned, step)
            left = per_step * (planned - step) + apply_seconds
            progress(
                step / planned,
                f"Super-resolution will take about {left:.0f} s more: {planned} training steps "
                f"of {per_step:.2f} s, then about {apply_seconds:.0f} s applying",
            )
        if step % max(1, planned // 50) == 0 or step == planned:
            left = elapsed / step * (planned - step)
            progress(
                step / planned,
                f"Training on the volume's own in-plane detail: step {step}/{planned} "
                f"(about {left:.0f} s left)",
            )
    network.eval()
    tail = losses[-max(1, len(losses) // 10) :]
    return network, {
        "steps": float(step),
        "train_seconds": time.monotonic() - start,
        "final_loss": float(np.mean(tail)),
        "first_loss": float(np.mean(losses[: max(1, len(losses) // 10)])),
    }


def _passes(thick: int, flips: bool) -> list[tuple[tuple[int, int, int], bool]]:
    """(axis order putting slices first and thick axis on rows, flip columns) for each pass."""
    in_plane = [axis for axis in range(3) if axis != thick]
    orders = [(in_plane[1], thick, in_plane[0]), (in_plane[0], thick, in_plane[1])]
    return [(order, flip) for order in orders for flip in ((False, True) if flips else (False,))]


def _chunk_size(rows: int, cols: int, network: nn.Module, device: torch.device) -> int:
    """Slices per forward pass: about a GMAC of work on a CPU, so cancel is checked every
    fraction of a second; more on a GPU."""
    convolutions = [layer for layer in network.modules() if isinstance(layer, nn.Conv2d)]
    per_pixel = sum(layer.weight.numel() for layer in convolutions)
    work = 2e10 if device.type == "cuda" else 1e9
    return max(1, int(work // max(1, per_pixel * rows * cols)))


def estimate_apply_seconds(
    network: nn.Module, shape: tuple[int, int, int], thick: int, flips: bool, device: torch.device
) -> float:
    """Time one chunk of through-plane slices and scale to every pass over `shape`."""
    seconds = 0.0
    for order, _ in _passes(thick, flips)[:1]:
        rows, cols = shape[order[1]], shape[order[2]]
        chunk = min(_chunk_size(rows, cols, network, device), shape[order[0]])
        sample = torch.zeros((chunk, 1, rows, cols), device=device)
        with torch.no_grad():
            start = time.monotonic()
            network(sample)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            seconds = (time.monotonic() - start) / chunk
    return seconds * sum(shape[order[0]] for order, _ in _passes(thick, flips))


def apply_through_plane(
    network: nn.Module,
    volume: np.ndarray,
    thick: int,
    device: torch.device,
    flips: bool = False,
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run the network on every through-plane slice in both orientations; mean and spread.

    `volume` is the cubic-upsampled (near-isotropic) volume. The spread is the standard deviation
    over the passes (half their difference for two).
    """
    passes = _passes(thick, flips)
    mean = np.zeros(volume.shape, dtype=np.float64)
    square = np.zeros_like(mean)
    done = 0
    work = sum(volume.shape[order[0]] for order, _ in passes)
    for order, flip in passes:
        stack = np.transpose(volume, order)
        output = np.empty_like(stack)
        chunk = _chunk_size(stack.shape[1], stack.shape[2], network, device)
        for first in range(0, stack.shape[0], chunk):
            check_cancel(cancel)
            part = torch.from_numpy(np.ascontiguousarray(stack[first : first + chunk]))[:, None]
            part = part.to(device)
            if flip:
                part = torch.flip(part, dims=(-1,))
            with torch.no_grad():
                result = network(part)
            if flip:
                result = torch.flip(result, dims=(-1,))
            output[first : first + chunk] = result[:, 0].cpu().numpy()
            done += part.shape[0]
            progress(done / work, f"Applying through-plane: {done}/{work} slices")
        restored = np.transpose(output, np.argsort(order)).astype(np.float64)
        mean += restored
        square += restored**2
    total = len(passes)
    mean /= total
    spread = np.sqrt(np.maximum(square / total - mean**2, 0.0))
    return mean.astype(np.float32), spread.astype(np.float32)

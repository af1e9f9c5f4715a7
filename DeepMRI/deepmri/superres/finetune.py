"""Per-volume fine-tuning of the pretrained 3D network on the volume's own in-plane detail.

The pretrained method can start the self-supervised training (SMORE-style) instead of running as
shipped: each step takes 3D blocks of the volume (on the working grid, thick axis first),
acquires one of the two in-plane axes as the thick axis was acquired (the same slice profile,
spacing and thickness in working voxels, a random slice phase), interpolates it back by cubic
B-spline, and teaches the network to undo that, with the degraded axis first as in its training.
A few dozen steps at a small learning rate adapt it to the volume's contrast and profile.

Examples:
    >>> tuned, report = finetune_network(network, working, spacing=4.0, thickness=3.0,
    ...     shape="rect", steps=50)  # doctest: +SKIP
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress
from deepmri.superres.net3d import PROFILE_INPUT_CHANNELS, acquired_input


@dataclass(frozen=True)
class FinetuneSettings:
    """How the per-volume fine-tuning runs (seeded: the same steps give the same network)."""

    steps: int = 60
    learning_rate: float = 5e-5  # a tenth of a fresh run's peak: adapt, do not relearn
    batch: int = 2
    patch: tuple[int, int, int] = (40, 32, 32)  # degraded axis first
    border: int = 4
    foreground: float = 0.1  # block centres where the normalised volume is above this
    seed: int = 0


def _blocks(
    volume: np.ndarray,
    settings: FinetuneSettings,
    spacing: float,
    thickness: float,
    shape: str,
    with_shape: bool,
    rng: np.random.Generator,
    centres: list[np.ndarray],
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of (network input, truth): an in-plane axis acquired thick, then cubic back."""
    depth, rows, cols = settings.patch
    margin = int(math.ceil(2.5 * spacing)) + 2
    length = depth + 2 * margin
    inputs, truths = [], []
    for _ in range(settings.batch):
        axis = int(rng.integers(1, 3))  # the in-plane axis made thick this time
        view = np.moveaxis(volume, axis, 0)  # (degraded, thick, other)
        block_shape = (length, rows, cols)
        candidates = centres[axis - 1]
        middle = (
            candidates[rng.integers(len(candidates))]
            if len(candidates)
            else np.array(view.shape) // 2
        )
        start = [
            int(np.clip(int(point) - want // 2, 0, max(size - want, 0)))
            for size, want, point in zip(view.shape, block_shape, middle, strict=True)
        ]
        block = view[
            start[0] : start[0] + length, start[1] : start[1] + rows, start[2] : start[2] + cols
        ].astype(np.float64)
        if block.shape != block_shape:  # a small volume: pad by reflection to the block size
            pad = [(0, want - size) for size, want in zip(block.shape, block_shape, strict=True)]
            block = np.pad(block, pad, mode="reflect")
        first = float(rng.random()) * spacing
        window = slice(margin, margin + depth)
        inputs.append(acquired_input(block, spacing, thickness, shape, first, window, with_shape))
        truths.append(block[window].astype(np.float32))
    return torch.from_numpy(np.stack(inputs)), torch.from_numpy(np.stack(truths)[:, None])


def finetune_network(
    network: torch.nn.Module,
    volume: np.ndarray,
    *,
    spacing: float,
    thickness: float,
    shape: str = "gaussian",
    settings: FinetuneSettings | None = None,
    device: Any = "cpu",
    progress: ProgressCallback = no_progress,
    cancel: CancelLike | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A copy of `network` fine-tuned on `volume` (normalised, working grid, thick axis first).

    `spacing` and `thickness` are the acquisition's, in working voxels. The original network is
    left as it was. Returns the tuned copy (in eval mode) and what the training did.
    """
    settings = settings or FinetuneSettings()
    torch.manual_seed(settings.seed)
    rng = np.random.default_rng(settings.seed)
    tuned = copy.deepcopy(network).to(device).train()
    with_shape = getattr(network, "in_channels", 0) == PROFILE_INPUT_CHANNELS
    optimiser = torch.optim.Adam(tuned.parameters(), lr=settings.learning_rate)
    # block centres inside the head, per degraded axis (the same points, axes moved)
    points = np.argwhere(volume > settings.foreground)
    points = points[:: max(1, len(points) // 20_000)]
    centres = [points[:, [1, 0, 2]], points[:, [2, 0, 1]]]
    border = settings.border
    losses: list[float] = []
    for step in range(settings.steps):
        check_cancel(cancel)
        inputs, truths = _blocks(
            volume, settings, spacing, thickness, shape, with_shape, rng, centres
        )
        inputs, truths = inputs.to(device), truths.to(device)
        if inputs.device.type == "cpu":
            inputs = inputs.to(memory_format=torch.channels_last_3d)
        output = tuned(inputs)
        inner = (..., slice(border, -border), slice(border, -border), slice(border, -border))
        loss = torch.nn.functional.mse_loss(output[inner], truths[inner])
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
        progress(
            (step + 1) / settings.steps,
            f"Fine-tuning the pretrained network on this volume: step {step + 1}/{settings.steps}",
        )
    report = {
        "finetune_steps": settings.steps,
        "finetune_loss_first": round(float(np.mean(losses[:5])), 6) if losses else None,
        "finetune_loss_last": round(float(np.mean(losses[-5:])), 6) if losses else None,
        "finetune_learning_rate": settings.learning_rate,
    }
    return tuned.eval(), report

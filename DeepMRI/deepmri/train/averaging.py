"""The moving average of a network's weights that the trainers validate, keep and export.

One checkpoint of a noisy run stands for one step of it; an exponential moving average of the
weights (`torch.optim.swa_utils.AveragedModel`) stands for roughly the last 1 / (1 - decay) steps,
so the validation that picks "best" weights ranks something steadier. Both trainers that average
(segmentation's `--ema`, super-resolution's `--ema`) build it here, so the average, its checkpoint
form and its resume are one thing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.optim.swa_utils import AveragedModel

from deepmri.errors import DeepMRIError

# The key of the average's state (AveragedModel.state_dict(): the network's keys prefixed
# "module.", and "n_averaged") in a trainer's checkpoint.
CHECKPOINT_KEY = "averaged"


def weight_average(
    network: torch.nn.Module,
    decay: float,
    saved: dict[str, Any] | None = None,
    warm_up: bool = False,
) -> AveragedModel | None:
    """The exponential moving average of `network`'s weights and buffers, or None when `decay` is 0.

    Restored from `saved` (a checkpoint's contents) when it holds one; otherwise the average starts
    at the network's present weights (the first update copies them), so a warm start is averaged
    from where it began. `warm_up` eases the decay in as min(decay, n / (9 + n)) after n updates,
    the usual schedule for a run from scratch, whose random start should not linger in the average.
    """
    if not decay:
        return None
    if not 0.0 < decay < 1.0:
        raise DeepMRIError(f"The weight average's decay must lie in (0, 1), not {decay}.")
    averaged = AveragedModel(network, multi_avg_fn=_exponential(decay, warm_up), use_buffers=True)
    if saved is not None and CHECKPOINT_KEY in saved:
        averaged.load_state_dict(saved[CHECKPOINT_KEY])
    else:
        averaged.update_parameters(network)
    return averaged


def _exponential(decay: float, warm_up: bool):
    """AveragedModel's multi_avg_fn: average <- average + (1 - d) (current - average), in place."""

    @torch.no_grad()
    def update(averages: list[torch.Tensor], currents: list[torch.Tensor], updates) -> None:
        n = float(updates)
        step = decay if not warm_up else min(decay, n / (9.0 + n))
        for average, current in zip(averages, currents, strict=True):
            if average.is_floating_point():
                average.lerp_(current, 1.0 - step)
            else:  # an integer buffer (a counter) cannot be averaged: it follows the network
                average.copy_(current)

    return update

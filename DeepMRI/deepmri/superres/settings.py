"""What a super-resolution run may be asked for: methods, named budgets and network settings.

Torch-free, so the task's declaration (read by the CLI at start-up and by Slicer before PyTorch
may be installed) costs nothing to import.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

METHODS = ("ssl", "pretrained", "cubic", "sinc")

# The model the "pretrained" method loads from the model store (deepmri.train.superresolve makes it).
PRETRAINED_MODEL = "thick-to-thin-3d"


@dataclass(frozen=True)
class SSLSettings:
    """Network size, training budget and passes. `iterations` fixes the step count (reproducible);
    otherwise steps are chosen from `budget_seconds` after timing the first few on this machine."""

    width: int = 32
    depth: int = 6
    patch: int = 48
    batch: int = 16
    learning_rate: float = 2e-3
    budget_seconds: float = 60.0
    iterations: int | None = None
    min_iterations: int = 40
    max_iterations: int = 6000
    flips: bool = False
    seed: int = 0


# What the named budgets mean on any device: seconds in all, network, test-time flips.
BUDGETS: dict[str, SSLSettings] = {
    "quick": SSLSettings(width=16, depth=5, patch=32, batch=8, budget_seconds=60.0),
    "standard": SSLSettings(width=32, depth=6, budget_seconds=180.0),
    "best": SSLSettings(width=48, depth=8, budget_seconds=900.0, flips=True),
}


def settings_for_budget(budget: str | float) -> SSLSettings:
    """'quick', 'standard', 'best', or a number of seconds (the 'quick' network, scaled up)."""
    if isinstance(budget, str) and budget in BUDGETS:
        return BUDGETS[budget]
    seconds = float(budget)
    base = BUDGETS["quick"] if seconds < 150 else BUDGETS["standard"]
    return replace(base, budget_seconds=seconds)

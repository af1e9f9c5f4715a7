"""Super-resolution of thick-slice MRI: self-supervised per volume (SMORE-like) and interpolation baselines.

Examples:
    >>> from deepmri.superres import superresolve
    >>> result = superresolve(thick_t1, factor=4, method="ssl", budget="quick")  # doctest: +SKIP
"""

import importlib
from typing import Any

from deepmri.superres.grid import AlreadyIsotropicError, Grid, output_grid, thick_axis
from deepmri.superres.profile import SliceProfile
from deepmri.superres.settings import BUDGETS, METHODS, SSLSettings

# The method itself needs torch: imported on first use, so that declaring the task stays cheap.
_LAZY = {"SuperResolution": "deepmri.superres.restore", "superresolve": "deepmri.superres.restore"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'deepmri.superres' has no attribute '{name}'")


__all__ = [
    "BUDGETS",
    "METHODS",
    "AlreadyIsotropicError",
    "Grid",
    "SSLSettings",
    "SliceProfile",
    "SuperResolution",
    "output_grid",
    "superresolve",
    "thick_axis",
]

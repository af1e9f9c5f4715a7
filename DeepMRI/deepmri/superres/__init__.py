"""Super-resolution of thick-slice MRI: self-supervised per volume (SMORE-like) and interpolation baselines.

Examples:
    >>> from deepmri.superres import superresolve
    >>> result = superresolve(thick_t1, factor=4, method="ssl", budget="quick")  # doctest: +SKIP
"""

from deepmri.superres.grid import AlreadyIsotropicError, Grid, output_grid, thick_axis
from deepmri.superres.profile import SliceProfile
from deepmri.superres.restore import METHODS, SuperResolution, superresolve
from deepmri.superres.ssl import BUDGETS, SSLSettings

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

"""DeepMRI core: deep learning for MRI on torch, MONAI and SimpleITK, with no Slicer or Qt.

The Slicer modules, the Python console and the `deepmri` command line all call into this package.
"""

from deepmri.errors import (
    Cancelled,
    CardError,
    DeepMRIError,
    FetchError,
    ImageIOError,
    InvalidImageError,
    ModelError,
    OutOfMemoryError,
)
from deepmri.progress import CancelToken

__version__ = "0.1.0"

__all__ = [
    "Cancelled",
    "CancelToken",
    "CardError",
    "DeepMRIError",
    "FetchError",
    "ImageIOError",
    "InvalidImageError",
    "ModelError",
    "OutOfMemoryError",
    "__version__",
]

"""Errors DeepMRI raises, each with a message a radiologist can act on.

Every failure the user can cause (bad input, missing weights, no memory) is a `DeepMRIError`;
the CLI prints its message on one line and exits non-zero instead of showing a traceback.
"""

from __future__ import annotations


class DeepMRIError(Exception):
    """Base class of every error DeepMRI reports to users."""


class InvalidImageError(DeepMRIError):
    """The input image cannot be processed (wrong dimensionality, empty, NaN, bad geometry)."""


class ImageIOError(DeepMRIError):
    """An image file could not be read or written."""


class ModelError(DeepMRIError):
    """A model is missing, its card is invalid, or its weights fail verification."""


class CardError(ModelError):
    """A model card is invalid; the message names the bad field."""


class FetchError(ModelError):
    """A model could not be downloaded (offline, server error, checksum mismatch)."""


class OutOfMemoryError(DeepMRIError):
    """Inference did not fit in memory even after every fallback."""


class Cancelled(DeepMRIError):
    """The user asked the running job to stop; nothing was written."""

"""How a run is carried out: device, precision and CPU threads, resolved once and passed explicitly.

The widget or the CLI builds one `RunConfig` from what the user chose (or from `Settings`), it is
checked before any work starts, and the task hands it to the engine. Nothing else reads a device
or precision from the environment. Importing this module does not import torch.

Examples:
    >>> RunConfig(device="CPU").device
    'cpu'
    >>> RunConfig(device="gpu").device
    'cuda'
    >>> RunConfig(precision="bf16").precision
    'bf16'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from deepmri.errors import DeepMRIError

PRECISIONS = ("auto", "fp32", "fp16", "bf16")
_DEVICE_ALIASES = {"gpu": "cuda", "metal": "mps", "": "auto", "none": "auto", "default": "auto"}
_DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class DeviceError(DeepMRIError):
    """The device asked for is not a device name, or is not present on this machine."""


@dataclass(frozen=True)
class RunConfig:
    """Device ("auto", "cpu", "cuda", "cuda:1", "mps"), precision, and torch CPU threads.

    Names are normalised as users type them ("GPU", "CUDA", "Cuda:0"); an unknown name raises
    `DeviceError` at once. `resolve_device` (which needs torch) then checks the device exists.
    `threads` None leaves torch's default.
    """

    device: str = "auto"
    precision: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", normalise_device(self.device))
        precision = str(self.precision or "auto").strip().lower()
        if precision not in PRECISIONS:
            raise DeepMRIError(
                f"Precision must be one of {', '.join(PRECISIONS)}, not '{self.precision}'."
            )
        object.__setattr__(self, "precision", precision)
        if self.threads is not None and int(self.threads) < 1:
            raise DeepMRIError(f"Threads must be at least 1, not {self.threads}.")

    @classmethod
    def from_settings(cls, settings: Any = None, **overrides: Any) -> RunConfig:
        """The user's saved choices (`deepmri.settings.Settings`) with explicit overrides on top."""
        from deepmri.settings import Settings

        settings = settings or Settings.from_environment()
        values = {
            "device": settings.device or "auto",
            "precision": settings.precision or "auto",
            "threads": settings.threads,
        }
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "precision": self.precision, "threads": self.threads}

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> RunConfig:
        values = values or {}
        return cls(
            device=values.get("device", "auto"),
            precision=values.get("precision", "auto"),
            threads=values.get("threads"),
        )

    def resolve_device(self) -> Any:
        """The torch.device to run on (cuda > mps > cpu for "auto"); checks that it exists."""
        import torch

        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda")
            if torch.backends.mps.is_available():
                return torch.device("mps")
            return torch.device("cpu")
        device = torch.device(self.device)
        if device.type == "cuda":
            if not torch.cuda.is_available():
                raise DeviceError(
                    f"Device '{self.device}' was asked for, but PyTorch sees no CUDA GPU here. "
                    "Use 'cpu' or 'auto', or install a CUDA build of PyTorch "
                    "(in Slicer: the PyTorch extension)."
                )
            if device.index is not None and device.index >= torch.cuda.device_count():
                raise DeviceError(
                    f"Device '{self.device}' was asked for, but this machine has "
                    f"{torch.cuda.device_count()} CUDA GPU(s) (cuda:0 to "
                    f"cuda:{torch.cuda.device_count() - 1})."
                )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise DeviceError(
                f"Device '{self.device}' was asked for, but Apple MPS is not available."
            )
        return device

    def apply_threads(self) -> None:
        """Set torch's CPU thread count if one was chosen (a process-wide setting)."""
        if self.threads is not None:
            import torch

            torch.set_num_threads(int(self.threads))


def normalise_device(name: Any) -> str:
    """A device name as the engine knows it, or a `DeviceError` that lists the valid names."""
    text = str(name if name is not None else "auto").strip().lower()
    text = _DEVICE_ALIASES.get(text, text)
    if text.startswith("gpu:"):
        text = "cuda:" + text[4:]
    if not _DEVICE_PATTERN.match(text):
        raise DeviceError(
            f"'{name}' is not a device name; use auto, cpu, cuda (or gpu), cuda:N or mps."
        )
    return text

"""The small settings object DeepMRI reads from the environment: device and model folders.

`DEEPMRI_DEVICE` chooses a device (auto, cpu, cuda, cuda:1, mps), `DEEPMRI_PRECISION` the GPU
precision (auto, fp32, fp16, bf16), `DEEPMRI_THREADS` the torch CPU threads; they are the defaults of
`deepmri.runconfig.RunConfig.from_settings`, which the CLI and Slicer pass to every task.
`DEEPMRI_HOME` moves the user's cache (default `~/.deepmri`); `DEEPMRI_MODEL_PATH` adds model
folders (os.pathsep-separated).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
BUNDLED_MODELS_DIR = PACKAGE_DIR.parent / "Resources" / "Models"


@dataclass(frozen=True)
class Settings:
    """Settings resolved once from the environment; pass a new one to override in code."""

    device: str | None = None
    precision: str | None = None
    threads: int | None = None
    home: Path = field(default_factory=lambda: Path.home() / ".deepmri")
    extra_model_paths: tuple[Path, ...] = ()

    @property
    def model_cache(self) -> Path:
        return self.home / "models"

    @classmethod
    def from_environment(cls) -> Settings:
        home = Path(os.environ.get("DEEPMRI_HOME", Path.home() / ".deepmri")).expanduser()
        extra = tuple(
            Path(part).expanduser()
            for part in os.environ.get("DEEPMRI_MODEL_PATH", "").split(os.pathsep)
            if part
        )
        threads = os.environ.get("DEEPMRI_THREADS") or None
        return cls(
            device=os.environ.get("DEEPMRI_DEVICE") or None,
            precision=os.environ.get("DEEPMRI_PRECISION") or None,
            threads=int(threads) if threads else None,
            home=home,
            extra_model_paths=extra,
        )

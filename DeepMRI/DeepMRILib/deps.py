"""Installing DeepMRI's Python dependencies inside Slicer on first use, after asking the user.

Pins live in one place, pyproject.toml's [project].dependencies, read here at run time; torch comes
through the PyTorch extension's installer, the rest by pip, and Slicer's own packages are never touched.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from deepmri.errors import DeepMRIError

try:
    from packaging.requirements import Requirement
    from packaging.version import InvalidVersion, Version
except ImportError:  # Slicer always has pip, which carries packaging
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.version import InvalidVersion, Version

# Packages Slicer itself ships and was built against: if importable, never install or upgrade them
# (a pip upgrade of numpy or SimpleITK can break Slicer's compiled modules).
SLICER_OWNED = {"numpy": "numpy", "simpleitk": "SimpleITK", "vtk": "vtk"}
TORCH = "torch"
PYPROJECT_NAME = "pyproject.toml"


class DependencyError(DeepMRIError):
    """A dependency is missing and could not be (or was not allowed to be) installed."""


@dataclass(frozen=True)
class Missing:
    """A requirement that is not satisfied: absent, or present at a version outside the pin."""

    requirement: Requirement
    installed: str | None

    def describe(self) -> str:
        if self.installed is None:
            return f"{self.requirement} (not installed)"
        return f"{self.requirement} (installed: {self.installed})"


def find_pyproject(start: Path | None = None) -> Path:
    """DeepMRI's pyproject.toml: the copy installed in Resources/ next to the modules, or the source tree's.

    Only a file whose [project].name is "deepmri" counts, so an unrelated pyproject.toml in a
    folder above an installation is never read.
    """
    here = (start or Path(__file__)).resolve()
    candidates = [here.parent.parent / "Resources" / PYPROJECT_NAME]
    candidates += [parent / PYPROJECT_NAME for parent in here.parents]
    for candidate in candidates:
        if (
            candidate.is_file()
            and _load_toml(candidate).get("project", {}).get("name") == "deepmri"
        ):
            return candidate
    raise DependencyError(
        "DeepMRI cannot find its pyproject.toml, which lists the packages it needs; "
        "reinstall the DeepMRI extension."
    )


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]
    with open(path, "rb") as handle:
        return tomllib.load(handle)


def core_requirements(pyproject: Path | None = None) -> list[Requirement]:
    """The core's requirements as pinned in pyproject.toml ([project].dependencies).

    Where DeepMRI was pip-installed and no pyproject.toml is near, the installed package's own
    metadata (generated from the same file) is used.
    """
    try:
        path = pyproject or find_pyproject()
    except DependencyError:
        try:
            declared = importlib.metadata.requires("deepmri") or []
        except importlib.metadata.PackageNotFoundError as error:
            raise DependencyError(
                "DeepMRI cannot find the list of packages it needs (pyproject.toml); "
                "reinstall the DeepMRI extension."
            ) from error
        return [Requirement(text) for text in declared if "extra ==" not in text]
    dependencies = _load_toml(path).get("project", {}).get("dependencies", [])
    return [Requirement(text) for text in dependencies]


def installed_version(distribution: str) -> str | None:
    """The installed version of a distribution, or None when it is not installed."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _importable(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _satisfied(requirement: Requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


def missing_requirements(requirements: Iterable[Requirement]) -> list[Missing]:
    """Requirements to install or upgrade; Slicer's own packages are skipped when importable.

    Requirements whose environment marker does not apply here are skipped too.
    """
    missing = []
    for requirement in requirements:
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        key = requirement.name.lower()
        if key in SLICER_OWNED and _importable(SLICER_OWNED[key]):
            continue
        version = installed_version(requirement.name)
        if version is None or not _satisfied(requirement, version):
            missing.append(Missing(requirement, version))
    return missing


def confirmation_message(missing: Sequence[Missing]) -> str:
    """What the user is asked before anything is downloaded."""
    lines = [f"  - {item.describe()}" for item in missing]
    torch_note = ""
    if any(item.requirement.name.lower() == TORCH for item in missing):
        torch_note = (
            "\nPyTorch is installed by the PyTorch extension (a download of up to a few GB; "
            "it picks the build for your GPU)."
        )
    return (
        "DeepMRI needs these Python packages, which are not installed yet:\n"
        + "\n".join(lines)
        + torch_note
        + "\nThey will be downloaded and installed into Slicer's Python. This can take several "
        "minutes, and Slicer may need a restart afterwards. Install now?"
    )


def slicer_owned_constraints() -> list[str]:
    """pip constraints that hold Slicer's own packages (and an installed torch) at their versions."""
    constraints = []
    for distribution in [*SLICER_OWNED.values(), TORCH]:
        version = installed_version(distribution)
        if version is not None:
            constraints.append(f"{distribution}=={version}")
    return constraints


def pip_install(arguments: Sequence[str]) -> None:
    """pip install into this Python: Slicer's `pip_install` inside Slicer, else `python -m pip`."""
    slicer = sys.modules.get("slicer")
    if slicer is not None and hasattr(slicer, "app") and hasattr(slicer.util, "pip_install"):
        slicer.util.pip_install(list(arguments))
        return
    completed = subprocess.run(
        [sys.executable, "-m", "pip", "install", *arguments],
        capture_output=True,
        text=True,
    )
    if completed.returncode != 0:
        last = (completed.stderr.strip().splitlines() or ["unknown error"])[-1]
        raise DependencyError(f"pip could not install {' '.join(arguments)}: {last}")


def install_torch_with_pytorch_extension(requirement: Requirement) -> None:
    """Install torch through the PyTorch extension (it chooses the CUDA/CPU build)."""
    try:
        import PyTorchUtils
    except ImportError as error:
        raise DependencyError(
            "DeepMRI needs PyTorch. Install the 'PyTorch' extension from the Extensions Manager, "
            "restart Slicer, and try again."
        ) from error
    torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
        askConfirmation=False, torchVersionRequirement=str(requirement.specifier) or None
    )
    if torch is None:
        raise DependencyError("PyTorch was not installed; DeepMRI cannot run without it.")


def ask_in_slicer(message: str) -> bool:
    """The default `confirm`: an OK/Cancel dialog in the Slicer app; outside it, no (never silent)."""
    slicer = sys.modules.get("slicer")
    if slicer is None or not hasattr(slicer, "app"):
        return False
    return bool(slicer.util.confirmOkCancelDisplay(message, "DeepMRI: install packages"))


def ensure_dependencies(
    confirm: Callable[[str], bool] = ask_in_slicer,
    *,
    requirements: Sequence[Requirement] | None = None,
    install_torch: Callable[[Requirement], None] = install_torch_with_pytorch_extension,
    install: Callable[[Sequence[str]], None] = pip_install,
) -> list[str]:
    """Install what is missing after `confirm(message)` says yes; returns what was installed.

    `confirm` defaults to a dialog in Slicer (and to "no" where there is no Slicer GUI).
    Nothing is asked or installed when all is present. If the user declines, `DependencyError`
    says what is missing and how to install it later. torch goes first, so pip never pulls a
    torch wheel of its own as a dependency of MONAI; Slicer's packages stay at their versions.
    """
    requirements = list(requirements) if requirements is not None else core_requirements()
    missing = missing_requirements(requirements)
    if not missing:
        return []
    if not confirm(confirmation_message(missing)):
        names = ", ".join(str(item.requirement) for item in missing)
        raise DependencyError(
            f"DeepMRI cannot run without {names}. Installation was declined; run the module "
            "again to be asked again, or install them from the DeepMRI Models module."
        )
    installed = []
    torch = [item for item in missing if item.requirement.name.lower() == TORCH]
    others = [item for item in missing if item.requirement.name.lower() != TORCH]
    for item in torch:
        install_torch(item.requirement)
        installed.append(str(item.requirement))
    if others:
        with tempfile.TemporaryDirectory(prefix="deepmri-pip-") as folder:
            constraints = Path(folder) / "constraints.txt"
            constraints.write_text("\n".join(slicer_owned_constraints()) + "\n", encoding="utf-8")
            arguments = [str(item.requirement) for item in others]
            install([*arguments, "--constraint", os.fspath(constraints)])
        installed.extend(str(item.requirement) for item in others)
    importlib.invalidate_caches()
    return installed

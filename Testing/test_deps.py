"""Dependency handling for Slicer: pins read from pyproject.toml, what is missing, asking first.

Runs without Slicer: the installers are injected, and pip itself is run offline (--no-index).
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

import pytest
import tomllib
from DeepMRILib import deps
from packaging.requirements import Requirement

REPOSITORY = Path(__file__).resolve().parent.parent
NOT_A_PACKAGE = "deepmri-test-package-that-does-not-exist"


def never_called(*arguments):
    raise AssertionError(f"an installer ran although it should not have: {arguments}")


def test_requirements_are_read_from_the_repository_pyproject():
    assert deps.find_pyproject() == REPOSITORY / "pyproject.toml"
    with open(REPOSITORY / "pyproject.toml", "rb") as handle:
        declared = tomllib.load(handle)["project"]["dependencies"]
    assert [str(r) for r in deps.core_requirements()] == [str(Requirement(t)) for t in declared]
    assert "torch" in [r.name for r in deps.core_requirements()]


def test_requirements_keep_the_pins_and_markers_as_written(tmp_path):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        '[project]\nname = "x"\ndependencies = [\n  "monai>=1.4,<1.7",\n'
        '  "safetensors>=0.4",\n  "tomli>=2; python_version < \'3.11\'",\n]\n'
    )
    requirements = deps.core_requirements(pyproject)
    assert [r.name for r in requirements] == ["monai", "safetensors", "tomli"]
    assert str(requirements[0].specifier) == "<1.7,>=1.4"
    assert requirements[2].marker is not None


def test_this_environment_has_everything_the_core_needs():
    assert deps.missing_requirements(deps.core_requirements()) == []


def test_missing_lists_absent_and_outdated_packages_but_never_slicers_own():
    monai_version = importlib.metadata.version("monai")
    missing = deps.missing_requirements(
        [
            Requirement("numpy>=999"),  # Slicer's own: never upgraded
            Requirement("SimpleITK<1"),  # Slicer's own: never downgraded
            Requirement("safetensors>=0.4"),  # satisfied
            Requirement("monai>=999"),  # outdated
            Requirement(f"{NOT_A_PACKAGE}>=1"),  # absent
            Requirement(f"{NOT_A_PACKAGE}-old; python_version < '3'"),  # not for this Python
        ]
    )
    assert [(item.requirement.name, item.installed) for item in missing] == [
        ("monai", monai_version),
        (NOT_A_PACKAGE, None),
    ]
    assert missing[0].describe() == f"monai>=999 (installed: {monai_version})"


def test_nothing_is_asked_or_installed_when_all_is_present():
    asked = []
    installed = deps.ensure_dependencies(
        lambda message: asked.append(message) or True,
        requirements=[Requirement("safetensors>=0.4")],
        install_torch=never_called,
        install=never_called,
    )
    assert installed == [] and asked == []


def test_declining_installs_nothing_and_says_what_is_missing():
    asked = []
    with pytest.raises(deps.DependencyError, match=f"cannot run without {NOT_A_PACKAGE}>=1"):
        deps.ensure_dependencies(
            lambda message: asked.append(message) or False,
            requirements=[Requirement(f"{NOT_A_PACKAGE}>=1"), Requirement("torch>=999")],
            install_torch=never_called,
            install=never_called,
        )
    assert len(asked) == 1
    assert f"{NOT_A_PACKAGE}>=1 (not installed)" in asked[0]
    assert "PyTorch extension" in asked[0]


def test_confirmed_install_puts_torch_first_and_holds_slicers_packages():
    calls = []

    def record_pip(arguments):
        constraint_file = Path(arguments[arguments.index("--constraint") + 1])
        calls.append(("pip", list(arguments[:-2]), constraint_file.read_text().split()))

    installed = deps.ensure_dependencies(
        lambda message: True,
        requirements=[Requirement(f"{NOT_A_PACKAGE}>=1"), Requirement("torch>=999")],
        install_torch=lambda requirement: calls.append(("torch", str(requirement))),
        install=record_pip,
    )
    assert calls[0] == ("torch", "torch>=999")
    kind, arguments, constraints = calls[1]
    assert kind == "pip" and arguments == [f"{NOT_A_PACKAGE}>=1"]
    assert f"numpy=={importlib.metadata.version('numpy')}" in constraints
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in constraints
    assert f"torch=={importlib.metadata.version('torch')}" in constraints
    assert installed == ["torch>=999", f"{NOT_A_PACKAGE}>=1"]


def test_a_pip_failure_is_reported_as_a_dependency_error():
    with pytest.raises(
        deps.DependencyError, match=f"pip could not install --no-index {NOT_A_PACKAGE}"
    ):
        deps.pip_install(["--no-index", NOT_A_PACKAGE])


def test_without_the_pytorch_extension_the_user_is_told_to_install_it():
    with pytest.raises(deps.DependencyError, match="Install the 'PyTorch' extension"):
        deps.install_torch_with_pytorch_extension(Requirement("torch>=2.1"))


def test_without_a_slicer_window_the_default_is_to_ask_and_refuse():
    assert deps.ask_in_slicer("Install?") is False
    with pytest.raises(deps.DependencyError, match="Installation was declined"):
        deps.ensure_dependencies(
            requirements=[Requirement(f"{NOT_A_PACKAGE}>=1")],
            install_torch=never_called,
            install=never_called,
        )


def test_the_installed_layout_finds_the_copy_in_resources_and_ignores_foreign_files(tmp_path):
    # Slicer's qt-scripted-modules folder: DeepMRILib/ beside Resources/pyproject.toml (CMake
    # installs it there), inside a folder that holds some other project's pyproject.toml.
    modules = tmp_path / "lib" / "qt-scripted-modules"
    (modules / "DeepMRILib").mkdir(parents=True)
    (modules / "Resources").mkdir()
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "other"\ndependencies = []\n')
    deps_file = modules / "DeepMRILib" / "deps.py"
    with pytest.raises(deps.DependencyError, match="cannot find its pyproject.toml"):
        deps.find_pyproject(deps_file)
    installed = modules / "Resources" / "pyproject.toml"
    installed.write_text((REPOSITORY / "pyproject.toml").read_text())
    assert deps.find_pyproject(deps_file) == installed

"""The extension's CMake files configure, install every module and shared file, and match the index.

A stand-in SlicerConfig.cmake (written to a temporary folder here, for this check only) defines
Slicer's macros as recorders, so real cmake parses and runs both CMakeLists.txt without a Slicer build.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = (
    "DeepMRISegmentation",
    "DeepMRIRegistration",
    "DeepMRISuperResolution",
    "DeepMRISynthesis",
    "DeepMRIModels",
)
METADATA = (
    "EXTENSION_HOMEPAGE",
    "EXTENSION_CATEGORY",
    "EXTENSION_CONTRIBUTORS",
    "EXTENSION_DESCRIPTION",
    "EXTENSION_ICONURL",
    "EXTENSION_SCREENSHOTURLS",
    "EXTENSION_DEPENDS",
)

# Each stand-in appends one line "<call>|<key>=<value>|..." to calls.txt in the build folder.
_FAKE_SLICER_CONFIG = r"""
set(Slicer_FOUND TRUE)
set(BUILD_TESTING ON)
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR "lib/Slicer-5.9/qt-scripted-modules")
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR "${Slicer_QTSCRIPTEDMODULES_LIB_DIR}")
set(_fake_dir "${CMAKE_CURRENT_LIST_DIR}")
set(Slicer_USE_FILE "${_fake_dir}/UseSlicer.cmake")
set(Slicer_EXTENSION_GENERATE_CONFIG "${_fake_dir}/GenerateConfig.cmake")
set(Slicer_EXTENSION_CPACK "${_fake_dir}/CPack.cmake")

function(_record text)
  file(APPEND "${CMAKE_BINARY_DIR}/calls.txt" "${text}\n")
endfunction()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME"
    "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords: ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  # As the real macro: every listed file must exist.
  foreach(_file ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS "${CMAKE_CURRENT_SOURCE_DIR}/${_file}")
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file '${_file}'")
    endif()
  endforeach()
  string(REPLACE ";" "," _scripts "${MY_SLICER_SCRIPTS}")
  string(REPLACE ";" "," _resources "${MY_SLICER_RESOURCES}")
  _record("module|name=${MY_SLICER_NAME}|generic_tests=${MY_SLICER_WITH_GENERIC_TESTS}|scripts=${_scripts}|resources=${_resources}")
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(MY "" "SCRIPT;TESTNAME_PREFIX" "SLICER_ARGS" ${ARGN})
  _record("unittest|script=${MY_SCRIPT}")
endmacro()
"""

_FAKE_FILES = {
    "UseSlicer.cmake": '_record("use_file")\n',
    "GenerateConfig.cmake": '_record("generate_config")\n',
    "CPack.cmake": "foreach(_name {names})\n"
    '  _record("metadata|name=${{_name}}|value=${{${{_name}}}}")\n'
    "endforeach()\n"
    '_record("cpack")\n',
}


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> Path:
    """A configured build folder of the extension against the stand-in Slicer."""
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    fake = tmp_path_factory.mktemp("fake-slicer")
    (fake / "SlicerConfig.cmake").write_text(_FAKE_SLICER_CONFIG)
    for name, text in _FAKE_FILES.items():
        (fake / name).write_text(text.format(names=" ".join(METADATA)))
    build = tmp_path_factory.mktemp("build")
    completed = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(build), f"-DSlicer_DIR={fake}"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    return build


@pytest.fixture(scope="module")
def calls(build) -> list[dict[str, str]]:
    records = []
    for line in (build / "calls.txt").read_text().splitlines():
        kind, *fields = line.split("|")
        records.append({"call": kind, **dict(field.split("=", 1) for field in fields)})
    return records


def _modules(calls: list[dict[str, str]]) -> dict[str, dict[str, str]]:
    return {record["name"]: record for record in calls if record["call"] == "module"}


def test_extension_configures_in_slicer_order(calls):
    order = [record["call"] for record in calls if record["call"] != "metadata"]
    assert order[0] == "use_file" and order[-2:] == ["generate_config", "cpack"]
    assert order.index("module") < order.index("generate_config")


def test_every_module_is_built_with_generic_tests_and_registers_its_self_test(calls):
    modules = _modules(calls)
    assert sorted(modules) == sorted(MODULES)
    for name, record in modules.items():
        assert record["generic_tests"] == "TRUE"
        assert record["scripts"].split(",")[0] == f"{name}.py"
        resources = record["resources"].split(",")
        assert f"Resources/UI/{name}.ui" in resources
        assert f"Resources/Icons/{name}.png" in resources
    unit_tests = {record["script"] for record in calls if record["call"] == "unittest"}
    assert unit_tests == {f"{name}.py" for name in MODULES}


def test_core_package_library_and_bundled_models_are_all_installed(calls):
    modules = _modules(calls)
    scripts = {path for record in modules.values() for path in record["scripts"].split(",")}
    resources = {path for record in modules.values() for path in record["resources"].split(",")}
    source = ROOT / "DeepMRI"
    expected_scripts = {
        str(path.relative_to(source))
        for folder in ("deepmri", "DeepMRILib")
        for path in (source / folder).rglob("*.py")
    }
    assert "deepmri/__init__.py" in expected_scripts
    assert expected_scripts <= scripts
    models = {
        str(path.relative_to(source))
        for path in (source / "Resources" / "Models").rglob("*")
        if path.is_file()
    }
    assert models <= resources


def test_metadata_is_complete_and_the_index_entry_agrees(calls):
    metadata = {r["name"]: r["value"] for r in calls if r["call"] == "metadata"}
    assert all(metadata[name].strip() for name in METADATA), metadata
    entry = json.loads((ROOT / "DeepMRI.json").read_text())
    assert entry["$schema"].startswith("https://raw.githubusercontent.com/Slicer/Slicer/")
    assert entry["build_dependencies"] == metadata["EXTENSION_DEPENDS"].split(";")
    assert "PyTorch" in entry["build_dependencies"]
    assert entry["category"] == metadata["EXTENSION_CATEGORY"]
    assert metadata["EXTENSION_HOMEPAGE"].startswith(entry["scm_url"])
    for url in [metadata["EXTENSION_ICONURL"], *metadata["EXTENSION_SCREENSHOTURLS"].split()]:
        assert url.startswith(entry["scm_url"] + "/raw/main/"), url
        assert (ROOT / url.split("/raw/main/", 1)[1]).is_file(), f"{url} names no file here"


def test_dependency_pins_are_installed_where_deps_looks_for_them(build, tmp_path):
    completed = subprocess.run(
        ["cmake", "--install", str(build), "--prefix", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert completed.returncode == 0, completed.stdout + completed.stderr
    installed = tmp_path / "lib/Slicer-5.9/qt-scripted-modules/Resources/pyproject.toml"
    assert installed.read_text() == (ROOT / "pyproject.toml").read_text()
    deps = pytest.importorskip("DeepMRILib.deps")
    installed_deps = installed.parent.parent / "DeepMRILib" / "deps.py"
    assert deps.find_pyproject(start=installed_deps) == installed


def test_extension_icon_is_128_pixels_square():
    from PIL import Image

    for path in [ROOT / "Resources" / "DeepMRI.png"] + [
        ROOT / "DeepMRI" / "Resources" / "Icons" / f"{name}.png" for name in MODULES
    ]:
        with Image.open(path) as image:
            assert image.size == (128, 128), path

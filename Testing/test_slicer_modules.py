"""The Slicer module files, checked without desktop Slicer: they compile, follow the template, match their .ui.

Their behaviour (Apply, Cancel, results in the views) is tested by each module's own
ScriptedLoadableModuleTest inside Slicer; here the contracts that break silently are checked.
"""

from __future__ import annotations

import ast
import re
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parent.parent / "DeepMRI"
# Task modules and the core task each one runs.
TASK_MODULES = {
    "DeepMRISegmentation": "segment",
    "DeepMRIRegistration": "register",
    "DeepMRISuperResolution": "superresolve",
    "DeepMRISynthesis": "synthesize",
}
MODULES = (*TASK_MODULES, "DeepMRIModels")
# Widgets that Qt itself provides; any other class in a .ui must be declared as a custom widget.
QT_PREFIX = "Q"


def _source(module: str) -> str:
    return (MODULE_DIR / f"{module}.py").read_text(encoding="utf-8")


def _tree(module: str) -> ast.Module:
    return ast.parse(_source(module), filename=f"{module}.py")


def _ui(module: str) -> ElementTree.Element:
    return ElementTree.parse(MODULE_DIR / "Resources" / "UI" / f"{module}.ui").getroot()


def _widget_names(root: ElementTree.Element) -> set[str]:
    return {widget.get("name") for widget in root.iter("widget")}


def _classes(tree: ast.Module) -> dict[str, ast.ClassDef]:
    return {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}


def _parent_assignments(tree: ast.Module) -> dict[str, ast.expr]:
    """`self.parent.<field> = value` assignments of the module class."""
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign):
            for target in node.targets:
                if (
                    isinstance(target, ast.Attribute)
                    and isinstance(target.value, ast.Attribute)
                    and target.value.attr == "parent"
                ):
                    found[target.attr] = node.value
    return found


def _text_of(node: ast.expr) -> str:
    """The string inside `_("...")` or a plain constant."""
    if isinstance(node, ast.Call) and node.args:
        node = node.args[0]
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else ""


@pytest.mark.parametrize("module", MODULES)
def test_module_file_compiles(module):
    compile(_source(module), f"{module}.py", "exec")


@pytest.mark.parametrize("module", MODULES)
def test_module_follows_the_scripted_module_template(module):
    classes = _classes(_tree(module))
    expected_bases = {
        module: "ScriptedLoadableModule",
        f"{module}Widget": "ScriptedLoadableModuleWidget",
        f"{module}Logic": "ScriptedLoadableModuleLogic",
        f"{module}Test": "ScriptedLoadableModuleTest",
    }
    for name, base in expected_bases.items():
        assert name in classes, f"{module}.py has no class {name}"
        assert base in [ast.unparse(b) for b in classes[name].bases]
    wrapper = classes[f"{module}ParameterNode"]
    assert "parameterNodeWrapper" in [ast.unparse(d) for d in wrapper.decorator_list]


@pytest.mark.parametrize("module", MODULES)
def test_module_declares_category_help_and_acknowledgement(module):
    fields = _parent_assignments(_tree(module))
    categories = ast.literal_eval(fields["categories"])
    assert categories == ["DeepMRI"]
    assert _text_of(fields["title"]).startswith("DeepMRI")
    help_text = _text_of(fields["helpText"]).lower()
    for topic in ("input", "limits", "cite"):
        assert topic in help_text, f"{module} help text does not say {topic!r}"
    assert len(_text_of(fields["acknowledgementText"]).strip()) > 40
    assert ast.literal_eval(fields["contributors"])


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_parses_and_its_top_widget_is_the_module(module):
    root = _ui(module)
    assert root.tag == "ui" and root.findtext("class") == module
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == module


@pytest.mark.parametrize("module", MODULES)
def test_every_ui_widget_the_code_uses_exists_in_the_ui_file(module):
    used = set(re.findall(r"self\.ui\.(\w+)", _source(module)))
    used |= set(re.findall(r"widget\.ui\.(\w+)", _source(module)))
    # A task panel may use no widget by name: the parameter node binds them all.
    bound = [p for p in _ui(module).iter("property") if p.get("name") == "SlicerParameterName"]
    assert used or bound, "the module binds no widgets"
    missing = used - _widget_names(_ui(module))
    assert not missing, f"{module}.py uses widgets missing from its .ui: {sorted(missing)}"


def _parameter_fields(module: str) -> dict[str, str]:
    """The parameter node's fields and their annotations, as the module declares them."""
    wrapper = _classes(_tree(module))[f"{module}ParameterNode"]
    return {
        statement.target.id: ast.unparse(statement.annotation)
        for statement in wrapper.body
        if isinstance(statement, ast.AnnAssign)
    }


@pytest.mark.parametrize("module", MODULES)
def test_bound_widgets_match_parameter_node_fields(module):
    fields = _parameter_fields(module)
    bound = {}
    for widget in _ui(module).iter("widget"):
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.findtext("string")] = widget.get("class")
    assert bound, "no widget is bound to the parameter node"
    assert set(bound) <= set(fields), f"unknown parameters: {set(bound) - set(fields)}"
    for name, widget_class in bound.items():
        if widget_class == "QComboBox":  # Slicer's combo-box connector needs a Choice annotation
            assert "Choice(" in fields[name], f"{name} is bound to a QComboBox without Choice"
        if widget_class == "ctkPathLineEdit":
            assert "Path" in fields[name]


@pytest.mark.parametrize("module", MODULES)
def test_mrml_widgets_get_the_scene_and_custom_widgets_are_declared(module):
    root = _ui(module)
    mrml_widgets = {
        w.get("name") for w in root.iter("widget") if w.get("class").startswith("qMRML")
    }
    mrml_widgets.discard(module)
    receivers = {
        connection.findtext("receiver")
        for connection in root.iter("connection")
        if connection.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and connection.findtext("sender") == module
    }
    assert mrml_widgets <= receivers, f"no scene for {mrml_widgets - receivers}"
    used = {w.get("class") for w in root.iter("widget")} - {None}
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    assert {c for c in used if not c.startswith(QT_PREFIX)} <= declared


@pytest.mark.parametrize("module", MODULES)
def test_resources_the_module_loads_exist(module):
    for relative in re.findall(r"resourcePath\(\"([^\"]+)\"\)", _source(module)):
        assert (MODULE_DIR / "Resources" / relative).is_file(), relative
    assert (MODULE_DIR / "Resources" / "Icons" / f"{module}.png").is_file()


@pytest.mark.parametrize("module", MODULES)
def test_self_test_runs_every_test_method_it_defines(module):
    test_class = _classes(_tree(module))[f"{module}Test"]
    methods = {f.name for f in test_class.body if isinstance(f, ast.FunctionDef)}
    defined = {name for name in methods if name.startswith("test_")}
    run_test = next(f for f in test_class.body if getattr(f, "name", "") == "runTest")
    called = {node.attr for node in ast.walk(run_test) if isinstance(node, ast.Attribute)}
    assert defined and defined <= called, f"runTest skips {defined - called}"
    assert "SampleData" in ast.unparse(test_class)  # tests run on Slicer's sample data


LIBRARY = MODULE_DIR / "DeepMRILib"
# The DeepMRILib class each module's Logic is a thin subclass of.
LIBRARY_LOGIC = {
    **{module: ("DeepMRILib.tasklogic", "TaskLogic") for module in TASK_MODULES},
    "DeepMRIModels": ("DeepMRILib.models", "ModelsLogic"),
}
MAX_MODULE_LINES = 250
MAX_LOGIC_LINES = 20


def _library_logic(module: str) -> type:
    module_name, class_name = LIBRARY_LOGIC[module]
    return getattr(pytest.importorskip(module_name), class_name)


@pytest.mark.parametrize("module", MODULES)
def test_module_file_is_short_and_its_logic_is_a_thin_subclass_of_the_library(module):
    assert len(_source(module).splitlines()) < MAX_MODULE_LINES
    logic = _classes(_tree(module))[f"{module}Logic"]
    assert logic.end_lineno - logic.lineno + 1 < MAX_LOGIC_LINES
    assert LIBRARY_LOGIC[module][1] in [ast.unparse(base) for base in logic.bases]


@pytest.mark.parametrize("module", MODULES)
def test_widgets_the_shared_panel_code_uses_exist_in_every_ui_file(module):
    shared = (LIBRARY / "widgets.py").read_text(encoding="utf-8")
    setup = shared[shared.index("def setupPanel") : shared.index("def parameters")]
    used = set(re.findall(r"self\.ui\.(\w+)", setup))
    assert {"progressBar", "statusLabel", "cancelButton"} <= used
    assert used <= _widget_names(_ui(module))


def _keywords_of_calls(tree: ast.AST, name: str) -> set[str] | None:
    keywords = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == name:
            keywords = (keywords or set()) | {k.arg for k in node.keywords if k.arg}
    return keywords


@pytest.mark.parametrize(("module", "task"), TASK_MODULES.items())
def test_task_panel_starts_the_task_with_arguments_the_logic_accepts(module, task):
    import inspect

    from deepmri.tasks import get_task

    tasklogic = pytest.importorskip("DeepMRILib.tasklogic")
    widgets = pytest.importorskip("DeepMRILib.widgets")
    keywords = _keywords_of_calls(_tree(module), "self.startTask")
    assert keywords, "the panel starts no task"
    accepted = set(inspect.signature(widgets.PanelMixin.startTask).parameters)
    accepted |= set(inspect.signature(tasklogic.TaskLogic.start).parameters)
    accepted |= {option.name for option in get_task(task).options}
    assert keywords <= accepted, keywords - accepted
    assert {"poll", "cancel", "result", "done", "state"} <= set(
        dir(pytest.importorskip("DeepMRILib.jobs").WorkerJob)
    )


def _methods(class_node: ast.ClassDef) -> set[str]:
    return {f.name for f in class_node.body if isinstance(f, ast.FunctionDef)}


@pytest.mark.parametrize("module", MODULES)
def test_widget_calls_only_logic_methods_and_slots_that_exist(module):
    widgets = pytest.importorskip("DeepMRILib.widgets")
    classes = _classes(_tree(module))
    widget = classes[f"{module}Widget"]
    logic_methods = _methods(classes[f"{module}Logic"]) | {"getParameterNode"}
    logic_methods |= set(dir(_library_logic(module))) | {"saved"}
    widget_methods = _methods(widget) | set(dir(widgets.PanelMixin))
    called_on_logic = {
        node.attr
        for node in ast.walk(widget)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) == "self.logic"
    }
    assert called_on_logic <= logic_methods, called_on_logic - logic_methods
    slots = {
        ast.unparse(node.args[-1]).removeprefix("self.")
        for node in ast.walk(widget)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr in ("connect", "addObserver", "removeObserver")
        and node.args
        and re.fullmatch(r"self\.\w+", ast.unparse(node.args[-1]))
    }
    # A task panel without its own setup gets PanelMixin's, which connects onApplyButton.
    assert slots or "setup" not in _methods(widget), "the panel connects nothing"
    assert slots <= widget_methods, slots - widget_methods
    if "setup" not in _methods(widget):
        assert "onApplyButton" in _methods(widget)


@pytest.mark.parametrize(
    ("module_name", "function", "called_as"),
    [
        ("deepmri.models.fetch", "fetch_model", "fetch_model"),
        ("deepmri.models.importers", "import_model", "importers.import_model"),
    ],
)
def test_models_library_calls_fetch_and_import_with_arguments_they_accept(
    module_name, function, called_as
):
    import importlib
    import inspect

    tree = ast.parse((LIBRARY / "models.py").read_text(encoding="utf-8"))
    keywords = _keywords_of_calls(tree, called_as)
    assert keywords is not None, f"DeepMRILib/models.py does not call {called_as}"
    try:
        target = getattr(importlib.import_module(module_name), function)
    except (ImportError, AttributeError):
        pytest.skip(f"{module_name}.{function} is not written yet")
    assert keywords <= set(inspect.signature(target).parameters)


@pytest.mark.parametrize("module", MODULES)
def test_panel_reads_only_parameter_node_fields_that_exist(module):
    # A misspelt field fails only when a user clicks in Slicer (the wrapper has no such
    # attribute), so every read of the parameter node is checked here, and none is by a name
    # built at run time, which this check could not see.
    widget = _classes(_tree(module))[f"{module}Widget"]
    holders = {"parameters", "self.parameters", "self._parameterNode"}
    read = {
        node.attr
        for node in ast.walk(widget)
        if isinstance(node, ast.Attribute) and ast.unparse(node.value) in holders
    }
    unknown = read - set(_parameter_fields(module))
    assert not unknown, f"{module}Widget reads parameters it does not declare: {sorted(unknown)}"
    dynamic = [
        ast.unparse(node)
        for node in ast.walk(widget)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) in ("getattr", "setattr")
        and node.args
        and ast.unparse(node.args[0]) in holders
    ]
    assert not dynamic, f"parameters read by a computed name: {dynamic}"


@pytest.mark.parametrize(("module", "task"), TASK_MODULES.items())
def test_the_outputs_a_panel_asks_for_are_optional_outputs_of_its_task(module, task):
    from deepmri.tasks import get_task

    tree = _tree(module)
    asked = _keywords_of_calls(tree, "chosen_outputs") or set()
    for keyword in ast.walk(tree):
        if isinstance(keyword, ast.keyword) and keyword.arg == "wanted":
            asked |= {
                node.value
                for node in ast.walk(keyword.value)
                if isinstance(node, ast.Constant) and isinstance(node.value, str)
            }
    optional = {spec.name for spec in get_task(task).outputs if spec.optional}
    assert asked <= optional, f"{module} asks for outputs {task} does not offer: {asked - optional}"

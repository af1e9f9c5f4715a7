"""What every DeepMRI panel does the same way: the .ui, the parameter node, scene close, a job's
progress bar, Cancel and status line. Imports no Qt until a panel is built, so it loads anywhere.

A module's widget class lists `PanelMixin` first among its bases and keeps only what is its own:
which widgets are enabled, what Apply starts and what a finished job shows.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from deepmri.errors import Cancelled

POLL_INTERVAL_MS = 200
ERROR_STYLE = "color: #c0392b"


class JobRunner:
    """Follows one background job (`DeepMRILib.jobs.Job`) for a panel.

    A timer polls the job: each progress event moves the bar and the status line; at the end
    the bar hides and `on_success(job.result())` runs, or the cancel or error is shown. `timer`
    is anything with `start()`/`stop()` whose timeout calls `poll` (a `qt.QTimer` by default).
    """

    def __init__(
        self,
        progress_bar: Any,
        status_label: Any,
        on_change: Callable[[], None] | None = None,
        timer: Any = None,
    ) -> None:
        self.progress_bar = progress_bar
        self.status_label = status_label
        self.on_change = on_change or (lambda: None)
        self.job: Any = None
        self.started = 0.0
        self._timer = timer
        self._on_success: Callable[[Any], None] = lambda value: None
        self._what = ""
        self._cancelled_text = ""

    @property
    def running(self) -> bool:
        return self.job is not None

    @property
    def elapsed_s(self) -> float:
        return time.monotonic() - self.started

    def start(
        self,
        job: Any,
        on_success: Callable[[Any], None],
        *,
        what: str,
        cancelled_text: str = "Cancelled. Nothing was added to the scene.",
    ) -> None:
        """Follow `job`; `what` names it in an error ("Segmentation failed: ...")."""
        self.job, self._on_success = job, on_success
        self._what, self._cancelled_text = what, cancelled_text
        self.started = time.monotonic()
        self.progress_bar.value = 0
        self.progress_bar.show()
        self._ensure_timer().start()
        self.on_change()

    def _ensure_timer(self) -> Any:
        if self._timer is None:
            import qt

            self._timer = qt.QTimer()
            self._timer.setInterval(POLL_INTERVAL_MS)
            self._timer.connect("timeout()", self.poll)
        return self._timer

    def poll(self) -> None:
        job = self.job
        if job is None:
            self._ensure_timer().stop()
            return
        for event in job.poll():
            self.progress_bar.value = int(round(100 * event.fraction))
            self.status(event.message)
        if not job.done:
            return
        self._ensure_timer().stop()
        self.job = None
        self.progress_bar.hide()
        self.on_change()
        try:
            value = job.result()
        except Cancelled:
            self.status(self._cancelled_text)
            return
        except Exception as error:
            self.error(self._what, error)
            return
        self._on_success(value)

    def cancel(self) -> None:
        """Ask the job to stop; the next poll reports it."""
        if self.job is not None:
            self.status("Cancelling...")
            self.job.cancel()

    def stop(self) -> None:
        """Cancel and forget the job (the panel or the scene is going away)."""
        if self._timer is not None:
            self._timer.stop()
        if self.job is not None:
            self.job.cancel()
            self.job = None

    def status(self, text: str) -> None:
        self.status_label.setStyleSheet("")
        self.status_label.text = text

    def error(self, what: str, error: BaseException) -> None:
        """The error in the panel, in red, with its message; the full trace goes to the log."""
        logging.error("DeepMRI: %s: %s", what, error, exc_info=error)
        self.status_label.setStyleSheet(ERROR_STYLE)
        self.status_label.text = f"{what}: {error}"


def fill_table(
    table: Any, headers: list[str], rows: list[dict[str, Any]], keys: list[str], select: Any = None
) -> None:
    """One table row per dict, one column per key; the row whose first key's value is `select`
    is selected. A "path" in a row is the last column's tooltip."""
    import qt

    table.setColumnCount(len(headers))
    table.setHorizontalHeaderLabels(headers)
    table.horizontalHeader().setStretchLastSection(True)
    table.verticalHeader().hide()
    table.setRowCount(len(rows))
    for row_index, row in enumerate(rows):
        for column, key in enumerate(keys):
            item = qt.QTableWidgetItem(str(row[key]))
            tooltip = row.get("path", row[key]) if column == len(keys) - 1 else row[key]
            item.setToolTip(str(tooltip))
            table.setItem(row_index, column, item)
    table.resizeColumnsToContents()
    for row_index, row in enumerate(rows):
        if select is not None and row[keys[0]] == select:
            table.selectRow(row_index)


def chosen_outputs(**chosen: bool) -> list[str]:
    """The optional outputs a panel's checkboxes ask for, by output name, in the order given:
    `chosen_outputs(probability=True, uncertainty=False)` is ["probability"]. The panel passes
    each field by name, so a misspelt field fails the module tests, not a user's click."""
    return [output for output, on in chosen.items() if on]


def is_empty_path(path: Any) -> bool:
    """True for a path widget left empty (the parameter node holds it as Path("."))."""
    return path is None or str(path) in ("", ".")


class ParameterNodeLogic:
    """A module logic's `getParameterNode`, wrapped in its `parameterNodeClass` (the module's
    `parameterNodeWrapper`); listed before `ScriptedLoadableModuleLogic` among the bases."""

    parameterNodeClass: Any = None

    def getParameterNode(self) -> Any:
        return self.parameterNodeClass(super().getParameterNode())


class TaskModuleLogic(ParameterNodeLogic):
    """The first base of a task module's `<module>Logic` (then `ScriptedLoadableModuleLogic`
    and `TaskLogic`): the template's logic for the task `taskName`, with the saved settings."""

    taskName = ""

    def __init__(self) -> None:
        import qt
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

        from DeepMRILib.models import SavedSettings
        from DeepMRILib.tasklogic import TaskLogic

        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogic.__init__(self, self.taskName)
        SavedSettings.load(qt.QSettings()).apply_to(self)


def click_apply_until_done(
    test_case: Any, module_name: str, parameters: dict[str, Any], timeout_s: float = 900.0
) -> Any:
    """A panel's self-test: set `parameters`, click Apply and Cancel (the scene must be as it
    was), then Apply again and wait until it is done; returns the module's widget."""
    import slicer

    nodes_before = slicer.mrmlScene.GetNumberOfNodes()
    slicer.util.selectModule(module_name)
    widget = slicer.util.getModuleWidget(module_name)
    for name, value in parameters.items():
        setattr(widget.parameters, name, value)
    for cancel in (True, False):
        widget.ui.applyButton.click()
        test_case.assertTrue(widget.ui.cancelButton.enabled, widget.ui.statusLabel.text)
        deadline = time.monotonic() + timeout_s
        while widget.runner.running and time.monotonic() < deadline:
            if cancel and widget.ui.progressBar.value > 0:
                widget.ui.cancelButton.click()
            slicer.app.processEvents()
            time.sleep(0.05)
        if cancel:
            test_case.assertIn("Cancelled", widget.ui.statusLabel.text)
            test_case.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodes_before)
    test_case.assertIn("Done", widget.ui.statusLabel.text)
    return widget


def run_self_tests(test_case: Any, tests: Any) -> None:
    """Run a module self-test's test methods one after another, each on an empty scene."""
    import slicer

    for test in tests:
        slicer.mrmlScene.Clear()
        test()
        test_case.delayDisplay(f"{test.__name__} passed")


class PanelMixin:
    """The parameter-node and scene plumbing of a DeepMRI panel (Slicer's module template).

    The widget class also derives from `ScriptedLoadableModuleWidget` and `VTKObservationMixin`,
    calls `setupPanel` in its `setup`, and implements `updatePanel` (called on every parameter
    change) and, if it needs to, `prepareParameterNode` (defaults for a new parameter node).
    A task panel can instead declare `defaultVolumes`, `required`, `applyTips` and
    `outputParameters` and write only `onApplyButton` (DeepMRIRegistration, for one).
    """

    _parameterNode: Any = None
    _parameterNodeGuiTag: Any = None
    # A task panel's declarations, used by the default prepareParameterNode, updatePanel and
    # showOutputs: parameters filled with the scene's first, second... volume; parameters Apply
    # needs, with Apply's tooltips when they are set and when not; parameter -> output key of
    # the node a finished run puts there.
    defaultVolumes: tuple[str, ...] = ()
    required: tuple[str, ...] = ()
    applyTips: tuple[str, str] = ("", "")
    outputParameters: dict[str, str] = {}

    def __init__(self, parent: Any = None) -> None:
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget
        from slicer.util import VTKObservationMixin

        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self) -> None:
        """A task panel's `setup` (the template's): the .ui named as the module file, the file's
        own `<module>Logic`, Apply connected to the widget's `onApplyButton`, entered."""
        from slicer.ScriptedLoadableModule import ScriptedLoadableModuleWidget

        ScriptedLoadableModuleWidget.setup(self)
        module_name = type(self).__module__
        # The module file's namespace, however Slicer loaded it.
        logic_class = type(self).onApplyButton.__globals__[f"{module_name}Logic"]
        self.setupPanel(module_name, logic_class())
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.enter()

    def setupPanel(self, module_name: str, logic: Any) -> None:
        import slicer

        ui_widget = slicer.util.loadUI(self.resourcePath(f"UI/{module_name}.ui"))
        self.layout.addWidget(ui_widget)
        self.ui = slicer.util.childWidgetVariables(ui_widget)
        ui_widget.setMRMLScene(slicer.mrmlScene)
        self.logic = logic
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.runner = JobRunner(self.ui.progressBar, self.ui.statusLabel, self.updatePanel)
        self.ui.cancelButton.connect("clicked(bool)", self.runner.cancel)
        scene = slicer.mrmlScene
        self.addObserver(scene, scene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(scene, scene.EndCloseEvent, self.onSceneEndClose)

    @property
    def parameters(self) -> Any:
        return self._parameterNode

    def cleanup(self) -> None:
        self.runner.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        # As the template: the panel stops following the node but keeps it (a job may finish).
        self._release()

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        self.runner.stop()  # its result would belong to a scene that no longer exists
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameters = self.logic.getParameterNode()
        self.prepareParameterNode(parameters)
        self.setParameterNode(parameters)

    def prepareParameterNode(self, parameters: Any) -> None:
        """Fill in what a fresh parameter node lacks: by default each of `defaultVolumes` not
        set gets the scene's next scalar volume (fixed the first, moving the second)."""
        import slicer

        volumes = [
            node
            for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
            if not node.IsA("vtkMRMLLabelMapVolumeNode")
        ]
        for name, volume in zip(self.defaultVolumes, volumes, strict=False):
            if not getattr(parameters, name):
                setattr(parameters, name, volume)

    def setParameterNode(self, parameters: Any) -> None:
        import vtk

        self._release()
        self._parameterNode = parameters
        if parameters is not None:
            self._parameterNodeGuiTag = parameters.connectGui(self.ui)
            self.addObserver(
                parameters, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
            self.updatePanel()

    def _release(self) -> None:
        """Disconnect the widgets from the parameter node and stop observing it."""
        import vtk

        if self._parameterNode is None:
            return
        if self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
        self.removeObserver(
            self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
        )

    def _onParameterNodeModified(self, caller: Any = None, event: Any = None) -> None:
        if self._parameterNode is not None:
            self.updatePanel()

    def updatePanel(self) -> None:
        """Bring what the GUI connector does not bind in step with the parameter node: by
        default Apply is enabled when every `required` parameter is set."""
        parameters = self.parameters
        ready = bool(parameters) and all(getattr(parameters, name) for name in self.required)
        self.enableStart(self.ui.applyButton, ready, self.applyTips[0 if ready else 1])

    def showOutputs(self, outputs: Any) -> None:
        """A finished run: its nodes into the `outputParameters`, its measures in the status."""
        if self.parameters:
            for name, key in self.outputParameters.items():
                setattr(self.parameters, name, outputs.nodes.get(key))
        self.showDone(outputs)

    def startTask(
        self,
        inputs: Any,
        on_success: Callable[[Any], None] | None = None,
        *,
        what: str,
        device: str | None = None,
        **run_arguments: Any,
    ) -> None:
        """Start the panel logic's task in the background with the saved settings (device,
        precision, threads, model folders; `device` from the panel overrides) and follow it.

        Dependencies are installed first if missing (after asking); `run_arguments` go to
        `TaskLogic.start` (options, `wanted`, `roi_node`); the new nodes are shown at the end,
        then `on_success(outputs)` runs (by default `showOutputs`).
        """
        import qt

        from DeepMRILib import deps
        from DeepMRILib.models import SavedSettings

        self.showStatus("Starting...")
        try:
            deps.ensure_dependencies()
            saved = SavedSettings.load(qt.QSettings())
            saved.apply_to(self.logic)  # settings and models changed in DeepMRI Models
            config = saved.run_config(device=device)
            job = self.logic.start(inputs, config=config, show=True, **run_arguments)
        except Exception as error:
            self.showError(what, error)
            return
        self.runner.start(job, on_success or self.showOutputs, what=what)

    # A model menu: the .ui's modelComboBox and modelDescriptionLabel, the parameter "model".
    _models: dict[str, dict[str, str]] = {}

    def populateModelMenu(self, card_task: str) -> None:
        """Fill the model menu with the usable models of `card_task` ("segmentation") from the
        store; signals blocked so the saved choice is kept."""
        import qt

        from DeepMRILib.models import ModelsLogic, SavedSettings

        try:
            models = ModelsLogic(SavedSettings.load(qt.QSettings())).models_for_task(card_task)
        except Exception as error:  # the panel must open even when the store cannot be read
            models = []
            self.showError("Models could not be listed", error)
        combo = self.ui.modelComboBox
        was_blocked = combo.blockSignals(True)
        combo.clear()
        for model in models:
            combo.addItem(model["title"], model["id"])
        combo.blockSignals(was_blocked)
        self._models = {model["id"]: model for model in models}
        if not models:
            self.ui.modelDescriptionLabel.text = (
                f"No {card_task} model is installed. Add one in the DeepMRI Models module."
            )

    def showModel(self, model_id: str) -> None:
        """Show `model_id` as the menu's choice and its description below it."""
        index = self.ui.modelComboBox.findData(model_id)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.setCurrentIndex(index)
        if model_id in self._models:
            self.ui.modelDescriptionLabel.text = self._models[model_id]["description"]

    def onModelChosen(self, index: int) -> None:
        model_id = self.ui.modelComboBox.itemData(index)
        if self._parameterNode is not None and model_id and model_id != self._parameterNode.model:
            self._parameterNode.model = model_id

    def enableStart(self, button: Any, ready: bool, tooltip: str) -> None:
        """The start button (Apply) when its inputs are `ready` and no job runs; Cancel while
        one runs."""
        button.enabled = ready and not self.runner.running
        button.toolTip = tooltip
        self.ui.cancelButton.enabled = self.runner.running

    def showDone(self, outputs: Any) -> None:
        """ "Done in 12 s. CSF 312 mL, ..." from a finished run's measures."""
        self.showStatus(f"Done in {self.runner.elapsed_s:.0f} s. {outputs.summary()}")

    def act(self, what: str, action: Callable[[], str | None]) -> None:
        """A quick action under a wait cursor; the message it returns, or its error, shown."""
        import slicer

        try:
            with slicer.util.WaitCursor():
                message = action()
        except Exception as error:
            self.showError(what, error)
            return
        if message:
            self.showStatus(message)

    def showStatus(self, text: str) -> None:
        self.runner.status(text)

    def showError(self, what: str, error: BaseException) -> None:
        self.runner.error(what, error)

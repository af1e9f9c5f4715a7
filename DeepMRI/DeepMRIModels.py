"""DeepMRI Models: the Slicer module that lists, imports, downloads and verifies DeepMRI's models.

It also holds the application-wide settings (default device, GPU precision, extra model folders)
that every DeepMRI module and its background workers use.
"""

import logging
import os
import pathlib
import queue
import threading
from typing import Annotated

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

DEVICES = ["auto", "cpu", "cuda", "mps"]
PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
# QSettings keys, and the environment variables through which background workers see them.
SETTINGS = {
    "device": ("DeepMRI/Device", "DEEPMRI_DEVICE"),
    "precision": ("DeepMRI/Precision", "DEEPMRI_PRECISION"),
    "extraModelPaths": ("DeepMRI/ModelPaths", "DEEPMRI_MODEL_PATH"),
}
TABLE_COLUMNS = [
    _("Model"),
    _("Version"),
    _("Task"),
    _("Licence"),
    _("Metrics"),
    _("Where"),
    _("Status"),
]
POLL_INTERVAL_MS = 200


class DeepMRIModels(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepMRI Models")
        self.parent.categories = ["DeepMRI"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepMRI developers"]
        self.parent.helpText = _("""
<p>Manages the deep learning models DeepMRI runs. The table lists every installed model with its
task, version, licence and the accuracy measured on its card; select one to read its full card
(labels, training data, how the metrics were measured, citation).</p>
<p><b>Inputs:</b> to add a model, give a TorchScript file (.pt) or ONNX file (.onnx) with a model
card (card.json: labels, preprocessing), a MONAI bundle (folder or zip), or a DeepMRI model folder;
or download one from a URL with its published SHA-256 checksum. <b>Verify</b> recomputes the
checksum of the weights and loads the model once.</p>
<p><b>Settings:</b> the default device (auto: a GPU when there is one), the precision used on GPUs,
and extra folders to search for models (for example a shared network folder). The cache folder
where downloaded and imported models are kept is shown and can be opened.</p>
<p><b>Limits:</b> imported models run exactly as their card describes; DeepMRI cannot check that a
card matches how the model was trained. Only load models from sources you trust.</p>
<p><b>How to cite:</b> cite DeepMRI and the citation given on each model's card.</p>
<p>User guide: Docs/user-guide-models.md in the extension's repository.</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI builds on 3D Slicer, MONAI (bundles and networks), PyTorch, ONNX Runtime and SimpleITK.
Model authors are credited on each model's card.
""")
        slicer.app.connect("startupCompleted()", applySavedSettings)


def applySavedSettings() -> None:
    """Hand the saved settings to this process's environment, which background workers inherit."""
    settings = qt.QSettings()
    for key, environment in SETTINGS.values():
        value = settings.value(key)
        if value and value != "auto":
            os.environ[environment] = str(value)
        else:
            os.environ.pop(environment, None)


@parameterNodeWrapper
class DeepMRIModelsParameterNode:
    """The panel's state; device, precision and model folders mirror the application settings.

    selectedModel - model id selected in the table. importPath/importCardPath - file or folder
    to import and its card. fetchUrl/fetchSha256 - download address and expected checksum.
    """

    selectedModel: str = ""
    importPath: pathlib.Path = pathlib.Path()
    importCardPath: pathlib.Path = pathlib.Path()
    fetchUrl: str = ""
    fetchSha256: str = ""
    device: Annotated[str, Choice(DEVICES)] = "auto"
    precision: Annotated[str, Choice(PRECISIONS)] = "auto"
    extraModelPaths: str = ""


def _isEmptyPath(path) -> bool:
    return path is None or str(path) in ("", ".")


class DeepMRIModelsWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node; downloads run in a thread polled by a timer."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._download = None
        self._timer = None
        self._rows = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepMRIModels.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepMRIModelsLogic()

        table = self.ui.modelsTable
        table.setColumnCount(len(TABLE_COLUMNS))
        table.setHorizontalHeaderLabels(TABLE_COLUMNS)
        table.horizontalHeader().setStretchLastSection(True)
        table.verticalHeader().hide()
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self.ui.cachePathLabel.text = str(self.logic.cacheFolder())
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollDownload)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        table.connect("itemSelectionChanged()", self.onModelSelected)
        self.ui.refreshButton.connect("clicked(bool)", self.refreshModels)
        self.ui.verifyButton.connect("clicked(bool)", self.onVerifyButton)
        self.ui.removeButton.connect("clicked(bool)", self.onRemoveButton)
        self.ui.importButton.connect("clicked(bool)", self.onImportButton)
        self.ui.fetchButton.connect("clicked(bool)", self.onFetchButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        self.ui.openCacheButton.connect("clicked(bool)", self.onOpenCache)

        self.initializeParameterNode()
        self.refreshModels()

    def cleanup(self) -> None:
        if self._download is not None:
            self._download.cancel()
        if self._timer is not None:
            self._timer.stop()
        self.removeObservers()

    def enter(self) -> None:
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        parameters = self.logic.getParameterNode()
        self.logic.loadSettings(parameters)
        self.setParameterNode(parameters)

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )
            self._onParameterNodeModified()

    def _onParameterNodeModified(self, caller=None, event=None) -> None:
        parameters = self._parameterNode
        if not parameters:
            return
        self.logic.saveSettings(parameters)
        downloading = self._download is not None
        selected = self._selectedRow()
        self.ui.verifyButton.enabled = selected is not None
        self.ui.removeButton.enabled = selected is not None and selected["removable"]
        self.ui.importButton.enabled = not _isEmptyPath(parameters.importPath)
        self.ui.fetchButton.enabled = bool(parameters.fetchUrl.strip()) and not downloading
        self.ui.cancelButton.enabled = downloading

    def refreshModels(self) -> None:
        """Fill the table from the model store (bundled, cache and extra folders)."""
        table = self.ui.modelsTable
        try:
            self._rows = self.logic.listModels()
        except Exception as error:
            self._rows = []
            self._showError(_("Models could not be listed"), error)
        table.setRowCount(len(self._rows))
        for rowIndex, row in enumerate(self._rows):
            values = [
                row["id"],
                row["version"],
                row["task"],
                row["license"],
                row["metrics"],
                row["source"],
            ]
            for column, value in enumerate(values):
                item = qt.QTableWidgetItem(str(value))
                item.setToolTip(str(row["path"]) if column == len(values) - 1 else str(value))
                table.setItem(rowIndex, column, item)
        table.resizeColumnsToContents()
        selectedId = self._parameterNode.selectedModel if self._parameterNode else ""
        for rowIndex, row in enumerate(self._rows):
            if row["id"] == selectedId:
                table.selectRow(rowIndex)
        self._onParameterNodeModified()

    def _selectedRow(self):
        selectedId = self._parameterNode.selectedModel if self._parameterNode else ""
        return next((row for row in self._rows if row["id"] == selectedId), None)

    def onModelSelected(self) -> None:
        rows = {index.row() for index in self.ui.modelsTable.selectedIndexes()}
        if not rows or not self._parameterNode:
            return
        row = self._rows[min(rows)]
        self._parameterNode.selectedModel = row["id"]
        self.ui.modelDetailsTextBrowser.setHtml(self.logic.cardHtml(row["id"]))

    def onVerifyButton(self) -> None:
        modelId = self._parameterNode.selectedModel
        try:
            with slicer.util.WaitCursor():
                message = self.logic.verify(modelId, device=self._parameterNode.device)
        except Exception as error:
            self._showError(_("Verification of {model} failed").format(model=modelId), error)
            return
        self._showStatus(message)

    def onRemoveButton(self) -> None:
        modelId = self._parameterNode.selectedModel
        question = _("Delete the model '{model}' from the cache?").format(model=modelId)
        if not slicer.util.confirmOkCancelDisplay(question, _("DeepMRI Models")):
            return
        try:
            self.logic.remove(modelId)
        except Exception as error:
            self._showError(_("Could not remove {model}").format(model=modelId), error)
            return
        self._parameterNode.selectedModel = ""
        self.ui.modelDetailsTextBrowser.clear()
        self.refreshModels()
        self._showStatus(_("Removed {model}.").format(model=modelId))

    def onImportButton(self) -> None:
        parameters = self._parameterNode
        card = None if _isEmptyPath(parameters.importCardPath) else parameters.importCardPath
        try:
            with slicer.util.WaitCursor():
                modelId = self.logic.importModel(parameters.importPath, card)
        except Exception as error:
            self._showError(_("Import failed"), error)
            return
        parameters.selectedModel = modelId
        self.refreshModels()
        self._showStatus(_("Imported {model}.").format(model=modelId))

    def onFetchButton(self) -> None:
        parameters = self._parameterNode
        url, sha256 = parameters.fetchUrl.strip(), parameters.fetchSha256.strip() or None
        self._download = BackgroundCall(
            lambda progress, cancel: self.logic.fetch(url, sha256, progress=progress, cancel=cancel)
        )
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._showStatus(_("Downloading {url}").format(url=url))
        self._onParameterNodeModified()
        self._timer.start()

    def onCancelButton(self) -> None:
        if self._download is not None:
            self._showStatus(_("Cancelling..."))
            self._download.cancel()

    def _pollDownload(self) -> None:
        download = self._download
        if download is None:
            self._timer.stop()
            return
        for fraction, message in download.poll():
            self.ui.progressBar.value = int(round(100 * fraction))
            self._showStatus(message)
        if not download.done:
            return
        self._timer.stop()
        self._download = None
        self.ui.progressBar.hide()
        self._onParameterNodeModified()
        from deepmri.errors import Cancelled

        try:
            modelId = download.result()
        except Cancelled:
            self._showStatus(_("Download cancelled; starting it again resumes it."))
            return
        except Exception as error:
            self._showError(_("Download failed"), error)
            return
        self._parameterNode.selectedModel = modelId
        self.refreshModels()
        self._showStatus(_("Downloaded and verified {model}.").format(model=modelId))

    def onDetectDevices(self) -> None:
        try:
            with slicer.util.WaitCursor():
                self.ui.devicesLabel.text = self.logic.detectDevices()
        except Exception as error:
            self._showError(_("Devices could not be detected"), error)

    def onOpenCache(self) -> None:
        folder = self.logic.cacheFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.setStyleSheet("")
        self.ui.statusLabel.text = text

    def _showError(self, what: str, error: Exception) -> None:
        logging.error("DeepMRI Models: %s: %s", what, error, exc_info=error)
        self.ui.statusLabel.setStyleSheet("color: #c0392b")
        self.ui.statusLabel.text = f"{what}: {error}"


class BackgroundCall:
    """Runs `function(progress, cancel)` in a thread (I/O-bound work such as a download).

    The GUI thread polls progress events and the result; cancel sets a token the function checks.
    """

    def __init__(self, function) -> None:
        from deepmri.progress import CancelToken

        self._events = queue.Queue()
        self._token = CancelToken()
        self._result = None
        self._error = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function) -> None:
        try:
            self._result = function(
                lambda fraction, message: self._events.put((fraction, message)), self._token
            )
        except BaseException as error:  # handed to the GUI thread, which reports it
            self._error = error

    def poll(self) -> list:
        events = []
        while not self._events.empty():
            events.append(self._events.get_nowait())
        return events

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def cancel(self) -> None:
        self._token.cancel()

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._result


class DeepMRIModelsLogic(ScriptedLoadableModuleLogic):
    """Model management for the panel and the Python console, on top of `deepmri.models`.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRIModels")
        [row["id"] for row in logic.listModels()]
        logic.verify("brain-tissue")
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepMRIModelsParameterNode(super().getParameterNode())

    @staticmethod
    def loadSettings(parameters) -> None:
        settings = qt.QSettings()
        allowed = {"device": DEVICES, "precision": PRECISIONS}
        for name, (key, _environment) in SETTINGS.items():
            value = settings.value(key)
            if value is None or (name in allowed and value not in allowed[name]):
                continue  # never saved, or saved by a version with other choices
            if getattr(parameters, name) != value:
                setattr(parameters, name, str(value))

    @staticmethod
    def saveSettings(parameters) -> None:
        settings = qt.QSettings()
        changed = False
        for name, (key, _environment) in SETTINGS.items():
            value = str(getattr(parameters, name))
            if settings.value(key) != value:
                settings.setValue(key, value)
                changed = True
        if changed:
            applySavedSettings()

    @staticmethod
    def store():
        """The model store with the saved extra folders (the environment carries them)."""
        from deepmri.models import ModelStore
        from deepmri.settings import Settings

        return ModelStore(settings=Settings.from_environment())

    @staticmethod
    def cacheFolder() -> pathlib.Path:
        from deepmri.settings import Settings

        return Settings.from_environment().model_cache

    def listModels(self) -> list:
        """One row per model: id, version, task, licence, metrics, where it is, status, path."""
        rows = []
        for info in self.store().list():
            card = info.card.to_dict() if info.card is not None else {}
            where = {"bundled": _("bundled"), "cache": _("cache"), "extra": _("folder")}
            rows.append(
                {
                    "id": info.id,
                    "version": info.version,
                    "task": info.task,
                    "license": info.license,
                    "metrics": _metricsText(card.get("metrics", [])),
                    "source": where.get(info.source, info.source),
                    "status": info.status,
                    "path": info.path,
                    "removable": info.source == "cache",
                }
            )
        return sorted(rows, key=lambda row: row["id"])

    def card(self, modelId: str) -> dict:
        return self.store().get(modelId).card.to_dict()

    def cardHtml(self, modelId: str) -> str:
        """The card as a short HTML page for the details box."""
        import html

        try:
            card = self.card(modelId)
        except Exception as error:
            return f"<p style='color:#c0392b'>{html.escape(str(error))}</p>"

        def escape(value) -> str:
            return html.escape(str(value))

        parts = [f"<h3>{escape(card['id'])} {escape(card.get('version', ''))}</h3>"]
        labels = "".join(
            f"<li><span style='color:{_hexColor(label.get('color'))}'>&#9632;</span> "
            f"{escape(label['value'])}: {escape(label['name'])}</li>"
            for label in card.get("labels", [])
        )
        parts.append(f"<p><b>{_('Labels')}</b></p><ul>{labels}</ul>")
        contrasts = ", ".join(card.get("input", {}).get("contrasts", [])) or _("any")
        preprocessing = card.get("preprocessing", {})
        parts.append(
            f"<p><b>{_('Input')}</b>: {escape(contrasts)}; "
            f"{_('resampled to')} {escape(preprocessing.get('spacing', '?'))} mm, "
            f"{escape(preprocessing.get('orientation', ''))}</p>"
        )
        metrics = "".join(
            f"<li>{escape(m.get('name'))} = {escape(m.get('value'))} ({escape(m.get('dataset', ''))})"
            f"<br/><code>{escape(m.get('command', ''))}</code></li>"
            for m in card.get("metrics", [])
        )
        parts.append(f"<p><b>{_('Measured accuracy')}</b></p><ul>{metrics or '<li>-</li>'}</ul>")
        training = card.get("training", {})
        parts.append(
            f"<p><b>{_('Training data')}</b>: {escape(training.get('data', _('not stated')))}</p>"
        )
        parts.append(
            f"<p><b>{_('Licence')}</b>: {escape(card.get('license', _('not stated')))}</p>"
        )
        parts.append(
            f"<p><b>{_('Citation')}</b>: {escape(card.get('citation', _('not stated')))}</p>"
        )
        return "".join(parts)

    def verify(self, modelId: str, device: str = "auto") -> str:
        """Check the weights' size and checksum against the card, then load the network once."""
        model = self.store().get(modelId)
        model.verify()
        network = model.load_network(device=None if device in (None, "", "auto") else device)
        parameters = sum(parameter.numel() for parameter in network.parameters())
        return _("{model}: checksum verified, network loaded ({count:,} parameters).").format(
            model=modelId, count=parameters
        )

    def importModel(self, path, card=None) -> str:
        """Import a DeepMRI model folder, a MONAI bundle, or a TorchScript/ONNX file with `card`.

        The model is copied into the cache and loaded once before it is listed; returns its id.
        A network file without a complete card fails with the list of fields to fill in.
        """
        from deepmri.models import importers

        model = importers.import_model(
            pathlib.Path(path),
            self.cacheFolder(),
            card=None if card is None else pathlib.Path(card),
        )
        return model.card.id

    def fetch(self, url: str, sha256=None, progress=None, cancel=None) -> str:
        """Download a model (resumable, checksum-checked) into the cache; returns its id."""
        from deepmri.models.fetch import fetch_model

        model = fetch_model(
            url, self.cacheFolder(), sha256=sha256, progress=progress, cancel=cancel
        )
        return model.card.id

    def remove(self, modelId: str) -> None:
        """Delete a model from the user's cache (bundled models are read-only)."""
        self.store().remove(modelId)

    @staticmethod
    def detectDevices() -> str:
        """Which devices PyTorch sees here, as one readable line."""
        import torch

        found = ["CPU"]
        if torch.cuda.is_available():
            found += [
                f"CUDA {i}: {torch.cuda.get_device_name(i)}"
                for i in range(torch.cuda.device_count())
            ]
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            found.append("Apple MPS")
        return _("PyTorch {version} can use: {devices}").format(
            version=torch.__version__, devices=", ".join(found)
        )


def _metricsText(metrics) -> str:
    return "; ".join(f"{m.get('name')} {m.get('value')}" for m in metrics[:3])


def _hexColor(color) -> str:
    if not color:
        return "#888888"
    return "#" + "".join(f"{int(round(255 * float(c))):02x}" for c in list(color)[:3])


class DeepMRIModelsTest(ScriptedLoadableModuleTest):
    """Self-test: bundled models listed and verified, a TorchScript import run on MRHead, removed."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_bundled_models_are_listed_with_their_cards,
            self.test_bundled_model_verifies,
            self.test_imported_torchscript_model_segments_mrhead_and_can_be_removed,
            self.test_model_fetched_from_a_loopback_server_is_verified_and_listed,
            self.test_panel_shows_the_models_table,
        ):
            self.setUp()
            test()

    def test_bundled_models_are_listed_with_their_cards(self):
        rows = {row["id"]: row for row in DeepMRIModelsLogic().listModels()}
        for modelId in ("brain-extraction", "brain-tissue"):
            self.assertIn(modelId, rows)
            self.assertEqual(rows[modelId]["source"], "bundled")
            self.assertTrue(rows[modelId]["license"])
            self.assertTrue(rows[modelId]["metrics"])
        self.delayDisplay("Bundled models listed")

    def test_bundled_model_verifies(self):
        message = DeepMRIModelsLogic().verify("brain-extraction", device="cpu")
        self.assertIn("verified", message)
        self.delayDisplay(message)

    def test_imported_torchscript_model_segments_mrhead_and_can_be_removed(self):
        import json
        import tempfile

        import SampleData
        import torch

        logic = DeepMRIModelsLogic()
        bundled = logic.store().get("brain-extraction")
        network = bundled.load_network(device="cpu")
        with tempfile.TemporaryDirectory() as folder:
            card = logic.card("brain-extraction")
            card["id"] = "selftest-imported-brain"
            cardPath = pathlib.Path(folder) / "card.json"
            cardPath.write_text(json.dumps(card))
            scripted = pathlib.Path(folder) / "model.pt"
            channels = int(card.get("input", {}).get("channels", 1))
            example = torch.zeros(1, channels, *card["inference"]["patch_size"])
            with torch.no_grad():
                torch.jit.trace(network.cpu().eval(), example).save(str(scripted))
            modelId = logic.importModel(scripted, cardPath)
        try:
            self.assertEqual(modelId, "selftest-imported-brain")
            self.assertIn(modelId, [row["id"] for row in logic.listModels()])
            volume = SampleData.downloadSample("MRHead")
            segmentationLogic = slicer.util.getModuleLogic("DeepMRISegmentation")
            outputs = segmentationLogic.process(volume, modelId, device="cpu", show=False)
            self.assertGreater(outputs.segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        finally:
            logic.remove("selftest-imported-brain")
        self.assertNotIn("selftest-imported-brain", [row["id"] for row in logic.listModels()])
        self.delayDisplay("Imported model ran on MRHead and was removed")

    def test_model_fetched_from_a_loopback_server_is_verified_and_listed(self):
        import functools
        import http.server
        import json
        import tempfile
        import zipfile

        from deepmri.models import sha256_of

        logic = DeepMRIModelsLogic()
        bundled = logic.store().get("brain-extraction")
        with tempfile.TemporaryDirectory() as folder:
            archive = pathlib.Path(folder) / "selftest-fetched-brain.zip"
            card = bundled.card.to_dict()
            card["id"] = "selftest-fetched-brain"
            with zipfile.ZipFile(archive, "w") as bundle:
                bundle.writestr("selftest-fetched-brain/card.json", json.dumps(card))
                bundle.write(
                    bundled.weights_path, f"selftest-fetched-brain/{bundled.weights_path.name}"
                )
            handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=folder)
            server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            try:
                url = f"http://127.0.0.1:{server.server_address[1]}/{archive.name}"
                events = []
                call = BackgroundCall(
                    lambda progress, cancel: logic.fetch(
                        url, sha256_of(archive), progress=progress, cancel=cancel
                    )
                )
                while not call.done:
                    events.extend(call.poll())
                    slicer.app.processEvents()
                modelId = call.result()
            finally:
                server.shutdown()
        try:
            self.assertEqual(modelId, "selftest-fetched-brain")
            self.assertTrue(events)
            rows = {row["id"]: row for row in logic.listModels()}
            self.assertEqual(rows[modelId]["source"], "cache")
            self.assertIn("verified", logic.verify(modelId, device="cpu"))
        finally:
            logic.remove(modelId)
        self.delayDisplay("Fetched model verified, listed and removed")

    def test_panel_shows_the_models_table(self):
        slicer.util.selectModule("DeepMRIModels")
        widget = slicer.util.getModuleWidget("DeepMRIModels")
        widget.refreshModels()
        self.assertGreaterEqual(widget.ui.modelsTable.rowCount, 2)
        widget.ui.modelsTable.selectRow(0)
        self.assertIn("Labels", widget.ui.modelDetailsTextBrowser.toPlainText())
        self.delayDisplay("Models panel test passed")

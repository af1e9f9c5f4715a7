"""DeepMRI Models: the Slicer module that lists, imports, downloads and verifies DeepMRI's models.

It also holds the application-wide settings (default device, GPU precision, CPU threads, extra
model folders) that every DeepMRI module passes to its runs; the work is in DeepMRILib.models.
"""

import pathlib
from typing import Annotated

import qt
import slicer
from DeepMRILib.models import DEVICES, ModelsLogic, SavedSettings
from DeepMRILib.widgets import (
    PanelMixin,
    ParameterNodeLogic,
    fill_table,
    is_empty_path,
    run_self_tests,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

PRECISIONS = ["auto", "fp32", "fp16", "bf16"]
TABLE_COLUMNS = ["id", "version", "task", "license", "metrics", "source"]
TABLE_HEADERS = [_("Model"), _("Version"), _("Task"), _("Licence"), _("Metrics"), _("Where")]


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
the processor threads, and extra folders to search for models (a shared network folder, say);
every DeepMRI module runs with them. The model cache folder is shown and can be opened.</p>
<p><b>Limits:</b> imported models run exactly as their card describes; DeepMRI cannot check that a
card matches how the model was trained. Only load models from sources you trust.</p>
<p><b>How to cite:</b> cite DeepMRI and the citation given on each model's card. User guide:
Docs/user-guide-models.md in the extension's repository.</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI builds on 3D Slicer, MONAI (bundles and networks), PyTorch, ONNX Runtime and SimpleITK.
Model authors are credited on each model's card.
""")


@parameterNodeWrapper
class DeepMRIModelsParameterNode:
    """The panel's state; device, precision, threads and model folders mirror the saved settings.

    selectedModel - model id selected in the table. importPath/importCardPath - file or folder
    to import and its card. fetchUrl/fetchSha256 - download address and expected checksum.
    """

    selectedModel: str = ""
    importPath: pathlib.Path = pathlib.Path()
    importCardPath: pathlib.Path = pathlib.Path()
    fetchUrl: str = ""
    fetchSha256: str = ""
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    precision: Annotated[str, Choice(PRECISIONS)] = "auto"
    threads: int = 0
    extraModelPaths: str = ""


class DeepMRIModelsWidget(PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node; downloads run in a thread the panel follows."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self._rows = []

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel("DeepMRIModels", DeepMRIModelsLogic())
        self.ui.cachePathLabel.text = str(self.logic.cache_folder())
        self.ui.modelsTable.connect("itemSelectionChanged()", self.onModelSelected)
        self.ui.refreshButton.connect("clicked(bool)", self.refreshModels)
        self.ui.verifyButton.connect("clicked(bool)", self.onVerifyButton)
        self.ui.removeButton.connect("clicked(bool)", self.onRemoveButton)
        self.ui.importButton.connect("clicked(bool)", self.onImportButton)
        self.ui.fetchButton.connect("clicked(bool)", self.onFetchButton)
        self.ui.detectDevicesButton.connect("clicked(bool)", self.onDetectDevices)
        self.ui.openCacheButton.connect("clicked(bool)", self.onOpenCache)
        self.initializeParameterNode()
        self.refreshModels()

    def prepareParameterNode(self, parameters) -> None:
        SavedSettings.load(qt.QSettings()).to_parameters(parameters)

    def updatePanel(self) -> None:
        """Save the settings shown, and enable the buttons that can act now."""
        parameters = self.parameters
        if not parameters:
            return
        self.logic.saved = SavedSettings.from_parameters(parameters)
        self.logic.saved.save(qt.QSettings())
        selected = next((r for r in self._rows if r["id"] == parameters.selectedModel), None)
        self.ui.verifyButton.enabled = selected is not None
        self.ui.removeButton.enabled = selected is not None and selected["removable"]
        self.ui.importButton.enabled = not is_empty_path(parameters.importPath)
        fetchable = bool(parameters.fetchUrl.strip())
        self.enableStart(self.ui.fetchButton, fetchable, _("Download and verify the model."))

    def refreshModels(self) -> None:
        """Fill the table from the model store (bundled, cache and extra folders)."""
        try:
            self._rows = self.logic.list_models()
        except Exception as error:
            self._rows = []
            self.showError(_("Models could not be listed"), error)
        selected = self.parameters.selectedModel if self.parameters else None
        fill_table(self.ui.modelsTable, TABLE_HEADERS, self._rows, TABLE_COLUMNS, selected)
        self.updatePanel()

    def onModelSelected(self) -> None:
        rows = {index.row() for index in self.ui.modelsTable.selectedIndexes()}
        if rows and self.parameters:
            modelId = self._rows[min(rows)]["id"]
            self.parameters.selectedModel = modelId
            self.ui.modelDetailsTextBrowser.setHtml(self.logic.card_html(modelId))

    def _installed(self, modelId: str) -> None:
        """List the models again with `modelId` selected ("" after a removal) and say so."""
        self.parameters.selectedModel = modelId
        self.ui.modelDetailsTextBrowser.clear()
        self.refreshModels()
        installed = _("{model} is installed and verified.").format(model=modelId)
        self.showStatus(installed if modelId else _("Removed."))

    def onVerifyButton(self) -> None:
        modelId = self.parameters.selectedModel
        what = _("Verification of {model} failed").format(model=modelId)
        self.act(what, lambda: self.logic.verify(modelId))

    def onRemoveButton(self) -> None:
        modelId = self.parameters.selectedModel
        question = _("Delete the model '{model}' from the cache?").format(model=modelId)
        if slicer.util.confirmOkCancelDisplay(question, _("DeepMRI Models")):
            what = _("Could not remove {model}").format(model=modelId)
            self.act(what, lambda: self._installed(self.logic.remove(modelId) or ""))

    def onImportButton(self) -> None:
        path, card = self.parameters.importPath, self.parameters.importCardPath
        card = None if is_empty_path(card) else card
        self.act(_("Import failed"), lambda: self._installed(self.logic.import_model(path, card)))

    def onFetchButton(self) -> None:
        url, sha256 = self.parameters.fetchUrl.strip(), self.parameters.fetchSha256.strip()
        self.showStatus(_("Downloading {url}").format(url=url))
        self.runner.start(
            self.logic.start_fetch(url, sha256 or None),
            self._installed,
            what=_("Download failed"),
            cancelled_text=_("Download cancelled; starting it again resumes it."),
        )

    def onDetectDevices(self) -> None:
        self.act(_("Devices could not be detected"), self.logic.detect_devices)

    def onOpenCache(self) -> None:
        self.act(_("Could not open the cache folder"), self.logic.open_cache_folder)


class DeepMRIModelsLogic(ParameterNodeLogic, ScriptedLoadableModuleLogic, ModelsLogic):
    """DeepMRILib.models.ModelsLogic with the saved settings. Python console:
    `logic = slicer.util.getModuleLogic("DeepMRIModels"); logic.verify("brain-tissue")`."""

    parameterNodeClass = DeepMRIModelsParameterNode

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        ModelsLogic.__init__(self, SavedSettings.load(qt.QSettings()))


class DeepMRIModelsTest(ScriptedLoadableModuleTest):
    """Self-test: the panel lists and verifies the bundled models; a TorchScript import runs."""

    def runTest(self):
        run_self_tests(
            self,
            (
                self.test_panel_lists_the_bundled_models_and_verifies_one,
                self.test_imported_torchscript_model_segments_mrhead_and_can_be_removed,
            ),
        )

    def test_panel_lists_the_bundled_models_and_verifies_one(self):
        slicer.util.selectModule("DeepMRIModels")
        widget = slicer.util.getModuleWidget("DeepMRIModels")
        widget.refreshModels()
        rows = {row["id"]: row for row in widget.logic.list_models()}
        for modelId in ("brain-extraction", "brain-tissue"):
            self.assertEqual(rows[modelId]["source"], "bundled")
            self.assertTrue(rows[modelId]["license"] and rows[modelId]["metrics"])
        widget.ui.modelsTable.selectRow(list(rows).index("brain-extraction"))
        self.assertIn("Labels", widget.ui.modelDetailsTextBrowser.toPlainText())
        widget.ui.verifyButton.click()
        self.assertIn("checksum verified", widget.ui.statusLabel.text)
        self.delayDisplay(widget.ui.statusLabel.text)

    def test_imported_torchscript_model_segments_mrhead_and_can_be_removed(self):
        import json
        import tempfile

        import SampleData
        import torch
        from deepmri.runconfig import RunConfig

        logic, modelId = DeepMRIModelsLogic(), "selftest-imported-brain"
        network = logic.store().get("brain-extraction").load_network(device="cpu").eval()
        card = {**logic.card("brain-extraction"), "id": modelId}
        with tempfile.TemporaryDirectory() as folder:
            cardPath, scripted = pathlib.Path(folder, "card.json"), pathlib.Path(folder, "m.pt")
            cardPath.write_text(json.dumps(card))
            example = torch.zeros(1, 1, *card["inference"]["patch_size"])
            with torch.no_grad():
                torch.jit.trace(network, example).save(str(scripted))
            self.assertEqual(logic.import_model(scripted, cardPath), modelId)
        try:
            volume = SampleData.downloadSample("MRHead")
            segmentation = slicer.util.getModuleLogic("DeepMRISegmentation")
            outputs = segmentation.run(volume, model=modelId, config=RunConfig("cpu"))
            self.assertGreater(outputs.segmentation.GetSegmentation().GetNumberOfSegments(), 0)
        finally:
            logic.remove(modelId)
        self.assertNotIn(modelId, [row["id"] for row in logic.list_models()])

"""DeepMRI Segmentation: the Slicer module that segments a brain MRI into named, coloured segments.

Module metadata, parameter node, widget (binds the .ui, runs a background job), logic (callable from
the Python console with plain arguments) and the self-test on Slicer's MRHead sample.
"""

import json
import logging
import time
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
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
DEFAULT_MODEL = "brain-tissue"
# Probability and uncertainty volumes carry this attribute so the overlay selector lists only them.
OVERLAY_ATTRIBUTE = "DeepMRI.overlay"
POLL_INTERVAL_MS = 200


class DeepMRISegmentation(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepMRI Segmentation")
        self.parent.categories = ["DeepMRI"]
        self.parent.dependencies = ["Segmentations", "Markups"]
        self.parent.contributors = ["DeepMRI developers"]
        self.parent.helpText = _("""
<p>Segments a 3D brain MRI with a deep learning model: <b>brain tissue</b> (cerebrospinal fluid,
grey matter, white matter; the brain is extracted first) or <b>brain extraction</b> (brain mask).
The result is a new segmentation with one named, coloured segment per structure, shown over the
input in the slice views and as a 3D surface. Optional outputs: a probability map per structure
and an uncertainty map (how much the prediction changes when the image is mirrored).</p>
<p><b>Input:</b> one 3D MRI volume of the head or brain, any contrast (T1, T2, FLAIR, PD),
resolution and orientation; whole-head and skull-stripped scans both work. Optionally a markups
ROI (box) to segment only the region inside it. The input is never modified.</p>
<p><b>Limits:</b> models are trained on a small number of adult brains (see each model's card in
the DeepMRI Models module: training data, measured accuracy, licence). Results on children,
large lesions, strong artefacts or non-brain anatomy are not validated. This is research
software, not a medical device: check every result before use.</p>
<p><b>How to cite:</b> cite DeepMRI and the citation on the model's card (DeepMRI Models).</p>
<p>User guide: Docs/user-guide-segmentation.md in the extension's repository.</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI builds on 3D Slicer, MONAI, PyTorch, TorchIO and SimpleITK. Bundled models were trained on
the MNI ICBM152 2009a template (McConnell Brain Imaging Centre, Montreal Neurological Institute)
and other openly licensed data named on each model card.
""")


@parameterNodeWrapper
class DeepMRISegmentationParameterNode:
    """Everything the module panel shows; saved with the scene.

    inputVolume - the MRI to segment. model - the model id. roi - optional box limiting the region.
    device - where to run (auto, cpu, cuda, mps). probabilities/uncertainty - extra outputs.
    outputSegmentation - the latest result. overlayVolume/showOverlay - a probability or
    uncertainty map shown over the input in the slice views.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULT_MODEL
    roi: vtkMRMLMarkupsROINode
    device: Annotated[str, Choice(DEVICES)] = "auto"
    probabilities: bool = False
    uncertainty: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    overlayVolume: vtkMRMLScalarVolumeNode
    showOverlay: bool = False


class DeepMRISegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and runs segmentation as a background job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._jobStarted = 0.0
        self._timer = None

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepMRISegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = DeepMRISegmentationLogic()

        self.ui.overlayVolumeSelector.addAttribute(
            "vtkMRMLScalarVolumeNode", OVERLAY_ATTRIBUTE, "1"
        )
        self.ui.progressBar.setRange(0, 100)
        self.ui.progressBar.hide()
        self._timer = qt.QTimer()
        self._timer.setInterval(POLL_INTERVAL_MS)
        self._timer.connect("timeout()", self._pollJob)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancelButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)

        self._populateModels()
        self.initializeParameterNode()

    def cleanup(self) -> None:
        self._stopJob()
        self.removeObservers()

    def enter(self) -> None:
        self._populateModels()  # models imported in DeepMRI Models since the last visit
        self.initializeParameterNode()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._onParameterNodeModified
            )

    def onSceneStartClose(self, caller, event) -> None:
        self._stopJob()  # its result would belong to a scene that no longer exists
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

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
        """Keep the parts the GUI connector cannot bind in step: model list, Apply state, overlay."""
        parameters = self._parameterNode
        if not parameters:
            return
        index = self.ui.modelComboBox.findData(parameters.model)
        if index >= 0 and index != self.ui.modelComboBox.currentIndex:
            self.ui.modelComboBox.setCurrentIndex(index)
        self._describeModel(parameters.model)
        self._updateApplyButton()
        self.logic.showOverlay(parameters.overlayVolume, parameters.showOverlay)

    def _populateModels(self) -> None:
        """Fill the model menu from the store; signals blocked so the saved choice is kept."""
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        try:
            combo.clear()
            try:
                models = self.logic.availableModels()
            except Exception as error:  # the panel must open even when the store cannot be read
                logging.exception("DeepMRI: listing models failed")
                self._models = {}
                self.ui.modelDescriptionLabel.text = _(
                    "Models could not be listed: {error}"
                ).format(error=error)
                return
            self._models = {model["id"]: model for model in models}
            for model in models:
                combo.addItem(model["title"], model["id"])
            if not models:
                self.ui.modelDescriptionLabel.text = _(
                    "No segmentation model is installed. Add one in the DeepMRI Models module."
                )
        finally:
            combo.blockSignals(wasBlocked)
        if self._parameterNode:
            self._onParameterNodeModified()

    def onModelChosen(self, index: int) -> None:
        modelId = self.ui.modelComboBox.itemData(index)
        if self._parameterNode and modelId and modelId != self._parameterNode.model:
            self._parameterNode.model = modelId

    def _describeModel(self, modelId: str) -> None:
        model = getattr(self, "_models", {}).get(modelId)
        if model:
            self.ui.modelDescriptionLabel.text = model["description"]

    def _updateApplyButton(self) -> None:
        parameters = self._parameterNode
        running = self._job is not None
        ready = bool(parameters and parameters.inputVolume and parameters.model)
        self.ui.applyButton.enabled = ready and not running
        self.ui.cancelButton.enabled = running
        self.ui.applyButton.toolTip = (
            _("Segment the input volume with the selected model.")
            if ready
            else _("Select an input volume and a model first.")
        )

    def onApplyButton(self) -> None:
        parameters = self._parameterNode
        self._showStatus(_("Starting..."))
        try:
            self.logic.ensureDependencies()
            self._job = self.logic.start(
                parameters.inputVolume,
                parameters.model,
                device=parameters.device,
                roi=parameters.roi,
                probabilities=parameters.probabilities,
                uncertainty=parameters.uncertainty,
            )
        except Exception as error:
            self._showError(error)
            return
        self._jobStarted = time.monotonic()
        self.ui.progressBar.value = 0
        self.ui.progressBar.show()
        self._updateApplyButton()
        self._timer.start()

    def onCancelButton(self) -> None:
        if self._job is not None:
            self._showStatus(_("Cancelling..."))
            self._job.cancel()  # the next poll sees it ended and reports it

    def _pollJob(self) -> None:
        job = self._job
        if job is None:
            self._timer.stop()
            return
        for event in job.poll():
            self.ui.progressBar.value = int(round(100 * event.fraction))
            self._showStatus(event.message)
        if not job.done:
            return
        self._timer.stop()
        self._job = None
        self.ui.progressBar.hide()
        self._updateApplyButton()
        self._finishJob(job)

    def _finishJob(self, job) -> None:
        from deepmri.errors import Cancelled

        parameters = self._parameterNode
        try:
            with slicer.util.WaitCursor():
                outputs = job.finish()
        except Cancelled:
            self._showStatus(_("Cancelled. Nothing was added to the scene."))
            return
        except Exception as error:
            self._showError(error)
            return
        inputVolume = parameters.inputVolume if parameters else None
        self.logic.showResults(outputs, inputVolume)
        if parameters:
            parameters.outputSegmentation = outputs.segmentation
            overlays = [*outputs.probabilities.values(), outputs.uncertainty]
            parameters.overlayVolume = next((node for node in overlays if node is not None), None)
        seconds = time.monotonic() - self._jobStarted
        self._showStatus(
            _("Done in {seconds:.0f} s. {volumes}").format(
                seconds=seconds, volumes=self.logic.volumesText(outputs)
            )
        )

    def _stopJob(self) -> None:
        if self._timer is not None:
            self._timer.stop()
        if self._job is not None:
            self._job.cancel()
            self._job = None

    def _showStatus(self, text: str) -> None:
        self.ui.statusLabel.setStyleSheet("")
        self.ui.statusLabel.text = text

    def _showError(self, error: Exception) -> None:
        """The error in the panel, in red, with what to do next; the full trace goes to the log."""
        logging.error("DeepMRI segmentation failed: %s", error, exc_info=error)
        self.ui.statusLabel.setStyleSheet("color: #c0392b")
        self.ui.statusLabel.text = _("Segmentation failed: {error}").format(error=error)


class DeepMRISegmentationLogic(ScriptedLoadableModuleLogic):
    """Segmentation for the panel and the Python console; computation lives in DeepMRILib and deepmri.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRISegmentation")
        outputs = logic.process(slicer.util.getNode("MRHead"), "brain-tissue")
        outputs.segmentation  # the new vtkMRMLSegmentationNode
    """

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepMRISegmentationParameterNode(super().getParameterNode())

    @staticmethod
    def _library():
        from DeepMRILib.segmentation import SegmentationLogic

        return SegmentationLogic()

    @staticmethod
    def _device(device):
        """None for "auto": the worker then uses the default device of the DeepMRI Models settings
        (DEEPMRI_DEVICE), else the best one available."""
        return None if device in (None, "", "auto") else device

    def ensureDependencies(self) -> None:
        """Install PyTorch, MONAI and the rest on first use, after asking (DeepMRILib.deps)."""
        from DeepMRILib import deps

        deps.ensure_dependencies()

    def availableModels(self) -> list:
        """Segmentation models the store finds: id, a title for the menu, a one-line description."""
        from deepmri.models import ModelStore

        models = []
        for info in ModelStore().list():
            if info.card is None or info.status != "ok" or info.task != "segmentation":
                continue  # listed with the reason in the DeepMRI Models module
            card = info.card.to_dict()
            labels = ", ".join(label["name"] for label in card.get("labels", []))
            title = card["id"].replace("-", " ").capitalize()
            description = _("{title} v{version}: {labels}. Licence: {license}.").format(
                title=title,
                version=card.get("version", "?"),
                labels=labels or _("no labels listed"),
                license=card.get("license", _("not stated")),
            )
            models.append({"id": card["id"], "title": title, "description": description})
        return sorted(models, key=lambda model: (model["id"] != DEFAULT_MODEL, model["id"]))

    def process(
        self,
        inputVolume,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        roi=None,
        probabilities: bool = False,
        uncertainty: bool = False,
        show: bool = True,
        progress=None,
        cancel=None,
    ):
        """Segment in this process and wait (console and tests); returns DeepMRILib's outputs."""
        if not inputVolume:
            raise ValueError("Select an input volume to segment.")
        startTime = time.time()
        outputs = self._library().run(
            inputVolume,
            model,
            device=self._device(device),
            roi_node=roi,
            probabilities=probabilities,
            uncertainty=uncertainty,
            progress=progress,
            cancel=cancel,
        )
        self.markOverlays(outputs)
        if show:
            self.showResults(outputs, inputVolume)
        logging.info(f"DeepMRI segmentation finished in {time.time() - startTime:.1f} s")
        return outputs

    def start(
        self,
        inputVolume,
        model: str = DEFAULT_MODEL,
        device: str = "auto",
        roi=None,
        probabilities: bool = False,
        uncertainty: bool = False,
    ):
        """Start segmenting in a background process; returns a job to poll, cancel and finish."""
        if not inputVolume:
            raise ValueError("Select an input volume to segment.")
        job = self._library().start(
            inputVolume,
            model,
            device=self._device(device),
            roi_node=roi,
            probabilities=probabilities,
            uncertainty=uncertainty,
        )
        return _MarkingJob(job, self)

    @staticmethod
    def markOverlays(outputs) -> None:
        for node in [*outputs.probabilities.values(), outputs.uncertainty]:
            if node is not None:
                node.SetAttribute(OVERLAY_ATTRIBUTE, "1")

    @staticmethod
    def showResults(outputs, inputVolume) -> None:
        """Segmentation over the input in the slice views and as a 3D surface; camera on it."""
        segmentation = outputs.segmentation
        segmentation.CreateClosedSurfaceRepresentation()
        display = segmentation.GetDisplayNode()
        if display is not None:
            display.SetVisibility(True)
            display.SetVisibility2DFill(True)
            display.SetVisibility2DOutline(True)
        if inputVolume is not None:
            slicer.util.setSliceViewerLayers(background=inputVolume, fit=False)
        layoutManager = slicer.app.layoutManager()
        if layoutManager is not None and layoutManager.threeDViewCount > 0:
            threeDView = layoutManager.threeDWidget(0).threeDView()
            threeDView.resetFocalPoint()

    @staticmethod
    def showOverlay(volume, show: bool) -> None:
        """A probability (0..1, Iron colours) or uncertainty map half-transparent over the input."""
        if not show or volume is None:
            compositeNodes = slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")
            if any(node.GetForegroundVolumeID() for node in compositeNodes):
                shown = {node.GetForegroundVolumeID() for node in compositeNodes}
                ours = [slicer.mrmlScene.GetNodeByID(nodeId) for nodeId in shown if nodeId]
                if all(node is not None and node.GetAttribute(OVERLAY_ATTRIBUTE) for node in ours):
                    slicer.util.setSliceViewerLayers(foreground=None)
            return
        display = volume.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeIron")
            if "probability" in volume.GetName():
                display.AutoWindowLevelOff()
                display.SetWindowLevelMinMax(0.0, 1.0)
        slicer.util.setSliceViewerLayers(foreground=volume, foregroundOpacity=0.5, fit=False)

    @staticmethod
    def volumesText(outputs) -> str:
        """'CSF 312 mL, Grey matter 702 mL, ...' from the result labels, for the status line."""
        volumes = outputs.result.volumes_ml()
        return ", ".join(f"{name} {millilitres:.0f} mL" for name, millilitres in volumes.items())


class _MarkingJob:
    """DeepMRILib's job, whose finish() also tags the overlay maps for the overlay selector."""

    def __init__(self, job, logic: DeepMRISegmentationLogic) -> None:
        self._job = job
        self._logic = logic

    def poll(self):
        return self._job.poll()

    @property
    def done(self) -> bool:
        return self._job.done

    @property
    def state(self) -> str:
        return self._job.state

    def cancel(self) -> None:
        self._job.cancel()

    def finish(self):
        outputs = self._job.finish()
        self._logic.markOverlays(outputs)
        return outputs


class DeepMRISegmentationTest(ScriptedLoadableModuleTest):
    """Self-test on Slicer's MRHead: logic, ROI, cancel, and the panel's Apply button."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (
            self.test_mrhead_brain_tissue_gives_named_segments_on_the_input_grid,
            self.test_roi_limits_the_segmented_region,
            self.test_cancel_stops_the_job_and_leaves_the_scene_unchanged,
            self.test_apply_button_runs_in_the_background_and_shows_the_result,
        ):
            self.setUp()
            test()

    def _mrhead(self):
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_mrhead_brain_tissue_gives_named_segments_on_the_input_grid(self):
        self.delayDisplay("Segmenting MRHead into brain tissue classes")
        volume = self._mrhead()
        before = volume.GetImageData().GetScalarRange()
        logic = DeepMRISegmentationLogic()
        outputs = logic.process(volume, "brain-tissue", probabilities=True)
        segmentation = outputs.segmentation.GetSegmentation()
        names = [
            segmentation.GetNthSegment(i).GetName()
            for i in range(segmentation.GetNumberOfSegments())
        ]
        self.assertEqual(names, [info["name"] for info in outputs.result.label_info])
        self.assertEqual(len(names), 3)
        self.assertEqual(outputs.result.labels.GetSize(), volume.GetImageData().GetDimensions())
        self.assertEqual(len(outputs.probabilities), 3)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(
            hierarchy.GetItemParent(hierarchy.GetItemByDataNode(outputs.segmentation)),
            hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume)),
        )
        self.assertEqual(volume.GetImageData().GetScalarRange(), before)  # input untouched
        provenance = json.loads(outputs.segmentation.GetAttribute("DeepMRI.provenance"))
        self.assertIn("models", provenance)
        self.delayDisplay("Brain tissue segmentation passed: " + logic.volumesText(outputs))

    def test_roi_limits_the_segmented_region(self):
        import numpy as np
        import SimpleITK as sitk

        self.delayDisplay("Segmenting inside an ROI")
        volume = self._mrhead()
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "test ROI")
        centre = [(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)]
        roi.SetCenter(centre)
        roi.SetSize([(bounds[2 * i + 1] - bounds[2 * i]) / 2 for i in range(3)])
        outputs = DeepMRISegmentationLogic().process(
            volume, "brain-extraction", roi=roi, show=False
        )
        labels = sitk.GetArrayFromImage(outputs.result.labels)
        self.assertGreater(int(labels.sum()), 0)
        start, stop = outputs.result.provenance["crop_box"]
        inside = np.zeros(labels.shape, dtype=bool)
        inside[start[2] : stop[2], start[1] : stop[1], start[0] : stop[0]] = True
        self.assertEqual(int(labels[~inside].sum()), 0)
        self.assertLess(inside.sum(), labels.size)
        self.delayDisplay("ROI test passed")

    def test_cancel_stops_the_job_and_leaves_the_scene_unchanged(self):
        from deepmri.errors import Cancelled

        self.delayDisplay("Cancelling a running segmentation")
        volume = self._mrhead()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        job = DeepMRISegmentationLogic().start(volume, "brain-tissue", uncertainty=True)
        deadline = time.monotonic() + 120
        while not job.poll() and not job.done and time.monotonic() < deadline:
            time.sleep(0.1)  # wait for the worker to report, so the cancel hits real work
        cancelStarted = time.monotonic()
        job.cancel()
        self.assertTrue(job.done)
        self.assertLess(time.monotonic() - cancelStarted, 10.0)
        with self.assertRaises(Cancelled):
            job.finish()
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Cancel test passed")

    def test_apply_button_runs_in_the_background_and_shows_the_result(self):
        self.delayDisplay("Clicking Apply in the module panel")
        volume = self._mrhead()
        slicer.util.selectModule("DeepMRISegmentation")
        widget = slicer.util.getModuleWidget("DeepMRISegmentation")
        widget._parameterNode.inputVolume = volume
        widget._parameterNode.model = "brain-extraction"
        widget.ui.applyButton.click()
        self.assertTrue(widget.ui.cancelButton.enabled, widget.ui.statusLabel.text)
        deadline = time.monotonic() + 600
        while widget._job is not None and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.05)
        segmentation = widget._parameterNode.outputSegmentation
        self.assertIsNotNone(segmentation, widget.ui.statusLabel.text)
        self.assertIn("Done", widget.ui.statusLabel.text)
        compositeNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(compositeNode.GetBackgroundVolumeID(), volume.GetID())
        self.delayDisplay("Panel test passed")

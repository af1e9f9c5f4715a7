"""DeepMRI Segmentation: the Slicer module that segments a brain MRI into named, coloured segments.

Module metadata, parameter node, widget (binds the .ui, runs a background job) and the self-test on
Slicer's MRHead sample; the work is DeepMRILib's task logic for the core's "segment" task.
"""

import json
from typing import Annotated

import qt
import slicer
from DeepMRILib.models import DEVICES, SavedSettings, border_text, mask_options
from DeepMRILib.tasklogic import TASK_ATTRIBUTE, TaskLogic, overlay_range, show_overlay
from DeepMRILib.widgets import (
    PanelMixin,
    ParameterNodeLogic,
    chosen_outputs,
    click_apply_until_done,
    run_self_tests,
)
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
input in 2D and 3D. Optional: a probability map per structure, an uncertainty map (how much the
prediction changes when the image is mirrored) and the skull-stripped input (0 outside).</p>
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

    roi - optional box limiting the region. includeCsf - the mask holds the CSF around the brain
    (off: the tight brain). csfBorderMm - how far that CSF may reach; below 0 the card's border.
    probabilities/uncertainty/stripped - extra outputs (the last a skull-stripped input).
    overlayVolume/showOverlay - a probability or uncertainty map over the input.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = "brain-tissue"
    roi: vtkMRMLMarkupsROINode
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    includeCsf: bool = True
    csfBorderMm: float = -0.5
    probabilities: bool = False
    uncertainty: bool = False
    stripped: bool = False
    outputSegmentation: vtkMRMLSegmentationNode
    overlayVolume: vtkMRMLScalarVolumeNode
    showOverlay: bool = False


class DeepMRISegmentationWidget(PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and runs segmentation as a background job."""

    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        self.setupPanel("DeepMRISegmentation", DeepMRISegmentationLogic())
        # Only the maps a segmentation made are offered as overlays.
        self.ui.overlayVolumeSelector.addAttribute(
            "vtkMRMLScalarVolumeNode", TASK_ATTRIBUTE, "segment"
        )
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChosen)
        self.enter()

    def enter(self) -> None:
        self.populateModelMenu("segmentation")  # models imported in DeepMRI Models meanwhile
        self.initializeParameterNode()

    def prepareParameterNode(self, parameters) -> None:
        if not parameters.inputVolume:
            parameters.inputVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")

    def updatePanel(self) -> None:
        """Model menu, Apply/Cancel state and overlay, which the GUI connector does not bind."""
        parameters = self.parameters
        ready = bool(parameters and parameters.inputVolume and parameters.model)
        self.enableStart(
            self.ui.applyButton,
            ready,
            _("Segment the input volume with the selected model.")
            if ready
            else _("Select an input volume and a model first."),
        )
        if parameters:
            self.showModel(parameters.model)
            model = self._models.get(parameters.model, {})
            both_conventions = bool(model.get("tight_mask"))
            self.ui.includeCsfCheckBox.enabled = both_conventions
            self.ui.csfBorderSpinBox.enabled = both_conventions and parameters.includeCsf
            self.ui.csfBorderSpinBox.specialValueText = _("model default ({border})").format(
                border=border_text(model)
            )
            show_overlay(slicer.mrmlScene, parameters.overlayVolume, parameters.showOverlay)

    def onApplyButton(self) -> None:
        parameters = self.parameters
        self.startTask(
            parameters.inputVolume,
            self._showResult,
            what=_("Segmentation failed"),
            device=parameters.device,
            model=parameters.model,
            **mask_options(
                self._models.get(parameters.model, {}),
                parameters.includeCsf,
                parameters.csfBorderMm,
            ),
            roi_node=parameters.roi,
            wanted=chosen_outputs(
                probability=parameters.probabilities,
                uncertainty=parameters.uncertainty,
                stripped=parameters.stripped,
            ),
        )

    def _showResult(self, outputs) -> None:
        if self.parameters:
            self.parameters.outputSegmentation = outputs.segmentation
            maps = [node for key, node in outputs.nodes.items() if overlay_range(key)]
            self.parameters.overlayVolume = maps[0] if maps else None
        self.showDone(outputs)


class DeepMRISegmentationLogic(ParameterNodeLogic, ScriptedLoadableModuleLogic, TaskLogic):
    """The "segment" task on MRML nodes (DeepMRILib.tasklogic.TaskLogic) with the saved settings.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRISegmentation")
        outputs = logic.run(getNode("MRHead"), model="brain-tissue", wanted=["probability"])
        outputs.segmentation  # the new vtkMRMLSegmentationNode
    """

    parameterNodeClass = DeepMRISegmentationParameterNode

    def __init__(self) -> None:
        ScriptedLoadableModuleLogic.__init__(self)
        TaskLogic.__init__(self, "segment")
        SavedSettings.load(qt.QSettings()).apply_to(self)


class DeepMRISegmentationTest(ScriptedLoadableModuleTest):
    """Self-test on Slicer's MRHead: logic, ROI, and the panel's Apply and Cancel buttons."""

    def runTest(self):
        run_self_tests(
            self,
            (
                self.test_mrhead_brain_tissue_gives_named_segments_on_the_input_grid,
                self.test_roi_limits_the_segmented_region,
                self.test_apply_and_cancel_run_in_the_background,
            ),
        )

    def _mrhead(self):
        import SampleData

        return SampleData.downloadSample("MRHead")

    def test_mrhead_brain_tissue_gives_named_segments_on_the_input_grid(self):
        volume = self._mrhead()
        before = volume.GetImageData().GetScalarRange()
        logic = DeepMRISegmentationLogic()
        outputs = logic.run(volume, model="brain-tissue", wanted=["probability"], show=True)
        segmentation = outputs.segmentation.GetSegmentation()
        names = [segmentation.GetNthSegment(i).GetName() for i in range(3)]
        self.assertEqual(names, [info["name"] for info in outputs.result.info["label_info"]])
        self.assertEqual(
            outputs.result.images["labels"].GetSize(), volume.GetImageData().GetDimensions()
        )
        self.assertEqual(len(outputs.nodes_of("probability")), 3)
        self.assertTrue(segmentation.ContainsRepresentation("Closed surface"))
        hierarchy = slicer.mrmlScene.GetSubjectHierarchyNode()
        self.assertEqual(
            hierarchy.GetItemParent(hierarchy.GetItemByDataNode(outputs.segmentation)),
            hierarchy.GetItemParent(hierarchy.GetItemByDataNode(volume)),
        )
        self.assertEqual(volume.GetImageData().GetScalarRange(), before)  # input untouched
        provenance = json.loads(outputs.segmentation.GetAttribute("DeepMRI.provenance"))
        self.assertIn("models", provenance["provenance"])
        self.delayDisplay("Brain tissue segmentation passed: " + outputs.summary())

    def test_roi_limits_the_segmented_region(self):
        import numpy as np
        import SimpleITK as sitk

        volume = self._mrhead()
        bounds = [0.0] * 6
        volume.GetRASBounds(bounds)
        roi = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", "test ROI")
        roi.SetCenter([(bounds[2 * i] + bounds[2 * i + 1]) / 2 for i in range(3)])
        roi.SetSize([(bounds[2 * i + 1] - bounds[2 * i]) / 2 for i in range(3)])
        outputs = DeepMRISegmentationLogic().run(volume, model="brain-extraction", roi_node=roi)
        labels = sitk.GetArrayFromImage(outputs.result.images["labels"])
        (i0, j0, k0), (i1, j1, k1) = outputs.result.info["crop_box"]
        inside = np.zeros(labels.shape, dtype=bool)
        inside[k0:k1, j0:j1, i0:i1] = True
        self.assertGreater(int(labels.sum()), 0)
        self.assertEqual(int(labels[~inside].sum()), 0)
        self.assertLess(inside.sum(), labels.size)

    def test_apply_and_cancel_run_in_the_background(self):
        volume = self._mrhead()
        parameters = {"inputVolume": volume, "model": "brain-extraction"}
        widget = click_apply_until_done(self, "DeepMRISegmentation", parameters)
        self.assertIsNotNone(widget.parameters.outputSegmentation, widget.ui.statusLabel.text)
        compositeNode = slicer.app.layoutManager().sliceWidget("Red").mrmlSliceCompositeNode()
        self.assertEqual(compositeNode.GetBackgroundVolumeID(), volume.GetID())

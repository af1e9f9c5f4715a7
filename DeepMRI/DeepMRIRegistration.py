"""DeepMRI Registration: the Slicer module that aligns a moving MRI to a fixed one.

Here: what Slicer shows of the module, its panel's parameters and widget (the registration runs
as a background job) and a self-test on MRHead and a moved copy; the core's "register" does the work.
"""

from typing import Annotated

import slicer
from DeepMRILib import widgets
from DeepMRILib.models import DEVICES
from DeepMRILib.tasklogic import TaskLogic
from slicer import (
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

METHODS = ["rigid", "similarity", "affine", "deformable"]
SIMILARITIES = ["auto", "lncc", "mapped", "mind"]
BUDGETS = ["quick", "standard", "best"]


class DeepMRIRegistration(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepMRI Registration")
        self.parent.categories = ["DeepMRI"]
        self.parent.dependencies = ["Transforms", "Segmentations"]
        self.parent.contributors = ["DeepMRI developers"]
        self.parent.helpText = _("""
<p>Aligns a <b>moving</b> MRI to a <b>fixed</b> one: rigid, similarity, affine, or
<b>deformable</b> (affine, then a smooth diffeomorphic warp optimised for this pair; no trained
weights). The result is a new transform node (linear, or a grid transform for deformable) that
you can apply, harden or invert in the Transforms module, and the moving volume resampled onto
the fixed grid, shown over the fixed volume. On request, the Jacobian determinant of the warp
(values at or below 0 mean folding; below 1 shrinking, above 1 growing).</p>
<p><b>Input:</b> two 3D volumes of the head or brain, same or different contrast (T1, T2, FLAIR),
same or different subject, any orientation. Optionally a segmentation of the moving volume to
carry along onto the fixed grid. The inputs are never modified.</p>
<p><b>Limits:</b> images must overlap after the affine stage; large lesions, resections or
strong artefacts are not modelled. Regularisation trades smoothness for detail: check the
Jacobian and the overlay. Research software, not a medical device: check every result.</p>
<p><b>How to cite:</b> cite DeepMRI (see Docs/registration.md for the measured
accuracy against ANTs SyN, elastix and ConvexAdam).</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI Registration builds on 3D Slicer, SimpleITK (ITK's Mattes mutual information and
regular-step optimiser for the linear stage), MONAI's DVF2DDF and Warp (scaling and squaring of a
stationary velocity field) and PyTorch.
""")


@parameterNodeWrapper
class DeepMRIRegistrationParameterNode:
    """Everything the module panel shows; saved with the scene.

    fixedVolume/movingVolume - the pair. movingSegmentation - optional labels to carry along.
    method, regularisation, similarity, budget - the task's options. jacobian - also make its map.
    outputTransform/outputVolume/outputJacobian - the latest result.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    movingSegmentation: vtkMRMLSegmentationNode
    method: Annotated[str, Choice(METHODS)] = "deformable"
    regularisation: Annotated[float, WithinRange(0.0, 10.0)] = 1.0
    similarity: Annotated[str, Choice(SIMILARITIES)] = "auto"
    budget: Annotated[str, Choice(BUDGETS)] = "standard"
    jacobian: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    outputJacobian: vtkMRMLScalarVolumeNode


class DeepMRIRegistrationWidget(
    widgets.PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin
):
    """Binds the panel to the parameter node and runs registration as a background job."""

    defaultVolumes = ("fixedVolume", "movingVolume")
    required = ("fixedVolume", "movingVolume")
    applyTips = (
        _("Align the moving volume to the fixed one."),
        _("Select a fixed and a moving volume first."),
    )
    outputParameters = {
        "outputTransform": "transform",
        "outputVolume": "warped",
        "outputJacobian": "jacobian",
    }

    def onApplyButton(self) -> None:
        parameters = self.parameters
        inputs = {"fixed": parameters.fixedVolume, "moving": parameters.movingVolume}
        if parameters.movingSegmentation:
            inputs["moving_labels"] = parameters.movingSegmentation
        self.startTask(
            inputs,
            self.showOverFixed,
            what=_("Registration failed"),
            device=parameters.device,
            method=parameters.method,
            regularisation=parameters.regularisation,
            similarity=parameters.similarity,
            budget=parameters.budget,
            leave_out=[] if parameters.jacobian else ["jacobian"],
        )

    def showOverFixed(self, outputs) -> None:
        """The warped volume in the background, the fixed one half-transparent over it."""
        self.showOutputs(outputs)
        fixed = outputs.reference_node
        for composite in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
            composite.SetForegroundVolumeID(fixed.GetID())
            composite.SetForegroundOpacity(0.5)


class DeepMRIRegistrationLogic(widgets.TaskModuleLogic, ScriptedLoadableModuleLogic, TaskLogic):
    """The "register" task on MRML nodes (DeepMRILib.tasklogic.TaskLogic) with saved settings.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRIRegistration")
        outputs = logic.run({"fixed": getNode("T1"), "moving": getNode("T2")}, method="affine")
        outputs.nodes["transform"], outputs.nodes["warped"]  # the new nodes
    """

    parameterNodeClass = DeepMRIRegistrationParameterNode
    taskName = "register"
    output_names = {
        "transform": "{moving} to {fixed}",
        "warped": "{moving} registered to {fixed}",
        "warped_labels": "{moving_labels} registered to {fixed}",
        "jacobian": "{moving} to {fixed} Jacobian",
    }
    label_grids = {"moving_labels": "moving"}
    not_in_scene = ("displacement",)  # the grid transform node holds the field


class DeepMRIRegistrationTest(ScriptedLoadableModuleTest):
    """Self-test on Slicer's MRHead and a rotated, shifted copy: logic and the panel."""

    def runTest(self):
        widgets.run_self_tests(
            self,
            (
                self.test_affine_transform_node_undoes_a_known_motion,
                self.test_apply_and_cancel_run_in_the_background,
            ),
        )

    def _mrhead_and_moved_copy(self):
        import SampleData

        fixed = SampleData.downloadSample("MRHead")
        import vtk

        fixed = SampleData.downloadSample("MRHead")
        moved = slicer.modules.volumes.logic().CloneVolume(slicer.mrmlScene, fixed, "MRHead moved")
        motion = vtk.vtkTransform()
        motion.Translate(6.0, -4.0, 3.0)
        motion.RotateWXYZ(6.0, 0.3, 0.2, 1.0)
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "motion")
        node.SetMatrixTransformToParent(motion.GetMatrix())
        moved.SetAndObserveTransformNodeID(node.GetID())
        slicer.vtkSlicerTransformLogic().hardenTransform(moved)
        slicer.mrmlScene.RemoveNode(node)
        return fixed, moved

    def test_affine_transform_node_undoes_a_known_motion(self):
        import numpy as np

        fixed, moved = self._mrhead_and_moved_copy()
        logic = DeepMRIRegistrationLogic()
        outputs = logic.run({"fixed": fixed, "moving": moved}, method="affine", show=True)
        transform, warped = outputs.nodes["transform"], outputs.nodes["warped"]
        self.assertTrue(transform.IsA("vtkMRMLLinearTransformNode"))
        self.assertEqual(warped.GetName(), "MRHead moved registered to MRHead")
        a, b = (slicer.util.arrayFromVolume(n).astype(float) for n in (fixed, warped))
        self.assertGreater(np.corrcoef(a.ravel(), b.ravel())[0, 1], 0.95)
        self.delayDisplay("Affine registration passed: " + outputs.summary())

    def test_apply_and_cancel_run_in_the_background(self):
        fixed, moved = self._mrhead_and_moved_copy()
        widget = widgets.click_apply_until_done(
            self, "DeepMRIRegistration", {"fixedVolume": fixed, "movingVolume": moved}
        )
        self.assertTrue(widget.parameters.outputTransform.IsA("vtkMRMLGridTransformNode"))
        self.assertIsNotNone(widget.parameters.outputVolume)

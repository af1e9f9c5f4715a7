"""DeepMRI Super-resolution: the Slicer module that restores thin slices from a thick-slice MRI.

The module's metadata and panel state, its panel (a background job with progress and Cancel) and
a self-test on a thick-slice copy of MRHead; the work is the core's "superresolve" task.
"""

from typing import Annotated

from DeepMRILib import widgets
from DeepMRILib.models import DEVICES
from DeepMRILib.tasklogic import TaskLogic
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin


class DeepMRISuperResolution(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepMRI Super-resolution")
        self.parent.categories = ["DeepMRI"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepMRI developers"]
        self.parent.helpText = _("""
<p>Restores thin slices from a <b>thick-slice</b> MRI (for example 1 x 1 x 5 mm to 1 mm
isotropic) on the same physical extent, so it can be reformatted in any plane or segmented.
<b>ssl</b> trains a small network on the volume's own in-plane detail, degraded as the thick
slices were acquired (in the spirit of SMORE): no downloaded weights, any contrast.
<b>pretrained</b> applies a small 3D network trained on MNI152 and the pydeface mean head made
thick (no training on your volume; see its model card and Docs/superresolution.md for how good it
is). <b>cubic</b> and <b>sinc</b> only interpolate, for comparison. The result is a new volume named
"&lt;input&gt; super-resolved"; on request an uncertainty map (where the network's orthogonal
passes disagree).</p>
<p><b>Input:</b> one 3D volume with one axis coarser than the other two; optionally the spacing
of the result (default: the finest in-plane spacing). The input is never modified.</p>
<p><b>Limits:</b> detail finer than the in-plane resolution cannot be restored; motion between
slices, slice gaps larger than assumed and very thick slices (over 6x) are not validated. The
result is computed, not acquired: research software, not a medical device.</p>
<p><b>How to cite:</b> cite DeepMRI and SMORE (Zhao et al., IEEE TMI 2021) for the
self-supervised method; results are in Docs/superresolution.md.</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI Super-resolution follows the self-supervised idea of SMORE (Zhao, Dewey, Carass, Prince
and colleagues, Johns Hopkins). It uses 3D Slicer, PyTorch, MONAI and SimpleITK's B-spline and
windowed-sinc interpolators.
""")


@parameterNodeWrapper
class DeepMRISuperResolutionParameterNode:
    """Everything the module panel shows; saved with the scene.

    inputVolume - the thick-slice volume. spacing - the result's spacing in mm on every axis
    (0: the input's in-plane spacing). method, budget - how. uncertainty - also its map.
    outputVolume/uncertaintyVolume - the latest result.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    spacing: Annotated[float, WithinRange(0.0, 10.0)] = 0.0
    method: Annotated[str, Choice(["ssl", "pretrained", "cubic", "sinc"])] = "ssl"
    budget: Annotated[str, Choice(["quick", "standard", "best"])] = "quick"
    uncertainty: bool = False
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    outputVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode


class DeepMRISuperResolutionWidget(
    widgets.PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin
):
    """Binds the panel to the parameter node and runs super-resolution as a background job."""

    defaultVolumes = required = ("inputVolume",)
    applyTips = (
        _("Restore thin slices from the input volume."),
        _("Select a thick-slice input volume first."),
    )
    outputParameters = {"outputVolume": "superresolved", "uncertaintyVolume": "uncertainty"}

    def onApplyButton(self) -> None:
        parameters = self.parameters
        spacing = parameters.spacing
        self.startTask(
            parameters.inputVolume,
            what=_("Super-resolution failed"),
            device=parameters.device,
            spacing=(spacing, spacing, spacing) if spacing > 0 else None,
            method=parameters.method,
            budget=parameters.budget,
            wanted=["uncertainty"] if parameters.uncertainty else [],
        )


class DeepMRISuperResolutionLogic(widgets.TaskModuleLogic, ScriptedLoadableModuleLogic, TaskLogic):
    """The "superresolve" task on MRML nodes (DeepMRILib.tasklogic.TaskLogic), saved settings.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRISuperResolution")
        outputs = logic.run(getNode("T2 axial"), method="ssl", budget="quick", show=True)
        outputs.nodes["superresolved"].GetName()  # 'T2 axial super-resolved'
    """

    parameterNodeClass = DeepMRISuperResolutionParameterNode
    taskName = "superresolve"
    output_names = {
        "superresolved": "{image} super-resolved",
        "uncertainty": "{image} super-resolution uncertainty",
    }


class DeepMRISuperResolutionTest(ScriptedLoadableModuleTest):
    """Self-test on a 1 x 1 x 4 mm copy of Slicer's MRHead: logic and the panel."""

    def runTest(self):
        widgets.run_self_tests(
            self,
            (
                self.test_cubic_restores_the_thin_grid_on_the_same_extent,
                self.test_apply_and_cancel_run_in_the_background,
            ),
        )

    def _thick_mrhead(self):
        import SampleData
        import SimpleITK as sitk
        import sitkUtils

        head = sitkUtils.PullVolumeFromSlicer(SampleData.downloadSample("MRHead"))
        spacing = list(head.GetSpacing())
        spacing[2] *= 4.0
        size = [head.GetSize()[0], head.GetSize()[1], head.GetSize()[2] // 4]
        thick = sitk.Resample(
            sitk.SmoothingRecursiveGaussian(head, [0.01, 0.01, spacing[2] / 2.355]),
            size,
            sitk.Transform(),
            sitk.sitkLinear,
            head.GetOrigin(),
            spacing,
            head.GetDirection(),
        )
        return sitkUtils.PushVolumeToSlicer(thick, name="MRHead thick")

    def test_cubic_restores_the_thin_grid_on_the_same_extent(self):
        thick = self._thick_mrhead()
        outputs = DeepMRISuperResolutionLogic().run(thick, method="cubic", show=True)
        restored = outputs.nodes["superresolved"]
        self.assertEqual(restored.GetName(), "MRHead thick super-resolved")
        spacing = restored.GetSpacing()
        self.assertAlmostEqual(spacing[2], spacing[0], places=3)
        bounds, thick_bounds = [0.0] * 6, [0.0] * 6
        restored.GetRASBounds(bounds)
        thick.GetRASBounds(thick_bounds)
        for a, b in zip(bounds, thick_bounds, strict=True):
            self.assertAlmostEqual(a, b, delta=spacing[2] * 4)
        self.delayDisplay("Cubic super-resolution passed: " + outputs.summary())

    def test_apply_and_cancel_run_in_the_background(self):
        parameters = {"inputVolume": self._thick_mrhead(), "method": "ssl", "budget": "quick"}
        widget = widgets.click_apply_until_done(self, "DeepMRISuperResolution", parameters)
        self.assertIsNotNone(widget.parameters.outputVolume)

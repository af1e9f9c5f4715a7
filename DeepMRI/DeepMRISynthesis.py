"""DeepMRI Synthesis: the Slicer module that computes a synthetic contrast (T2w, FLAIR, T1w).

What is here: the module's description, its saved panel state, the panel (Apply starts a worker
job) and a self-test on MRHead. The synthesis itself is the core's "synthesize" task via TaskLogic.
"""

from typing import Annotated

from DeepMRILib import widgets
from DeepMRILib.models import DEVICES
from DeepMRILib.tasklogic import TaskLogic
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

TARGETS = ["T2w", "FLAIR", "T1w"]
SOURCES = ["any", "T1w", "T2w", "FLAIR", "PDw"]  # deepmri.tasks.synthesize.SOURCES


class DeepMRISynthesis(ScriptedLoadableModule):
    """Module metadata shown in Slicer's module list and help panel."""

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("DeepMRI Synthesis")
        self.parent.categories = ["DeepMRI"]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepMRI developers"]
        self.parent.helpText = _("""
<p>Computes a <b>synthetic</b> contrast from an acquired one with a trained model: T1w to T2w,
T1w to FLAIR, or T2w to T1w. The result is a new volume on the exact grid of the source, named
"&lt;source&gt; -&gt; T2w (synthetic)" and described as SYNTHETIC; the source is never
replaced. On request, an uncertainty map (how much the output changes when the input is
mirrored).</p>
<p><b>Input:</b> one 3D brain MRI of the source contrast the model's card names, whole head or
skull-stripped (tick "Source is skull-stripped" for brain-only input). Models are listed and
added in the DeepMRI Models module.</p>
<p><b>Limits:</b> a synthetic image may miss or invent structure (lesions in particular, see
the lesion check in Docs/synthesis.md); shipped models are trained on simulated images, not on
patients. Never use a synthetic image alone for diagnosis. Research software, not a medical
device.</p>
<p><b>How to cite:</b> cite DeepMRI and the citation on the model's card (DeepMRI Models).</p>
""")
        self.parent.acknowledgementText = _("""
DeepMRI Synthesis trains its networks (MONAI U-Net generators, a PatchGAN critic) on images
simulated by DeepMRI's MR physics simulator from the MNI ICBM152 2009a tissue maps (McConnell
Brain Imaging Centre, MNI). It runs in 3D Slicer on PyTorch, MONAI and SimpleITK.
""")


@parameterNodeWrapper
class DeepMRISynthesisParameterNode:
    """Everything the module panel shows; saved with the scene.

    inputVolume - the acquired source. target - the contrast to synthesise. source - the
    source's contrast if known (picks the model; "any": not said). skullStripped -
    the source is brain-only. uncertainty - also its map. outputVolume/uncertaintyVolume - the
    latest result.
    """

    inputVolume: vtkMRMLScalarVolumeNode
    target: Annotated[str, Choice(TARGETS)] = "T2w"
    source: Annotated[str, Choice(SOURCES)] = "any"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    skullStripped: bool = False
    uncertainty: bool = False
    outputVolume: vtkMRMLScalarVolumeNode
    uncertaintyVolume: vtkMRMLScalarVolumeNode


class DeepMRISynthesisWidget(widgets.PanelMixin, ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Binds the panel to the parameter node and runs synthesis as a background job."""

    defaultVolumes = required = ("inputVolume",)
    outputParameters = {"outputVolume": "synthetic", "uncertaintyVolume": "uncertainty"}
    applyTips = (_("Compute the synthetic contrast."), _("Select a source volume first."))

    def onApplyButton(self) -> None:
        parameters = self.parameters
        self.startTask(
            parameters.inputVolume,
            what=_("Synthesis failed"),
            device=parameters.device,
            target=parameters.target,
            source=parameters.source,
            skull_stripped=parameters.skullStripped,
            wanted=["uncertainty"] if parameters.uncertainty else [],
        )


class DeepMRISynthesisLogic(widgets.TaskModuleLogic, ScriptedLoadableModuleLogic, TaskLogic):
    """The "synthesize" task on MRML nodes (DeepMRILib.tasklogic.TaskLogic) with saved settings.

    Examples (Python console):
        logic = slicer.util.getModuleLogic("DeepMRISynthesis")
        outputs = logic.run(getNode("T1"), target="T2w", wanted=["uncertainty"], show=True)
        outputs.nodes["synthetic"].GetName()  # 'T1 -> T2w (synthetic)'
    """

    parameterNodeClass = DeepMRISynthesisParameterNode
    taskName = "synthesize"
    output_names = {"uncertainty": "{image} synthesis uncertainty"}


class DeepMRISynthesisTest(ScriptedLoadableModuleTest):
    """Self-test on Slicer's MRHead (a T1w) with the installed T1w -> T2w model."""

    def runTest(self):
        widgets.run_self_tests(
            self,
            (
                self.test_mrhead_to_synthetic_t2w_on_the_input_grid,
                self.test_apply_and_cancel_run_in_the_background,
            ),
        )

    def _mrhead(self):
        import SampleData

        return SampleData.downloadSample("MRHead")

    def _skip_without_model(self) -> bool:
        from deepmri.tasks.synthesize import DEFAULT_MODELS

        store = DeepMRISynthesisLogic().model_store()
        if DEFAULT_MODELS["T2w"] not in [info.id for info in store.list()]:
            self.delayDisplay("No T1w -> T2w model installed (DeepMRI Models): test skipped")
            return True
        return False

    def test_mrhead_to_synthetic_t2w_on_the_input_grid(self):
        if self._skip_without_model():
            return
        volume = self._mrhead()
        outputs = DeepMRISynthesisLogic().run(volume, target="T2w", show=True)
        synthetic = outputs.nodes["synthetic"]
        self.assertEqual(synthetic.GetName(), "MRHead -> T2w (synthetic)")
        self.assertIn("SYNTHETIC", synthetic.GetDescription())
        self.assertEqual(
            synthetic.GetImageData().GetDimensions(), volume.GetImageData().GetDimensions()
        )
        self.assertEqual(synthetic.GetSpacing(), volume.GetSpacing())

    def test_apply_and_cancel_run_in_the_background(self):
        if self._skip_without_model():
            return
        widget = widgets.click_apply_until_done(
            self, "DeepMRISynthesis", {"inputVolume": self._mrhead(), "uncertainty": True}
        )
        self.assertIn("synthetic", widget.parameters.outputVolume.GetName())
        self.assertIsNotNone(widget.parameters.uncertaintyVolume)

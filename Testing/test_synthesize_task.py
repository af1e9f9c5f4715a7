"""The synthesis task end to end with a small real network: geometry, synthetic labelling, errors."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_oblique_image
from deepmri.errors import Cancelled, ModelError
from deepmri.geometry import same_geometry
from deepmri.models import ModelStore, example_card, save_model
from deepmri.nets import register_architecture
from deepmri.progress import CancelToken
from deepmri.settings import Settings
from deepmri.tasks import RunContext, TaskResult, get_task
from deepmri.tasks.synthesize import synthesize
from monai.networks.nets import UNet


class Inverter(torch.nn.Module):
    """A real 1x1x1 convolution computing 1 - x: T1-like contrast in, T2-like out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(-1.0)
            self.conv.bias.fill_(1.0)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.conv(volume)


register_architecture("test.Inverter", Inverter)


def inverter_card(model_id: str = "test-t1w-to-t2w", mask: str | None = None) -> dict:
    card = example_card(
        id=model_id,
        task="synthesis",
        architecture={"name": "test.Inverter", "config": {}},
        labels=[],
        output={"contrast": "T2w"},
    )
    card["input"] = {"contrasts": ["T1w"], "channels": 1}
    card["inference"] = {"patch_size": [16, 16, 16], "overlap": 0.25, "flips": [[4]]}
    card["preprocessing"] = {"spacing": [2.0, 2.0, 2.0], "orientation": "RAS"}
    if mask:
        card["preprocessing"]["mask"] = mask
    return card


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    save_model(Inverter(), inverter_card(), root / "test-t1w-to-t2w")
    # A tiny MONAI UNet: an architecture a fresh process (the CLI) can build from the card.
    torch.manual_seed(0)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8]}
    config["strides"] = [2]
    card = inverter_card("test-unet-t2w")
    card["architecture"] = {"name": "monai.UNet", "config": config}
    save_model(UNet(**config), card, root / "test-unet-t2w")
    return ModelStore(Settings(home=root / "home"), extra_paths=(root,))


@pytest.fixture
def brain_like():
    """A bright sphere with a darker shell inside an oblique, anisotropic grid."""
    image = make_oblique_image((36, 32, 20), (1.0, 1.2, 2.0))
    k, j, i = np.meshgrid(*(np.arange(n) for n in (20, 32, 36)), indexing="ij")
    radius = np.sqrt(((k - 10) * 2.0) ** 2 + ((j - 16) * 1.2) ** 2 + (i - 18) ** 2)
    values = np.where(radius < 8, 100.0, np.where(radius < 14, 50.0, 0.0)).astype(np.float32)
    output = sitk.GetImageFromArray(values)
    output.CopyInformation(image)
    return output


def test_synthetic_output_keeps_input_geometry_and_says_synthetic(store, brain_like):
    before = sitk.GetArrayFromImage(brain_like).copy()
    result = get_task("synthesize")(
        {"image": brain_like},
        {"target": "T2w", "model": "test-t1w-to-t2w", "skull_stripped": True},
        RunContext(store=store),
    )
    synthetic = result.images["synthetic"]
    assert same_geometry(synthetic, brain_like)
    assert synthetic.GetSize() == brain_like.GetSize()
    assert np.array_equal(sitk.GetArrayFromImage(brain_like), before)  # input untouched
    assert result.info["synthetic"] is True
    assert result.info["name_suffix"] == " -> T2w (synthetic)"
    assert "SYNTHETIC" in result.info["description"]
    assert "uncertainty" not in result.images
    values = sitk.GetArrayFromImage(synthetic)
    inside, shell = before == 100.0, before == 50.0
    # The inverter's contrast, and nothing outside the brain (the non-zero voxels).
    assert np.median(values[inside]) < np.median(values[shell])
    assert values[before == 0].max() == 0.0


def test_uncertainty_map_on_request_on_the_same_grid(store, brain_like):
    result = get_task("synthesize")(
        {"image": brain_like},
        {"model": "test-t1w-to-t2w", "skull_stripped": True},
        RunContext(store=store, wanted=frozenset({"uncertainty"})),
    )
    uncertainty = result.images["uncertainty"]
    assert same_geometry(uncertainty, brain_like)
    assert sitk.GetArrayFromImage(uncertainty).min() >= 0.0


def test_result_is_written_under_a_synthetic_name_and_read_back(store, brain_like, tmp_path):
    result = get_task("synthesize")(
        {"image": brain_like},
        {"model": "test-t1w-to-t2w", "skull_stripped": True},
        RunContext(store=store, wanted=frozenset({"uncertainty"})),
    )
    files = result.write(tmp_path)
    assert files["synthetic"] == "synthetic.nii.gz" and "uncertainty" in files
    again = TaskResult.read(tmp_path)
    assert again.info["name_suffix"] == " -> T2w (synthetic)"
    assert same_geometry(again.images["synthetic"], brain_like)


def test_model_that_makes_another_contrast_is_refused(store, brain_like):
    with pytest.raises(ModelError, match="not a synthetic FLAIR"):
        synthesize(brain_like, "FLAIR", "test-t1w-to-t2w", skull_stripped=True, store=store)


def test_missing_model_says_where_to_look(store, brain_like):
    # All three default models now ship, so a model id that is not installed stands in.
    with pytest.raises(ModelError, match="Docs/synthesis.md"):
        synthesize(brain_like, "FLAIR", "t1w-to-flair-absent", skull_stripped=True, store=store)


def test_cancel_stops_before_any_output(store, brain_like):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        synthesize(
            brain_like, "T2w", "test-t1w-to-t2w", skull_stripped=True, store=store, cancel=token
        )


def test_task_declares_target_choices_and_synthetic_outputs():
    task = get_task("synthesize")
    target = next(option for option in task.options if option.name == "target")
    assert target.choices == ("T2w", "FLAIR", "T1w")
    assert [output.name for output in task.outputs] == ["synthetic", "uncertainty"]


def test_command_line_runs_the_task_and_names_the_file_synthetic(store, brain_like, tmp_path):
    import subprocess
    import sys

    from deepmri.io import write_image

    source = tmp_path / "t1.nii.gz"
    write_image(brain_like, source)
    folder = next(root for kind, root in store.roots if kind == "extra")
    command = [sys.executable, "-m", "deepmri", "synthesize", str(source), "--target", "T2w"]
    command += ["--model", str(folder / "test-unet-t2w"), "--skull-stripped"]
    command += ["-o", str(tmp_path / "out")]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "out" / "synthetic.nii.gz").exists()


def test_card_that_averages_flips_gives_one_image_with_or_without_uncertainty(tmp_path, brain_like):
    torch.manual_seed(1)
    config = {"spatial_dims": 3, "in_channels": 1, "out_channels": 1, "channels": [4, 8]}
    config["strides"] = [2]
    network = UNet(**config)
    for averaged in (False, True):
        card = inverter_card(f"unet-{str(averaged).lower()}")
        card["architecture"] = {"name": "monai.UNet", "config": config}
        card["inference"]["average_flips"] = averaged
        save_model(network, card, tmp_path / f"unet-{str(averaged).lower()}")
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(tmp_path,))

    def run(model, uncertainty):
        result = synthesize(
            brain_like, "T2w", model, skull_stripped=True, uncertainty=uncertainty, store=store
        )
        assert (result.uncertainty is not None) == uncertainty
        return sitk.GetArrayFromImage(result.image)

    plain, with_map = run("unet-false", False), run("unet-false", True)
    assert not np.allclose(plain, with_map)  # the flips change the image: the test can fail
    np.testing.assert_allclose(run("unet-true", False), with_map, atol=1e-5)
    np.testing.assert_allclose(run("unet-true", True), with_map, atol=1e-5)


def test_model_is_chosen_by_the_source_contrast_where_a_dedicated_one_exists(store, brain_like):
    from deepmri.tasks.synthesize import default_model

    assert default_model("T2w") == default_model("T2w", "T1w") == "t1w-to-t2w"
    # T1w from any source: the any-contrast model (better than t2w-to-t1w even on T2w inputs).
    assert default_model("T1w") == default_model("T1w", "FLAIR") == "any-to-t1w"
    assert default_model("T1w", "T2w") == "any-to-t1w"
    with pytest.raises(ModelError, match="No model makes a synthetic T2w from FLAIR"):
        get_task("synthesize")(
            {"image": brain_like},
            {"target": "T2w", "source": "FLAIR", "skull_stripped": True},
            RunContext(store=store),
        )

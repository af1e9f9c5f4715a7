"""The segmentation task end to end on small real networks: geometry, errors, extras, cancel, CLI."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import make_oblique_image
from deepmri.errors import Cancelled, InvalidImageError, ModelError
from deepmri.geometry import resample_to_spacing, same_geometry
from deepmri.io import read_image, write_image
from deepmri.models import ModelStore, example_card, save_model
from deepmri.models.card import CardError, ModelCard
from deepmri.nets import register_architecture
from deepmri.progress import CancelToken
from deepmri.settings import Settings
from deepmri.tasks import get_task
from deepmri.tasks.base import RunContext, TaskError
from deepmri.tasks.segment import limit_csf_border, postprocess_labels, segment
from monai.networks.nets import UNet


class IntensityThreshold(torch.nn.Module):
    """A real 1x1x1 convolution whose two logits cross at `threshold` of the normalised intensity."""

    def __init__(self, threshold: float = 0.3, classes: int = 2) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, classes, 1)
        with torch.no_grad():
            steps = torch.arange(classes, dtype=torch.float32)
            self.conv.weight.copy_((steps * 20.0).view(classes, 1, 1, 1, 1))
            self.conv.bias.copy_(-steps * 20.0 * threshold * (steps + 1) / 2)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.conv(volume)


register_architecture("test.IntensityThreshold", IntensityThreshold)


def threshold_card(model_id: str, classes: int, mask: str | None = None) -> dict:
    labels = [
        {"value": value, "name": name, "color": color}
        for value, name, color in [
            (1, "Brain" if classes == 2 else "CSF", [0.9, 0.8, 0.5]),
            (2, "Grey matter", [0.5, 0.5, 0.9]),
            (3, "White matter", [0.9, 0.9, 0.9]),
        ][: classes - 1]
    ]
    card = example_card(
        id=model_id,
        architecture={
            "name": "test.IntensityThreshold",
            "config": {"threshold": 0.3, "classes": classes},
        },
        labels=labels,
        postprocessing=["largest_component", "fill_holes"] if classes == 2 else [],
    )
    card["preprocessing"] = {**card["preprocessing"], "spacing": [1.5, 1.5, 1.5], "mask": mask}
    card["inference"] = {"patch_size": [32, 32, 32], "overlap": 0.5, "flips": [[4], [2]]}
    return card


@pytest.fixture
def store(tmp_path) -> ModelStore:
    folder = tmp_path / "models"
    save_model(IntensityThreshold(0.3, 2), threshold_card("test-brain", 2), folder / "test-brain")
    save_model(
        IntensityThreshold(0.3, 4),
        threshold_card("test-tissue", 4, "test-brain"),
        folder / "test-tissue",
    )
    return ModelStore(Settings(home=tmp_path / "home"), extra_paths=(folder,))


def blob_image(size=(48, 44, 30), spacing=(0.9, 1.1, 2.5)) -> sitk.Image:
    """An ellipsoid of 'tissue' in noise, on an oblique, anisotropic grid."""
    image = make_oblique_image(size, spacing)
    k, j, i = np.meshgrid(*(np.linspace(-1, 1, n) for n in size[::-1]), indexing="ij")
    inside = (k / 0.7) ** 2 + (j / 0.6) ** 2 + (i / 0.6) ** 2 < 1
    rng = np.random.default_rng(3)
    values = np.where(inside, 300.0 + 40 * i, 10.0) + rng.normal(0, 5, inside.shape)
    blob = sitk.GetImageFromArray(values.astype(np.float32))
    blob.CopyInformation(image)
    return blob


def test_labels_come_back_on_the_exact_oblique_anisotropic_input_grid(store):
    image = blob_image()
    result = segment(image, "test-brain", store=store, device="cpu")
    assert same_geometry(result.labels, image, tolerance=0.0)
    assert result.labels.GetPixelID() == sitk.sitkUInt8
    labels = sitk.GetArrayFromImage(result.labels)
    truth = sitk.GetArrayFromImage(image) > 150
    dice = 2 * (labels.astype(bool) & truth).sum() / (labels.astype(bool).sum() + truth.sum())
    assert dice > 0.9  # measured 0.97: the threshold net, resampled twice, on a 2.5 mm axis
    assert result.label_info[0]["name"] == "Brain"


def test_input_image_is_not_modified(store):
    image = blob_image()
    before = sitk.GetArrayFromImage(image).copy()
    geometry = (image.GetSpacing(), image.GetOrigin(), image.GetDirection())
    segment(image, "test-tissue", store=store, device="cpu")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)
    assert (image.GetSpacing(), image.GetOrigin(), image.GetDirection()) == geometry


def test_tissue_model_runs_inside_the_mask_model_and_returns_extras(store):
    image = blob_image()
    result = segment(
        image, "test-tissue", store=store, device="cpu", probabilities=True, uncertainty=True
    )
    assert [m["id"] for m in result.provenance["models"]] == ["test-brain", "test-tissue"]
    assert sorted(result.probabilities) == ["CSF", "Grey matter", "White matter"]
    for probability in result.probabilities.values():
        assert same_geometry(probability, image, tolerance=0.0)
        values = sitk.GetArrayFromImage(probability)
        assert values.min() >= 0.0 and values.max() <= 1.0 + 1e-6
    assert same_geometry(result.uncertainty, image, tolerance=0.0)
    labels = sitk.GetArrayFromImage(result.labels)
    brain = sitk.GetArrayFromImage(segment(image, "test-brain", store=store).labels) > 0
    assert not labels[~brain].any()  # nothing outside the extracted brain
    assert set(np.unique(labels)) <= {0, 1, 2, 3}
    assert result.volumes_ml()["White matter"] > 0


def test_the_stripped_output_is_the_input_inside_the_mask_and_zero_outside(store):
    # SynthStrip's -o: the scan itself, same pixel type and grid, not a resampled copy.
    image = sitk.Cast(blob_image(), sitk.sitkUInt16)
    image.SetMetaData("descrip", "scan 7")
    before = sitk.GetArrayFromImage(image).copy()
    task = get_task("segment")
    result = task(
        {"image": image}, {"model": "test-brain"}, RunContext(store=store, wanted={"stripped"})
    )
    stripped, labels = result.images["stripped"], sitk.GetArrayFromImage(result.images["labels"])
    assert stripped.GetPixelID() == sitk.sitkUInt16 and same_geometry(stripped, image, 0.0)
    assert stripped.GetMetaData("descrip") == "scan 7"
    values = sitk.GetArrayFromImage(stripped)
    assert 0 < (labels > 0).mean() < 0.5  # a mask with voxels on both sides
    np.testing.assert_array_equal(values[labels > 0], before[labels > 0])
    assert not values[labels == 0].any()
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), before)
    unasked = task({"image": image}, {"model": "test-brain"}, RunContext(store=store))
    assert "stripped" not in unasked.images


def test_masking_a_scan_of_another_grid_is_refused(store):
    result = segment(blob_image(), "test-brain", store=store)
    with pytest.raises(InvalidImageError, match="grid of the labels"):
        result.masked(blob_image(spacing=(1.0, 1.1, 2.5)))


@pytest.mark.parametrize(
    "bad, message",
    [
        (sitk.Image([32, 32], sitk.sitkFloat32), "2D"),
        (sitk.Image([16, 16, 16], sitk.sitkFloat32), "empty"),
    ],
)
def test_bad_input_is_refused_before_any_work(store, bad, message):
    with pytest.raises(InvalidImageError, match=message):
        segment(bad, "test-brain", store=store)


def test_nan_input_is_refused_with_a_count(store):
    array = sitk.GetArrayFromImage(blob_image())
    array[0, 0, :5] = np.nan
    with pytest.raises(InvalidImageError, match="5 NaN"):
        segment(sitk.GetImageFromArray(array), "test-brain", store=store)


def test_cancel_stops_segmentation(store):
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        segment(blob_image(), "test-brain", store=store, cancel=token)


def run_cli(*arguments: str, env_extra: dict[str, str]) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run(
        [sys.executable, "-m", "deepmri", *arguments], capture_output=True, text=True, env=env
    )


@pytest.fixture
def unet_model_path(tmp_path) -> Path:
    """A real MONAI UNet (random weights) that a fresh CLI process can build from its card."""
    torch.manual_seed(0)
    card = example_card(id="test-unet")
    card["inference"]["patch_size"] = [32, 32, 32]
    network = UNet(**card["architecture"]["config"])
    save_model(network, card, tmp_path / "models" / "test-unet")
    return tmp_path / "models"


def test_cli_writes_labels_on_the_input_grid(tmp_path, unet_model_path):
    image = blob_image()
    write_image(image, tmp_path / "scan.nrrd")
    env = {"DEEPMRI_MODEL_PATH": str(unet_model_path), "DEEPMRI_HOME": str(tmp_path / "home")}
    done = run_cli(
        "segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "labels.nii.gz"),
        "--model", "test-unet", "--device", "cpu", "--probabilities", str(tmp_path / "probs"),
        "--uncertainty", str(tmp_path / "std.nrrd"), "--stripped", env_extra=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    # Without a path, the stripped scan is written beside the labels, under its output's name.
    assert same_geometry(read_image(tmp_path / "stripped.nii.gz"), image, tolerance=1e-5)
    assert same_geometry(read_image(tmp_path / "labels.nii.gz"), image, tolerance=1e-5)
    # The flags the README and the docs use keep working, with the one naming scheme.
    assert [p.name for p in (tmp_path / "probs").iterdir()] == ["probability-foreground.nii.gz"]
    for path in (tmp_path / "probs" / "probability-foreground.nii.gz", tmp_path / "std.nrrd"):
        assert same_geometry(read_image(path), image, tolerance=1e-5)
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["model"] == "test-unet" and "Foreground (mL)" in summary["measures"]


@pytest.mark.parametrize("kind", ["4d", "missing", "nan"])
def test_cli_reports_bad_input_in_one_line_without_traceback(tmp_path, unet_model_path, kind):
    if kind == "4d":
        nibabel = pytest.importorskip("nibabel")
        path = Path(nibabel.__file__).parent / "tests" / "data" / "example4d.nii.gz"
    elif kind == "missing":
        path = tmp_path / "absent.nii.gz"
    else:
        array = sitk.GetArrayFromImage(blob_image())
        array[1, 2, 3] = np.nan
        # NRRD keeps NaN; ITK's NIfTI reader turns NaN into 0 on load
        path = write_image(sitk.GetImageFromArray(array), tmp_path / "nan.nrrd")
    env = {"DEEPMRI_MODEL_PATH": str(unet_model_path), "DEEPMRI_HOME": str(tmp_path / "home")}
    done = run_cli(
        "segment", str(path), "-o", str(tmp_path / "out.nii.gz"), "--model", "test-unet",
        env_extra=env,
    )  # fmt: skip
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("deepmri: error:")
    assert not (tmp_path / "out.nii.gz").exists()


def test_a_model_whose_card_asks_for_zscore_runs_native_and_imported(store, tmp_path):
    """z-score normalisation (MONAI's NormalizeIntensity over non-zero voxels) from the card."""
    zscore = threshold_card("test-zscore", 2)
    zscore["preprocessing"]["normalization"] = {"method": "zscore"}
    network = IntensityThreshold(0.3, 2)
    save_model(network, zscore, tmp_path / "models" / "test-zscore")
    scripted = tmp_path / "zscore.pt"
    torch.jit.script(network).save(str(scripted))
    imported_card = {key: value for key, value in zscore.items() if key != "weights"}
    store.import_model(scripted, card=imported_card, model_id="test-zscore-imported")
    image = blob_image()
    truth = sitk.GetArrayFromImage(image) > 150
    native = segment(image, "test-zscore", store=store, device="cpu")
    imported = segment(image, "test-zscore-imported", store=store, device="cpu")
    for result in (native, imported):
        labels = sitk.GetArrayFromImage(result.labels).astype(bool)
        assert 2 * (labels & truth).sum() / (labels.sum() + truth.sum()) > 0.9
        assert same_geometry(result.labels, image, tolerance=0.0)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(native.labels), sitk.GetArrayFromImage(imported.labels)
    )


def test_zscore_and_percentile_steps_and_the_inverse_back_to_the_input_grid():
    from deepmri import preprocess

    image = blob_image()
    values = sitk.GetArrayFromImage(image)
    steps = preprocess.from_card(
        {"orientation": "RAS", "spacing": [1.5, 1.5, 1.5], "normalization": {"method": "zscore"}}
    )
    on_model_grid, trace = steps(image)
    normalised = sitk.GetArrayFromImage(on_model_grid)
    assert on_model_grid.GetSpacing() == (1.5, 1.5, 1.5)
    assert abs(normalised[normalised != 0].mean()) < 1e-3
    assert abs(normalised[normalised != 0].std() - 1) < 1e-3
    assert same_geometry(steps.invert(on_model_grid, trace), image, tolerance=0.0)
    percentile = preprocess.Normalise("percentile", 0.0, 100.0).array(values)
    assert percentile.min() == 0.0 and percentile.max() == 1.0
    with pytest.raises(ModelError, match="does not know"):
        preprocess.from_card({"normalization": {"method": "histogram"}})


@pytest.mark.parametrize("name", ["gpu", "GPU", "CUDA", "cuda:1"])
def test_a_gpu_asked_for_on_a_machine_without_one_gets_one_line_and_exit_2(
    tmp_path, unet_model_path, capsys, name
):
    if torch.cuda.is_available() and name != "cuda:1":
        pytest.skip("this machine has a CUDA GPU")
    if torch.cuda.device_count() > 1:
        pytest.skip("this machine has a cuda:1")
    from deepmri.cli import main

    write_image(blob_image(), tmp_path / "scan.nrrd")
    arguments = ["segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "labels.nii.gz")]
    assert main([*arguments, "--model", "test-unet", "--device", name]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deepmri: error: Device") and "CUDA" in error
    assert len(error.strip().splitlines()) == 1
    assert not (tmp_path / "labels.nii.gz").exists()


def test_the_device_error_has_no_traceback_from_a_fresh_process(tmp_path, unet_model_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    write_image(blob_image(), tmp_path / "scan.nrrd")
    env = {"DEEPMRI_MODEL_PATH": str(unet_model_path), "DEEPMRI_HOME": str(tmp_path / "home")}
    done = run_cli(
        "segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "l.nii.gz"),
        "--device", "gpu", env_extra=env,
    )  # fmt: skip
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


def test_a_bad_output_ending_is_refused_before_the_model_runs(tmp_path, unet_model_path, capsys):
    from deepmri.cli import main

    write_image(blob_image(), tmp_path / "scan.nrrd")
    for extra in (["-o", str(tmp_path / "labels.png")],
                  ["-o", str(tmp_path / "l.nii.gz"), "--uncertainty", str(tmp_path / "u.tiff")]):  # fmt: skip
        assert main(["segment", str(tmp_path / "scan.nrrd"), "--model", "test-unet", *extra]) == 2
        captured = capsys.readouterr()
        assert "file ending" in captured.err and "%]" not in captured.err  # no progress at all
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models", "scan.nrrd"]


@pytest.fixture
def infer_spy(monkeypatch):
    """Records the precision engine.infer is called with and the autocast dtype it then uses."""
    from deepmri import engine

    seen: dict[str, list] = {"precision": [], "dtype": []}
    real_infer, real_dtype = engine.infer, engine.autocast_dtype

    def infer(*arguments, **keywords):
        seen["precision"].append(keywords.get("precision"))
        return real_infer(*arguments, **keywords)

    def autocast_dtype(device, precision):
        seen["dtype"].append(real_dtype(device, precision))
        return seen["dtype"][-1]

    monkeypatch.setattr(engine, "infer", infer)
    monkeypatch.setattr(engine, "autocast_dtype", autocast_dtype)
    return seen


def test_precision_from_the_cli_batch_and_settings_reaches_engine_infer(
    tmp_path, unet_model_path, monkeypatch, infer_spy, capsys
):
    from deepmri.cli import main

    monkeypatch.setenv("DEEPMRI_MODEL_PATH", str(unet_model_path))
    monkeypatch.setenv("DEEPMRI_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DEEPMRI_PRECISION", raising=False)
    small = resample_to_spacing(blob_image(), (2.5, 2.5, 2.5))
    write_image(small, tmp_path / "scan.nrrd")
    command = ["segment", str(tmp_path / "scan.nrrd"), "--model", "test-unet", "--device", "cpu"]
    assert main([*command, "-o", str(tmp_path / "a.nii.gz"), "--precision", "bf16"]) == 0
    assert infer_spy["precision"] == ["bf16"] and infer_spy["dtype"] == [torch.bfloat16]
    # The Models panel saves the choice as DEEPMRI_PRECISION; the CLI reads it through Settings.
    monkeypatch.setenv("DEEPMRI_PRECISION", "fp32")
    assert main([*command, "-o", str(tmp_path / "b.nii.gz")]) == 0
    assert infer_spy["precision"][-1] == "fp32" and infer_spy["dtype"][-1] is None
    (tmp_path / "cases.csv").write_text("id,input\nscan,scan.nrrd\n")
    batch = ["batch", str(tmp_path / "cases.csv"), "-o", str(tmp_path / "out"), "--device", "cpu"]
    assert main([*batch, "--model", "test-unet", "--precision", "bf16"]) == 0
    assert infer_spy["precision"][-1] == "bf16"
    capsys.readouterr()


def test_threads_from_the_cli_are_applied_to_torch(tmp_path, unet_model_path, monkeypatch):
    from deepmri.cli import main

    monkeypatch.setenv("DEEPMRI_MODEL_PATH", str(unet_model_path))
    write_image(resample_to_spacing(blob_image(), (2.5, 2.5, 2.5)), tmp_path / "scan.nrrd")
    before = torch.get_num_threads()
    try:
        command = ["segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "l.nii.gz")]
        assert main([*command, "--model", "test-unet", "--device", "cpu", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_classical_tissue_through_the_task_gives_three_classes_inside_the_brain(mni_t1):
    pytest.importorskip("sklearn")
    from deepmri.tasks import get_task

    image = resample_to_spacing(mni_t1, (3.0, 3.0, 3.0))
    task = get_task("segment-classical")
    mask = task({"image": image}, {"method": "brain-mask"})
    tissue = task({"image": image}, {"method": "tissue"})
    brain = sitk.GetArrayFromImage(mask.images["labels"]) > 0
    labels = sitk.GetArrayFromImage(tissue.images["labels"])
    assert set(np.unique(labels)) == {0, 1, 2, 3} and not labels[~brain].any()
    assert same_geometry(tissue.images["labels"], image, tolerance=0.0)
    assert 1000 < mask.measures["Brain (mL)"] < 2200  # MNI152 brain: ~1.5-1.9 L
    assert sum(tissue.measures.values()) == pytest.approx(mask.measures["Brain (mL)"], abs=0.1)
    assert [label["name"] for label in tissue.info["label_info"]] == [
        "CSF",
        "Grey matter",
        "White matter",
    ]


def _two_convention_store(tmp_path) -> ModelStore:
    """A real threshold network with two labels: 1 (0.2-0.4 of the range) and 2 (above)."""
    card = threshold_card("test-brain-csf", 3)
    card["architecture"]["config"] = {"threshold": 0.2, "classes": 3}
    card["labels"][1]["name"] = "CSF around the brain"
    card["tight_labels"] = [1]
    card["postprocessing"] = ["largest_component", "fill_holes"]
    folder = tmp_path / "models"
    save_model(IntensityThreshold(0.2, 3), card, folder / "test-brain-csf")
    return ModelStore(Settings(home=tmp_path / "home"), extra_paths=(folder,))


def shell_image() -> sitk.Image:
    """A dim core (label 1) holding a bright 'ventricle', inside a bright shell (label 2)."""
    k, j, i = np.meshgrid(*(np.arange(40) - 19.5,) * 3, indexing="ij")
    radius = np.sqrt(k**2 + j**2 + i**2)
    values = np.where(radius < 16, 90.0, 5.0)
    values[radius < 12] = 30.0
    values[radius < 3] = 90.0
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.5, 1.5, 1.5))
    return image


def test_no_csf_gives_the_tight_brain_with_its_holes_filled(tmp_path):
    store = _two_convention_store(tmp_path)
    image = shell_image()
    default = sitk.GetArrayFromImage(segment(image, "test-brain-csf", store=store).labels)
    tight = sitk.GetArrayFromImage(segment(image, "test-brain-csf", csf=False, store=store).labels)
    values = sitk.GetArrayFromImage(image)
    assert set(np.unique(default)) == {0, 1, 2}
    assert set(np.unique(tight)) == {0, 1}
    assert (tight > 0).sum() < (default > 0).sum()
    assert tight[values == 30.0].all() and tight[20, 20, 20] == 1  # the inner 'ventricle' filled
    assert not tight[(values == 90.0) & (default == 2) & (tight == 0)].any()
    assert not (tight[default == 0]).any()


def test_csf_border_keeps_the_csf_within_its_millimetres_of_the_tight_brain(tmp_path):
    # The shell (label 2) is 4 voxels thick around a core of radius 12; 1.5 mm in x and y, 3 mm in
    # z: a 3 mm border keeps 2 shell voxels along x (1.5, 3 mm) and 1 along z (3 mm).
    store = _two_convention_store(tmp_path)
    card_path = tmp_path / "models" / "test-brain-csf" / "card.json"
    image = shell_image()
    image.SetSpacing((1.5, 1.5, 3.0))

    def shell_voxels(labels: np.ndarray) -> tuple[int, int]:
        return int((labels[20, 20, 32:] == 2).sum()), int((labels[32:, 20, 20] == 2).sum())

    whole = sitk.GetArrayFromImage(segment(image, "test-brain-csf", store=store).labels)
    card = json.loads(card_path.read_text())
    card["postprocessing"].append("csf_border")
    card["csf_border_mm"] = 3.0
    card_path.write_text(json.dumps(card))
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(tmp_path / "models",))
    bordered = sitk.GetArrayFromImage(segment(image, "test-brain-csf", store=store).labels)
    assert shell_voxels(whole) == (4, 4)
    assert shell_voxels(bordered) == (2, 1)
    assert ((bordered == 1) == (whole == 1)).all()  # the tight brain is untouched


def test_a_csf_border_measured_from_a_core_keeps_the_tight_brain_and_less_csf():
    # A ball of brain (radius 10 voxels, 1 mm) in a CSF shell out to radius 16; a border of 3 mm
    # keeps the shell to radius 13 from the brain, or to radius 11 from a core of radius 8.
    k, j, i = np.mgrid[:40, :40, :40] - 20
    radius = np.sqrt(i**2 + j**2 + k**2)
    labels = np.where(radius <= 10, 1, np.where(radius <= 16, 2, 0))
    from_brain = limit_csf_border(labels, [1], (1.0, 1.0, 1.0), 3.0)
    from_core = limit_csf_border(labels, [1], (1.0, 1.0, 1.0), 3.0, core=radius <= 8)
    assert (from_brain[20, 20, 31:] == 2).sum() == 3 and (from_core[20, 20, 31:] == 2).sum() == 1
    np.testing.assert_array_equal(from_core == 1, labels == 1)  # the brain itself is kept
    empty = limit_csf_border(labels, [1], (1.0, 1.0, 1.0), 3.0, core=np.zeros_like(radius, bool))
    np.testing.assert_array_equal(empty, from_brain)  # no core: measured from the brain


def test_a_users_csf_border_replaces_the_cards_and_is_recorded(tmp_path):
    # The same shell as above, with no border on the card: the user's 3 mm gives what the
    # card's 3 mm gives; 0 mm keeps no CSF outside the tight brain; the tight brain is the same.
    store = _two_convention_store(tmp_path)
    image = shell_image()
    image.SetSpacing((1.5, 1.5, 3.0))
    whole = segment(image, "test-brain-csf", store=store)
    three = segment(image, "test-brain-csf", csf_border_mm=3.0, store=store)
    none = segment(image, "test-brain-csf", csf_border_mm=0.0, store=store)
    whole_labels, three_labels, none_labels = (
        sitk.GetArrayFromImage(result.labels) for result in (whole, three, none)
    )
    assert int((three_labels[20, 20, 32:] == 2).sum()) == 2
    assert int((three_labels[32:, 20, 20] == 2).sum()) == 1
    assert int((none_labels[20, 20, 32:] == 2).sum()) == 0
    assert ((none_labels == 1) == (whole_labels == 1)).all()
    assert (none_labels > 0).sum() < (three_labels > 0).sum() < (whole_labels > 0).sum()
    assert three.provenance["csf_border_mm"] == 3.0 and "csf_border_mm" not in whole.provenance


@pytest.mark.parametrize("border", [-1.0, float("nan")])
def test_a_negative_or_not_a_number_csf_border_is_refused_before_work(tmp_path, border):
    with pytest.raises(TaskError, match="0 mm or more"):
        segment(shell_image(), "test-brain-csf", csf_border_mm=border,
                store=_two_convention_store(tmp_path))  # fmt: skip


def test_a_csf_border_with_a_one_convention_model_is_refused_before_work(store):
    with pytest.raises(ModelError, match="one mask convention.*--csf-border-mm"):
        segment(blob_image(), "test-brain", csf_border_mm=2.0, store=store)


def test_a_csf_border_step_needs_its_distance_and_tight_labels():
    data = copy.deepcopy(threshold_card("test-brain-csf", 3))
    data["postprocessing"] = ["csf_border"]
    with pytest.raises(CardError, match="csf_border_mm"):
        ModelCard.from_dict(data)
    data["csf_border_mm"] = 3.0
    with pytest.raises(CardError, match="tight_labels"):
        ModelCard.from_dict(data)
    data["tight_labels"] = [1]
    assert ModelCard.from_dict(data).to_dict()["csf_border_mm"] == 3.0


def test_no_csf_with_a_one_convention_model_is_refused_before_work(store):
    with pytest.raises(ModelError, match="one mask convention"):
        segment(blob_image(), "test-brain", csf=False, store=store)


def test_the_cli_passes_no_csf_to_the_task(tmp_path, unet_model_path):
    write_image(blob_image(), tmp_path / "scan.nrrd")
    env = {"DEEPMRI_MODEL_PATH": str(unet_model_path), "DEEPMRI_HOME": str(tmp_path / "home")}
    done = run_cli(
        "segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "labels.nii.gz"),
        "--model", "test-unet", "--no-csf", env_extra=env,
    )  # fmt: skip
    assert done.returncode != 0
    assert "one mask convention" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "labels.nii.gz").exists()


def test_the_cli_passes_the_csf_border_to_the_task(tmp_path, unet_model_path):
    write_image(blob_image(), tmp_path / "scan.nrrd")
    env = {"DEEPMRI_MODEL_PATH": str(unet_model_path), "DEEPMRI_HOME": str(tmp_path / "home")}
    done = run_cli(
        "segment", str(tmp_path / "scan.nrrd"), "-o", str(tmp_path / "labels.nii.gz"),
        "--model", "test-unet", "--csf-border-mm", "2", env_extra=env,
    )  # fmt: skip
    assert done.returncode != 0
    assert "--csf-border-mm" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "labels.nii.gz").exists()


def test_skull_stripped_input_takes_its_non_zero_voxels_as_the_brain(store):
    image = shell_image()  # zero outside a ball of radius 16 voxels
    result = segment(image, "test-tissue", skull_stripped=True, store=store)
    labels = sitk.GetArrayFromImage(result.labels)
    inside = sitk.GetArrayFromImage(image) > 0
    assert [model["id"] for model in result.provenance["models"]] == ["test-tissue"]
    assert "non-zero" in result.provenance["brain"]
    assert not labels[~inside].any() and labels[inside].any()


def three_shell_image() -> tuple[sitk.Image, np.ndarray]:
    """CSF shell, grey shell, white core (values 28 / 55 / 100 with noise), zero outside."""
    k, j, i = np.meshgrid(*(np.arange(40) - 19.5,) * 3, indexing="ij")
    radius = np.sqrt(k**2 + j**2 + i**2)
    truth = np.select([radius < 8, radius < 13, radius < 17], [3, 2, 1], 0).astype(np.uint8)
    values = np.select([truth == 3, truth == 2, truth == 1], [100.0, 55.0, 28.0], 0.0)
    values = np.where(truth > 0, values + np.random.default_rng(5).normal(0, 3, truth.shape), 0)
    image = sitk.GetImageFromArray(values.astype(np.float32))
    image.SetSpacing((1.2, 1.2, 1.2))
    return image, truth


def test_a_card_refinement_redraws_the_tissue_classes_at_the_image_intensities(tmp_path):
    card = threshold_card("test-tissue-refined", 4, "test-brain")
    card["inference"]["refinement"] = {"method": "gaussian-mixture"}
    folder = tmp_path / "models"
    save_model(IntensityThreshold(0.3, 2), threshold_card("test-brain", 2), folder / "test-brain")
    save_model(IntensityThreshold(0.3, 4), card, folder / "test-tissue-refined")
    plain_card = threshold_card("test-tissue", 4, "test-brain")
    save_model(IntensityThreshold(0.3, 4), plain_card, folder / "test-tissue")
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(folder,))
    image, truth = three_shell_image()
    plain = segment(image, "test-tissue", skull_stripped=True, store=store)
    refined = segment(
        image, "test-tissue-refined", skull_stripped=True, store=store, probabilities=True
    )
    assert refined.provenance["refinement"]["method"] == "gaussian-mixture"
    assert "refinement" not in plain.provenance
    labels = {
        name: sitk.GetArrayFromImage(r.labels)
        for name, r in [("plain", plain), ("refined", refined)]
    }
    inside = truth > 0
    assert labels["refined"][inside].min() >= 1  # every brain voxel is a tissue class
    accuracy = {
        name: float((value[inside] == truth[inside]).mean()) for name, value in labels.items()
    }
    # The threshold network's class boundaries sit at 0.6 / 0.9 of the normalised range, not
    # between these shells' intensities; the mixture moves them there.
    assert accuracy["refined"] > 0.98 and accuracy["refined"] > accuracy["plain"] + 0.1, accuracy
    total = sum(sitk.GetArrayFromImage(p) for p in refined.probabilities.values())
    np.testing.assert_allclose(total[inside], 1.0, atol=1e-5)


def test_a_card_with_an_unknown_refinement_is_refused_naming_the_field():
    from deepmri.models.card import CardError, ModelCard

    card = threshold_card("test-bad-refinement", 4)
    card["inference"]["refinement"] = {"method": "magic"}
    with pytest.raises(CardError, match="inference.refinement"):
        ModelCard.from_dict(card)
    card["inference"]["refinement"] = {"method": "gaussian-mixture", "bias_degree": -1}
    with pytest.raises(CardError, match="bias_degree"):
        ModelCard.from_dict(card)


class NeighbourThreshold(torch.nn.Module):
    """A real 1x1x3 convolution that thresholds the voxel's right-hand neighbour (x + 1): a
    network that is not mirror-symmetric, so a left-right flip changes its answer."""

    def __init__(self, threshold: float = 0.3) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, 2, (1, 1, 3), padding=(0, 0, 1))
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[1, 0, 0, 0, 2] = 20.0
            self.conv.bias.copy_(torch.tensor([0.0, -20.0 * threshold]))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.conv(volume)


register_architecture("test.NeighbourThreshold", NeighbourThreshold)


def _neighbour_store(tmp_path, average_flips: bool) -> ModelStore:
    card = threshold_card("test-neighbour", 2)
    card["architecture"] = {"name": "test.NeighbourThreshold", "config": {"threshold": 0.3}}
    card["postprocessing"] = []
    card["inference"] = {"patch_size": [32, 32, 32], "overlap": 0.5, "flips": [[4]]}
    if average_flips:
        card["inference"]["average_flips"] = True
    folder = tmp_path / ("averaged" if average_flips else "plain")
    save_model(NeighbourThreshold(0.3), card, folder / "test-neighbour")
    return ModelStore(Settings(home=tmp_path / "home"), extra_paths=(folder,))


def test_a_card_that_averages_flips_gives_the_same_labels_with_or_without_uncertainty(tmp_path):
    image = blob_image(spacing=(1.5, 1.5, 1.5))

    def labels(store: ModelStore, uncertainty: bool) -> np.ndarray:
        result = segment(image, "test-neighbour", uncertainty=uncertainty, store=store)
        return sitk.GetArrayFromImage(result.labels)

    plain, averaged = _neighbour_store(tmp_path, False), _neighbour_store(tmp_path, True)
    plain_labels = labels(plain, False)
    averaged_labels = labels(averaged, False)
    # Without the card key the flips run only for the map, so the labels change with it.
    assert (labels(plain, True) != plain_labels).any()
    assert np.array_equal(averaged_labels, labels(averaged, True))
    assert np.array_equal(averaged_labels, labels(plain, True))
    assert (averaged_labels != plain_labels).sum() > 10  # the mirrored pass moved the right edge


def _averaging_store(tmp_path, member_labels: int = 2) -> ModelStore:
    """test-brain (threshold 0.3, 1.5 mm) averaging with test-member (threshold 0.6, 2.5 mm)."""
    folder = tmp_path / "models"
    main = threshold_card("test-brain", 2)
    main["inference"]["average_with"] = ["test-member"]
    save_model(IntensityThreshold(0.3, 2), main, folder / "test-brain")
    member = threshold_card("test-member", member_labels)
    member["architecture"]["config"]["threshold"] = 0.6
    member["preprocessing"]["spacing"] = [2.5, 2.5, 2.5]
    save_model(IntensityThreshold(0.6, member_labels), member, folder / "test-member")
    alone = threshold_card("test-brain-alone", 2)
    save_model(IntensityThreshold(0.3, 2), alone, folder / "test-brain-alone")
    return ModelStore(Settings(home=tmp_path / "home"), extra_paths=(folder,))


def test_a_card_that_averages_with_another_model_draws_the_mean_of_both_on_the_input_grid(
    tmp_path,
):
    store = _averaging_store(tmp_path)
    image = blob_image()

    def brain_probability(model: str) -> tuple[np.ndarray, np.ndarray, dict]:
        result = segment(image, model, store=store, probabilities=True, uncertainty=True)
        spread = sitk.GetArrayFromImage(result.uncertainty)
        return sitk.GetArrayFromImage(result.probabilities["Brain"]), spread, result.provenance

    averaged, spread, provenance = brain_probability("test-brain")
    alone, alone_spread, _ = brain_probability("test-brain-alone")
    member, member_spread, _ = brain_probability("test-member")
    assert [m["id"] for m in provenance["models"]] == ["test-brain", "test-member"]
    np.testing.assert_allclose(averaged, (alone + member) / 2, atol=1e-5)
    assert np.abs(alone - member).max() > 0.5  # the two thresholds disagree somewhere
    # Each threshold is sure of itself under flips; the pair's spread is their disagreement: the
    # standard deviation of two values is half their difference.
    assert alone_spread.max() < 1e-3 and member_spread.max() < 1e-3
    np.testing.assert_allclose(spread, np.abs(alone - member) / 2, atol=1e-3)
    result = segment(image, "test-brain", store=store)
    assert same_geometry(result.labels, image, tolerance=0.0)
    card = store.get("test-brain").card.to_dict()
    drawn = postprocess_labels((averaged > 0.5).astype(np.int64), card, image.GetSpacing())
    assert np.array_equal(sitk.GetArrayFromImage(result.labels), drawn)
    alone_labels = sitk.GetArrayFromImage(segment(image, "test-brain-alone", store=store).labels)
    assert (alone_labels != drawn).sum() > 10  # the member moved the edge


def test_averaging_with_a_model_of_other_labels_or_none_installed_is_refused_by_name(tmp_path):
    store = _averaging_store(tmp_path, member_labels=4)
    image = blob_image()
    with pytest.raises(ModelError, match="test-member, whose labels differ"):
        segment(image, "test-brain", store=store)
    folder = tmp_path / "lonely"
    card = threshold_card("test-lonely", 2)
    card["inference"]["average_with"] = ["not-installed"]
    save_model(IntensityThreshold(0.3, 2), card, folder / "test-lonely")
    lonely = ModelStore(Settings(home=tmp_path / "home2"), extra_paths=(folder,))
    with pytest.raises(ModelError, match="No model 'not-installed' is installed"):
        segment(image, "test-lonely", store=lonely)

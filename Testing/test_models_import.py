"""Importing outside networks (TorchScript, ONNX, MONAI bundle, state dict) built in the test, and
running them through the real engine: outputs must equal running the original network directly.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
from deepmri.engine import infer
from deepmri.errors import CardError, ModelError
from deepmri.models import ModelStore
from deepmri.models.importers import CardNeeded, detect_format, draft_card, missing_fields
from deepmri.settings import Settings
from models_fixtures import TINY_UNET, tiny_card, tiny_unet

PATCH = (16, 16, 16)


@pytest.fixture
def store(tmp_path: Path) -> ModelStore:
    return ModelStore(Settings(home=tmp_path / "home"))


def volume(shape=(1, 1, 24, 20, 28), seed: int = 3) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def engine(network: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    return infer(network, inputs, PATCH, overlap=0.5, device="cpu", sw_batch_size=2).prediction


def imported_card(model_id: str) -> dict:
    card = tiny_card(model_id)
    card.pop("weights")
    return card


def test_torchscript_import_runs_through_the_engine_like_the_original(tmp_path, store):
    network = tiny_unet()
    scripted = tmp_path / "scripted-unet.pt"
    torch.jit.script(network).save(str(scripted))
    assert detect_format(scripted) == "torchscript"
    model = store.import_model(scripted, card=imported_card("ts-unet"))
    assert model.path == store.cache / "ts-unet"
    assert model.card.weights_format == "torchscript"
    loaded = store.get("ts-unet").load_network()
    with torch.no_grad():
        single = volume((1, 1, *PATCH))
        torch.testing.assert_close(engine(loaded, single), network(single), rtol=0, atol=1e-5)
        inputs = volume()
        torch.testing.assert_close(engine(loaded, inputs), engine(network, inputs))


@pytest.mark.parametrize("dynamic_batch", [True, False], ids=["dynamic-batch", "batch-of-1"])
def test_onnx_import_runs_through_the_engine_like_the_original(tmp_path, store, dynamic_batch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    network = tiny_unet(seed=1)
    exported = tmp_path / "unet.onnx"
    axes = {"image": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with torch.no_grad():
        torch.onnx.export(
            network,
            volume((1, 1, *PATCH)),
            str(exported),
            input_names=["image"],
            output_names=["logits"],
            dynamic_axes=axes,
            dynamo=False,
        )
    model = store.import_model(exported, card=imported_card("onnx-unet"))
    assert model.card.weights_format == "onnx"
    loaded = store.get("onnx-unet").load_network()
    with torch.no_grad():
        inputs = volume()
        # onnxruntime and torch kernels differ in float rounding only
        torch.testing.assert_close(
            engine(loaded, inputs), engine(network, inputs), rtol=1e-4, atol=1e-4
        )


def test_onnx_without_onnxruntime_says_what_to_install(tmp_path, store, monkeypatch):
    pytest.importorskip("onnx")
    exported = tmp_path / "unet.onnx"
    with torch.no_grad():
        torch.onnx.export(tiny_unet(), volume((1, 1, *PATCH)), str(exported), dynamo=False)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    with pytest.raises(ModelError, match="pip install onnxruntime"):
        store.import_model(exported, card=imported_card("onnx-missing"))
    assert not (store.cache / "onnx-missing").exists()


def write_bundle(folder: Path, network: torch.nn.Module, network_def: dict | None = None) -> Path:
    """A MONAI-bundle-format folder as MONAI's own bundles lay it out."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = {
        "bundle_root": ".",
        "num_classes": 2,
        "network_def": network_def
        or {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": "@num_classes",
            "channels": [4, 8],
            "strides": [2],
        },
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0]},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [16, 16, 16], "overlap": 0.25},
    }
    metadata = {
        "name": "Test Bundle UNet",
        "version": "0.2.0",
        "description": "A tiny bundle built by the test.",
        "copyright": "Copyright (c) the test",
        "references": ["A test, 2026"],
        "network_data_format": {
            "inputs": {"image": {"num_channels": 1, "modality": "MR"}},
            "outputs": {"pred": {"channel_def": {"0": "background", "1": "lesion"}}},
        },
    }
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    (folder / "configs" / "metadata.json").write_text(json.dumps(metadata))
    (folder / "LICENSE").write_text("Apache License\nVersion 2.0, January 2004\n")
    torch.save(network.state_dict(), folder / "models" / "model.pt")
    return folder


def test_monai_bundle_card_is_read_from_its_metadata_and_config(tmp_path):
    bundle = write_bundle(tmp_path / "bundle", tiny_unet())
    assert detect_format(bundle) == "monai-bundle"
    card = draft_card(bundle)
    assert card["id"] == "test-bundle-unet"
    assert card["labels"][0]["value"] == 1 and card["labels"][0]["name"] == "lesion"
    assert card["preprocessing"]["spacing"] == [1.5, 1.5, 2.0]
    assert card["preprocessing"]["orientation"] == "RAS"
    assert card["preprocessing"]["normalization"] == {"method": "zscore"}
    assert card["inference"]["patch_size"] == [16, 16, 16]
    assert card["inference"]["overlap"] == 0.25
    assert card["input"]["axis_order"] == "xyz"
    assert card["license"] == "Apache License"
    assert card["citation"] == "A test, 2026"
    assert missing_fields(card) == []


def test_monai_bundle_import_runs_through_the_engine_like_the_original(tmp_path, store):
    network = tiny_unet(seed=2)
    bundle = write_bundle(tmp_path / "bundle", network)
    model = store.import_model(bundle)
    assert model.path == store.cache / "test-bundle-unet"
    assert model.card.weights_format == "monai-bundle"
    assert (model.path / "configs" / "inference.json").is_file()
    loaded = store.get("test-bundle-unet").load_network()
    inputs_zyx = volume()
    inputs_xyz = inputs_zyx.permute(0, 1, 4, 3, 2)  # MONAI arrays are (x, y, z)
    with torch.no_grad():
        expected = engine(network, inputs_xyz).permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(engine(loaded, inputs_zyx), expected)
        single = volume((1, 1, *PATCH))
        direct = network(single.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(engine(loaded, single), direct, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"channels": "$__import__('pathlib').Path('owned').touch() or [4, 8]"}, "Python code"),
        ({"_target_": "subprocess.Popen"}, "only MONAI and torch.nn"),
    ],
)
def test_monai_bundle_that_would_run_code_is_refused(tmp_path, store, changes, reason, monkeypatch):
    monkeypatch.chdir(tmp_path)
    network_def = {**TINY_UNET, "_target_": "UNet", **changes}
    bundle = write_bundle(tmp_path / "bundle", tiny_unet(), network_def=network_def)
    with pytest.raises(ModelError, match=reason):
        store.import_model(bundle)
    assert list(store.cache.iterdir()) == []
    assert not (tmp_path / "owned").exists()


def test_an_imported_bundle_whose_config_was_changed_is_refused(tmp_path, store):
    model = store.import_model(write_bundle(tmp_path / "bundle", tiny_unet()))
    config = model.path / "configs" / "inference.json"
    content = json.loads(config.read_text())
    content["network_def"]["channels"] = [8, 16]
    config.write_text(json.dumps(content))
    with pytest.raises(ModelError, match="inference.json was changed"):
        store.get(model.card.id).load_network()


def test_a_zipped_monai_bundle_imports_like_the_folder(tmp_path, store):
    import shutil

    network = tiny_unet(seed=6)
    bundle = write_bundle(tmp_path / "zipped" / "lesion_bundle", network)
    archive = shutil.make_archive(str(tmp_path / "lesion_bundle"), "zip", tmp_path / "zipped")
    assert detect_format(archive) == "monai-bundle"
    model = store.import_model(archive)
    assert model.card.id == "test-bundle-unet" and bundle.is_dir()
    inputs = volume()
    with torch.no_grad():
        expected = engine(network, inputs.permute(0, 1, 4, 3, 2)).permute(0, 1, 4, 3, 2)
        torch.testing.assert_close(engine(model.load_network(), inputs), expected)


def test_a_network_file_without_a_card_gets_a_draft_to_complete(tmp_path, store):
    scripted = tmp_path / "My Net.pt"
    torch.jit.script(tiny_unet()).save(str(scripted))
    with pytest.raises(CardNeeded) as caught:
        store.import_model(scripted)
    draft = caught.value.draft
    assert draft["id"] == "my-net"
    missing = missing_fields(draft)
    assert {"preprocessing.spacing", "inference.patch_size", "labels[0].name", "license"} <= set(
        missing
    )
    with pytest.raises(CardError, match="preprocessing.spacing"):
        store.import_model(scripted, card=draft)


def test_a_state_dict_is_converted_to_safetensors_for_the_cards_network(tmp_path, store):
    network = tiny_unet(seed=4)
    weights = tmp_path / "checkpoint.pth"
    torch.save({"model": network.state_dict(), "epoch": 3}, weights)
    assert detect_format(weights) == "state-dict"
    card = imported_card("from-state-dict")
    model = store.import_model(weights, card=card)
    assert model.card.weights_format == "safetensors"
    assert model.card.architecture == {"name": "monai.UNet", "config": TINY_UNET}
    loaded = store.get("from-state-dict").load_network()
    with torch.no_grad():
        inputs = volume()
        torch.testing.assert_close(engine(loaded, inputs), engine(network, inputs))


class NotATensor:
    """Anything that would need arbitrary unpickling to load."""


def test_a_pickle_with_objects_is_refused_not_unpickled(tmp_path, store):
    weights = tmp_path / "pickled.pt"
    torch.save({"weight": torch.zeros(2), "payload": NotATensor()}, weights)
    with pytest.raises(ModelError, match="weights only"):
        store.import_model(weights, card=imported_card("pickled"))


def test_a_deepmri_folder_is_copied_into_the_cache_under_a_new_id(tmp_path, store):
    from models_fixtures import make_model

    source = make_model(tmp_path / "shared" / "lab-net", "lab-net")
    model = store.import_model(source.path, model_id="lab-net-copy")
    assert model.path == store.cache / "lab-net-copy"
    assert model.card.weights == source.card.weights
    model.load_network()
    assert source.path.is_dir()  # the original stays where it was


def test_an_imported_model_segments_like_the_native_one_through_the_segment_task(
    tmp_path, oblique_image
):
    import SimpleITK as sitk
    from deepmri.tasks.segment import segment
    from models_fixtures import make_model

    native = make_model(tmp_path / "extra" / "native-net", "native-net")
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(tmp_path / "extra",))
    scripted = tmp_path / "native.pt"
    torch.jit.script(native.load_network()).save(str(scripted))
    card = native.card.to_dict()
    card.pop("weights")
    store.import_model(scripted, card=card, model_id="scripted-net")
    ours = segment(oblique_image, model="native-net", store=store, probabilities=True)
    imported = segment(oblique_image, model="scripted-net", store=store, probabilities=True)
    np_labels = [sitk.GetArrayFromImage(result.labels) for result in (ours, imported)]
    assert (np_labels[0] == np_labels[1]).all() and np_labels[0].any()
    for name, probability in ours.probabilities.items():
        difference = sitk.GetArrayFromImage(probability) - sitk.GetArrayFromImage(
            imported.probabilities[name]
        )
        assert abs(difference).max() < 1e-5
    assert imported.model_id == "scripted-net"

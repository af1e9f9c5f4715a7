"""Model cards and the store: round trips, field-naming errors, tampered weights refused.

Real cards and real safetensors files written by `save_model`; no stand-in store.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from deepmri.errors import CardError, ModelError
from deepmri.models import (
    CARD_FILE,
    Model,
    ModelCard,
    ModelStore,
    example_card,
    save_model,
    sha256_of,
)
from deepmri.nets import build_network
from deepmri.settings import BUNDLED_MODELS_DIR, Settings


def tiny_card(model_id: str = "tiny-unet", **overrides) -> dict:
    card = example_card(id=model_id, **overrides)
    card["metrics"] = [{"name": "dice", "value": 0.5, "dataset": "synthetic", "command": "pytest"}]
    return card


def tiny_model(folder, model_id: str = "tiny-unet") -> Model:
    card = tiny_card(model_id)
    torch.manual_seed(0)
    network = build_network(card["architecture"]["name"], card["architecture"]["config"])
    return save_model(network, card, folder)


def test_card_round_trips_through_dict_and_file(tmp_path):
    card = ModelCard.from_dict(tiny_card())
    assert ModelCard.from_dict(card.to_dict()) == card
    card.extra["x_custom"] = {"kept": True}
    path = card.save(tmp_path)
    again = ModelCard.from_file(path)
    assert again == card
    assert again.to_dict() == card.to_dict()
    assert json.loads(path.read_text())["x_custom"] == {"kept": True}


def _set(data: dict, dotted: str, value) -> None:
    keys = dotted.replace("[", ".").replace("]", "").split(".")
    target = data
    for key in keys[:-1]:
        target = target[int(key)] if key.isdigit() else target[key]
    last = keys[-1]
    if value is _DELETE:
        del target[last]
    else:
        target[int(last) if last.isdigit() else last] = value


_DELETE = object()


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("id", "Has Spaces"),
        ("task", "astrology"),
        ("architecture", _DELETE),
        ("preprocessing.spacing", [1.0, -1.0, 1.0]),
        ("preprocessing.spacing", [1.0, 1.0]),
        ("preprocessing.orientation", "RRA"),
        ("preprocessing.normalization.method", "magic"),
        ("inference.patch_size", [32, 32]),
        ("inference.overlap", 1.5),
        ("inference.average_with", "brain-extraction"),
        ("inference.average_with", [""]),
        ("labels[0].value", 0),
        ("labels[0].name", ""),
        ("labels[0].color", [2.0, 0.0, 0.0]),
        ("weights.sha256", "not-a-hash"),
        ("weights.size", -3),
        ("weights.file", "../escape.safetensors"),
        ("weights.format", "pickle"),
        ("license", ""),
        ("metrics[0].value", "high"),
        ("metrics[0].baseline", "low"),
        ("metrics[0].peers", {"deepbet": "good"}),
        ("metrics[0].peers", [0.9]),
        ("tight_labels", [7]),
        ("part_of", "Not An Id"),
        ("part_of", ["brain-extraction"]),
    ],
)
def test_bad_card_names_the_bad_field(field, value):
    data = copy.deepcopy(tiny_card())
    _set(data, field, value)
    with pytest.raises(CardError) as error:
        ModelCard.from_dict(data)
    # 'preprocessing.normalization.method' is reported as such; others by their own path.
    assert f"'{field}'" in str(error.value)


def test_tight_labels_round_trip_and_are_left_out_when_empty():
    data = copy.deepcopy(tiny_card())
    assert "tight_labels" not in ModelCard.from_dict(data).to_dict()
    data["tight_labels"] = [data["labels"][0]["value"]]
    card = ModelCard.from_dict(data)
    assert ModelCard.from_dict(card.to_dict()).tight_labels == data["tight_labels"]


def test_part_of_round_trips_and_names_the_task_in_listings():
    data = copy.deepcopy(tiny_card())
    card = ModelCard.from_dict(data)
    assert "part_of" not in card.to_dict() and card.task_text == "segmentation"
    data["part_of"] = "brain-extraction"
    card = ModelCard.from_dict(data)
    assert ModelCard.from_dict(card.to_dict()).part_of == "brain-extraction"
    assert card.task_text == "segmentation, part of brain-extraction"


def test_card_file_that_is_not_json_says_where(tmp_path):
    path = tmp_path / CARD_FILE
    path.write_text('{"id": "x",\n "version": }')
    with pytest.raises(CardError, match="line 2"):
        ModelCard.from_file(path)


def test_saved_model_loads_and_matches_the_network(tmp_path):
    model = tiny_model(tmp_path / "tiny")
    assert model.card.weights["sha256"] == sha256_of(model.weights_path)
    assert model.card.weights["size"] == model.weights_path.stat().st_size
    network = model.load_network()
    assert not network.training
    with torch.no_grad():
        output = network(torch.rand(1, 1, 16, 16, 16))
    assert output.shape == (1, 2, 16, 16, 16)


def test_tampered_weights_are_refused_on_load(tmp_path):
    model = tiny_model(tmp_path / "tiny")
    data = bytearray(model.weights_path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit of one byte
    model.weights_path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="sha256") as error:
        Model(model.path).load_network()
    assert "will not be loaded" in str(error.value)


def test_truncated_weights_are_refused_by_size(tmp_path):
    model = tiny_model(tmp_path / "tiny")
    model.weights_path.write_bytes(model.weights_path.read_bytes()[:-10])
    with pytest.raises(ModelError, match="bytes but the card says"):
        Model(model.path).verify()


def test_store_lists_bundled_cache_and_extra_models(tmp_path):
    extra = tmp_path / "extra"
    tiny_model(extra / "tiny-extra", "tiny-extra")
    settings = Settings(home=tmp_path / "home")
    tiny_model(settings.model_cache / "tiny-cached", "tiny-cached")
    broken = extra / "broken"
    broken.mkdir()
    (broken / CARD_FILE).write_text(json.dumps({**tiny_card("broken"), "task": "astrology"}))
    store = ModelStore(settings, extra_paths=(extra,))
    rows = {row.id: row for row in store.list()}
    assert rows["tiny-cached"].source == "cache" and rows["tiny-cached"].status == "ok"
    assert rows["tiny-extra"].source == "extra"
    assert "'task'" in rows["broken"].status
    bundled = [p for p in sorted(BUNDLED_MODELS_DIR.glob(f"*/{CARD_FILE}"))]
    for card_path in bundled:
        card = ModelCard.from_file(card_path)
        assert rows[card.id].source == "bundled"
    assert store.get("tiny-extra").card.id == "tiny-extra"
    assert store.get(extra / "tiny-extra").path == extra / "tiny-extra"
    with pytest.raises(ModelError, match="No model 'nothing-here'"):
        store.get("nothing-here")
    store.remove("tiny-cached")
    assert not (settings.model_cache / "tiny-cached").exists()
    with pytest.raises(ModelError, match="only cached"):
        store.remove("tiny-extra")


@pytest.mark.parametrize(
    "card_path", sorted(BUNDLED_MODELS_DIR.glob(f"*/{CARD_FILE}")), ids=lambda p: p.parent.name
)
def test_a_bundled_cards_training_command_lists_each_step_once(card_path):
    # The chain of runs behind a model is how it is reproduced: a step listed twice (a run
    # recorded once as it ran and again annotated by hand) would be run twice.
    command = json.loads(card_path.read_text())["training"]["command"]
    steps = [step.strip() for step in command.split(" && ")]
    assert all(steps), f"an empty step in {card_path.parent.name}'s training command"
    repeated = {step for step in steps if steps.count(step) > 1}
    assert not repeated, f"listed more than once: {sorted(repeated)}"

"""Training side of segmentation: the synthetic generator, label maps and a tiny training run.

Fast by design (tiny grids, two iterations); the head registration and real runs are slow-marked.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")

from deepmri.intensity import normalize_percentile  # noqa: E402
from deepmri.masks import distance_outside_mm  # noqa: E402
from deepmri.train.labels import (  # noqa: E402
    BRAIN_LABELS,
    CSF,
    CSF_BORDER_MM,
    FAR_CSF,
    GREY,
    OUTER_CSF,
    SHELL_FIRST,
    WHITE,
    TrainingDataError,
    load_sources,
    mni_source,
    save_sources,
    split_outer_csf,
)
from deepmri.train.synth import (  # noqa: E402
    BRAIN_EXTRACTION,
    BRAIN_TISSUE,
    GeneratorParameters,
    GridSpec,
    _add_shells,
    euler_matrix,
    generate,
    sample_parameters,
)

SMALL = GridSpec((40, 48, 40), 4.0)


@pytest.fixture(scope="module")
def sources():
    return {"mni": mni_source()}


@pytest.fixture(scope="module")
def sources_file(sources, tmp_path_factory):
    """The tissue recipe's label maps built once for the module's tiny runs (~14 s a build);
    the runs that test building them pass `sources_file=None`."""
    return save_sources(sources, tmp_path_factory.mktemp("sources") / "brain-tissue.npz")


def _mni_only(params: GeneratorParameters) -> GeneratorParameters:
    params.source = "mni"
    return params


def test_normalize_percentile_maps_positive_voxels_to_unit_range():
    values = np.concatenate([np.zeros(100), np.linspace(1.0, 100.0, 1000)])
    output = normalize_percentile(values)
    assert output.min() == 0.0 and output.max() == 1.0
    # Percentiles ignore the zero background: the median of the positive part lands near 0.5.
    assert abs(float(np.median(output[100:])) - 0.5) < 0.01


def test_mni_label_map_is_brain_only_with_plausible_tissue_volumes(sources):
    mni = sources["mni"]
    volumes = {value: int((mni.labels == value).sum()) / 1000 for value in BRAIN_LABELS}
    # ml at 1 mm, measured: CSF 160 (85 inside the tight brain, 75 around it), GM 1091, WM 636
    # for the ICBM152 2009a maps (argmax labels).
    assert 140 < volumes[CSF] + volumes[OUTER_CSF] < 180
    assert 60 < volumes[OUTER_CSF] < 90 and 70 < volumes[CSF] < 100
    assert 1050 < volumes[2] < 1130 and 600 < volumes[3] < 670
    assert {0, *BRAIN_LABELS} <= set(np.unique(mni.labels)) <= {0, *BRAIN_LABELS, FAR_CSF}
    assert (
        mni.labels == FAR_CSF
    ).sum() < 1000  # the template's CSF hugs its brain (measured: 0.1 mL)
    assert np.allclose(mni.tissue.sum(0)[mni.labels > 0], 1.0, atol=1e-3)
    assert mni.distance[mni.labels > 0].max() == 0 and mni.distance.max() > 20


@pytest.mark.parametrize("task", [BRAIN_EXTRACTION, BRAIN_TISSUE])
def test_generator_is_deterministic_from_parameters(sources, task):
    params = _mni_only(sample_parameters(7, task, sources, SMALL.spacing))
    again = GeneratorParameters(**json.loads(json.dumps(params.to_dict())))
    first_image, first_target = generate(params, sources, SMALL)
    second_image, second_target = generate(again, sources, SMALL)
    assert np.array_equal(first_image, second_image)
    assert np.array_equal(first_target, second_target)
    other_image, _ = generate(_mni_only(sample_parameters(8, task, sources, 4.0)), sources, SMALL)
    assert not np.array_equal(first_image, other_image)


def test_wider_bias_range_changes_only_the_bias(sources):
    """--bias-max widens the bias field without shifting any other draw: same anatomy, pose,
    contrast and crop for a seed, so runs with and without it see the same heads."""
    usual = sample_parameters(5, BRAIN_EXTRACTION, sources, SMALL.spacing).to_dict()
    wider = sample_parameters(5, BRAIN_EXTRACTION, sources, SMALL.spacing, bias_max=1.0).to_dict()
    assert wider.pop("bias_strength") == pytest.approx(usual.pop("bias_strength") * 2.0)
    assert wider == usual


def test_csf_variation_changes_no_other_draw(sources):
    usual = sample_parameters(5, BRAIN_EXTRACTION, sources, SMALL.spacing).to_dict()
    varied = sample_parameters(
        5, BRAIN_EXTRACTION, sources, SMALL.spacing, csf_variation_max=3.0
    ).to_dict()
    assert usual.pop("csf_variation_mm") == 0.0
    assert 0.0 < varied.pop("csf_variation_mm") <= 3.0
    assert varied == usual


def test_a_share_of_whole_heads_from_the_mni152_head_changes_no_other_draw():
    names = {"mni": None, "head": None, "mni152-head": None}
    for seed in range(40):
        usual = sample_parameters(seed, BRAIN_EXTRACTION, names, 2.0).to_dict()
        assert (
            sample_parameters(seed, BRAIN_EXTRACTION, names, 2.0, 0.5, 0.0, 0.0).to_dict() == usual
        )
        moved = sample_parameters(seed, BRAIN_EXTRACTION, names, 2.0, 0.5, 0.0, 1.0).to_dict()
        expected = "mni152-head" if usual["source"] == "head" else usual["source"]
        assert moved.pop("source") == expected
        assert moved == {key: value for key, value in usual.items() if key != "source"}


def _rim_widths(variation_mm: float) -> np.ndarray:
    """The CSF rim's width (mm) around a ball of radius 20 on a 1 mm grid: the farthest rim voxel
    from the ball in each of ~200 directions."""
    coordinates = np.indices((64, 64, 64)) - 31.5
    radius = np.sqrt((coordinates**2).sum(0))
    labels = np.where(radius <= 20, WHITE, 0).astype(np.uint8)
    params = GeneratorParameters(**{**_any_parameters(), "shells_mm": [2.0, 2, 3, 2, 4, 2]})
    params.shell_wobble_mm, params.csf_variation_mm = 0.0, variation_mm
    distance = np.clip(radius - 20, 0, None)
    shells = _add_shells(labels, distance, params, None, np.random.default_rng(0))
    assert (shells[labels > 0] == WHITE).all()  # the brain is never relabelled
    rim = shells == OUTER_CSF
    directions = np.round(coordinates[:, rim] / radius[rim] * 4).astype(int)
    _, direction = np.unique(directions, axis=1, return_inverse=True)
    widths = np.zeros(direction.max() + 1)
    np.maximum.at(widths, direction.ravel(), distance[rim])
    return widths


def _any_parameters() -> dict:
    return sample_parameters(3, BRAIN_EXTRACTION, {"mni": None, "head": None}, 2.0).to_dict()


def test_csf_variation_makes_the_rim_thin_in_places_and_wide_in_others():
    even, varied = _rim_widths(0.0), _rim_widths(3.0)
    assert np.percentile(even, 90) - np.percentile(even, 10) <= 0.5  # one width: 2 mm
    assert np.percentile(varied, 90) - np.percentile(varied, 10) >= 1.5
    assert varied.max() <= CSF_BORDER_MM


def test_generator_output_is_normalised_with_brain_targets(sources):
    for seed in range(4):
        params = _mni_only(sample_parameters(seed, BRAIN_EXTRACTION, sources, SMALL.spacing))
        image, target = generate(params, sources, SMALL)
        assert image.shape == SMALL.shape and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(np.unique(target)) <= {0, 1, 2}
        # Brain ~1.8 l at (4 mm)^3 = 64 ul per voxel; scaling and crops change it moderately.
        assert 10_000 < (target == 1).sum() < 45_000
        # The CSF around the brain (label 2) is a thin rim: MNI's own 75 ml, plus the shell's.
        assert (target == 2).sum() < 0.4 * (target == 1).sum()


def test_shell_csf_rim_joins_the_default_mask_not_the_tight_brain(sources):
    params = _mni_only(sample_parameters(3, BRAIN_EXTRACTION, sources, SMALL.spacing))
    params.shells_mm = [3.0, 2.0, 3.0, 2.0, 5.0, 3.0]
    params.crop_mm = [0.0] * 6
    _, with_rim = generate(params, sources, SMALL)
    params.shells_mm = []
    _, without = generate(params, sources, SMALL)
    assert np.array_equal(with_rim == 1, without == 1)
    assert (with_rim == 2).sum() > 2 * (without == 2).sum()


def test_shell_csf_is_labelled_only_up_to_the_csf_border_from_the_brain(sources):
    # The shells start at the MNI mask's edge (1-2 mm outside the tight brain) and wobble: a
    # 3 mm CSF shell reached 9-11 mm from the brain on this 4 mm grid before the label was capped.
    params = _mni_only(sample_parameters(2, BRAIN_EXTRACTION, sources, SMALL.spacing))
    params.shells_mm = [3.0, 2.0, 3.0, 2.0, 5.0, 3.0]
    params.shell_wobble_mm = 2.5
    params.crop_mm = [0.0] * 6
    image, target = generate(params, sources, SMALL)
    uncapped = {"mni": replace(sources["mni"], tight_distance=None)}
    same_image, wider = generate(params, uncapped, SMALL)
    assert np.array_equal(image, same_image)  # the fluid stays in the image; only its label stops
    rim = distance_outside_mm(target == 1, (SMALL.spacing,) * 3)[target == 2]
    assert rim.max() <= CSF_BORDER_MM + SMALL.spacing  # within a voxel of the border
    assert (target == 2).sum() < 0.8 * (wider == 2).sum()


def test_csf_around_the_brain_stops_at_the_border_and_the_rest_is_far_csf():
    # A phantom: a white-matter ball, a 2 mm grey rim, then 10 mm of CSF (wide, as over an
    # atrophic vertex). The default mask's CSF must stop CSF_BORDER_MM from the brain.
    radius = np.sqrt(((np.indices((60, 60, 60)) - 30.0) ** 2).sum(0))
    labels = np.select([radius <= 12, radius <= 14, radius <= 24], [WHITE, GREY, CSF], 0)
    split = split_outer_csf(labels.astype(np.uint8), (1.0, 1.0, 1.0))
    outer, far = radius[split == OUTER_CSF], radius[split == FAR_CSF]
    assert outer.min() > 14 and outer.max() <= 14 + CSF_BORDER_MM + 1
    assert far.min() > 14 + CSF_BORDER_MM - 1 and far.max() > 23
    assert not np.isin(split[radius <= 14], (OUTER_CSF, FAR_CSF)).any()


def test_rotated_in_corners_get_no_csf_rim_or_shells(sources):
    # The source's distance map is sampled with border padding: corners brought in from outside
    # the source by a large rotation are far from the brain, so no rim or shell is drawn there.
    params = _mni_only(sample_parameters(3, BRAIN_EXTRACTION, sources, SMALL.spacing))
    params.shells_mm = [3.0, 2.0, 3.0, 2.0, 5.0, 3.0]
    params.shell_wobble_mm = 2.0
    params.rotation_deg = [0.0, 0.0, 40.0]
    params.crop_mm = [0.0] * 6
    _, target = generate(params, sources, SMALL)
    from scipy import ndimage

    near_brain = ndimage.binary_dilation(target == 1, iterations=3)
    assert (target == 2).any() and not ((target == 2) & ~near_brain).any()


def test_shells_wrap_the_brain_without_touching_it(sources):
    params = _mni_only(sample_parameters(3, BRAIN_EXTRACTION, sources, SMALL.spacing))
    params.shells_mm = [2.0, 2.0, 3.0, 2.0, 5.0, 3.0]
    params.mode = "synthetic"
    params.means = [0.0] * SHELL_FIRST + [1.0] * 6
    params.means[1:4] = [0.4, 0.4, 0.4]
    params.stds = [0.0] * len(params.stds)
    params.noise = params.bias_strength = params.blur_voxels = 0.0
    params.gamma, params.invert, params.thick_axis = 1.0, False, -1
    params.crop_mm = [0.0] * 6
    image, target = generate(params, sources, SMALL)
    shell = image > 0.9
    assert shell.sum() > 0.3 * target.sum()
    assert not (shell & (target > 0)).any()


def test_tissue_targets_have_three_classes_inside_a_zero_background(sources):
    params = _mni_only(sample_parameters(5, BRAIN_TISSUE, sources, SMALL.spacing))
    image, target = generate(params, sources, SMALL)
    assert set(np.unique(target)) == {0, 1, 2, 3}
    # Outside the (randomly eroded or dilated) brain mask the input is exactly zero, as at inference.
    assert (image[target == 0] == 0).mean() > 0.8 and image.min() >= 0


def test_two_iteration_training_run_writes_a_loadable_model(tmp_path, sources_file):
    from deepmri.train.segment import export, train
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    state = train(
        BRAIN_TISSUE,
        tmp_path / "run",
        minutes=5.0,
        seed=3,
        max_iterations=2,
        threads=1,
        workers=0,
        validation_size=1,
        recipe_overrides={"shape": (32, 32, 32), "spacing": 5.0, "channels": (4, 8, 16, 32)},
        command="test",
    )
    # Validation of the starting weights (iteration 0), then at the end.
    assert state["iteration"] == 2 and [e["iteration"] for e in state["history"]] == [0, 2]
    assert len(state["history"][-1]["validation_dice"]) == 3
    card = export(tmp_path / "run", tmp_path / "model")
    weights = load_file(str(tmp_path / "model" / card["weights"]["file"]))
    assert all(tensor.dtype == torch.float16 for tensor in weights.values())
    assert card["preprocessing"]["normalization"] == {
        "method": "percentile",
        "lower": 0.5,
        "upper": 99.5,
    }
    assert card["training"]["iterations"] == 2 and card["labels"][1]["name"] == "Grey matter"
    resumed = train(
        BRAIN_TISSUE,
        tmp_path / "run",
        minutes=5.0,
        seed=3,
        resume=True,
        max_iterations=3,
        threads=1,
        workers=0,
        validation_size=1,
        recipe_overrides={"shape": (32, 32, 32), "spacing": 5.0, "channels": (4, 8, 16, 32)},
        sources_file=sources_file,  # the first run built them from the label code
        command="test resume",
    )
    assert resumed["iteration"] == 3 and resumed["commands"] == ["test", "test resume"]


TINY = {"shape": (32, 32, 32), "spacing": 5.0, "channels": (4, 8, 16, 32)}


def _tiny_run(path, sources_file, **options):
    from deepmri.train.segment import train

    torch.set_num_threads(1)
    settings = dict(seed=4, threads=1, workers=0, validation_size=1, recipe_overrides=TINY)
    settings["sources_file"] = sources_file
    return train(BRAIN_TISSUE, path, command="test", **(settings | options))


def test_a_run_is_defined_by_its_iterations_not_the_clock(tmp_path, sources_file):
    first = _tiny_run(tmp_path / "a", sources_file, max_iterations=3, validation_every=2)
    second = _tiny_run(
        tmp_path / "b", sources_file, max_iterations=3, validation_every=2, minutes=60.0
    )
    weights = [torch.load(tmp_path / run / "best.pt", weights_only=True) for run in "ab"]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
    # Validation at iteration 0 (the starting weights), every 2 iterations and at the end.
    assert [entry["iteration"] for entry in first["history"]] == [0, 2, 3]
    assert second["iteration"] == 3


def test_init_from_copies_weights_and_widens_the_output_layer(tmp_path, sources_file):
    from deepmri.train.segment import RECIPES, build_network, export, load_initial_weights

    _tiny_run(tmp_path / "run", sources_file, max_iterations=2)
    card = export(tmp_path / "run", tmp_path / "model")
    assert card["training"]["cumulative_iterations"] == 2
    narrow = build_network(replace(RECIPES[BRAIN_TISSUE], **TINY))
    wide = build_network(replace(RECIPES[BRAIN_TISSUE], **TINY, labels=[{}] * 4))
    assert load_initial_weights(narrow, tmp_path / "model")["iterations"] == 2
    assert load_initial_weights(narrow, tmp_path / "run" / "checkpoint.pt")["iterations"] == 2
    assert load_initial_weights(wide, tmp_path / "run" / "checkpoint.pt")["iterations"] == 2
    for key, value in narrow.state_dict().items():
        if value.shape == wide.state_dict()[key].shape:
            assert torch.equal(wide.state_dict()[key], value), key
    # The widened network computes the old outputs plus a copy of the last one.
    image = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        narrow.eval(), wide.eval()
        before, after = narrow(image), wide(image)
    assert torch.allclose(after[:, :4], before, atol=1e-5)
    assert torch.allclose(after[:, 4], before[:, 3], atol=1e-5)
    # A warm start continues the cumulative count on the card.
    state = _tiny_run(
        tmp_path / "warm", sources_file, max_iterations=1, init_from=tmp_path / "model"
    )
    assert state["prior"]["iterations"] == 2
    warm = export(tmp_path / "warm", tmp_path / "warm-model")
    assert warm["training"]["cumulative_iterations"] == 3
    assert warm["training"]["command"] == "test && test"  # the chain of runs behind the weights


def test_the_card_counts_the_training_behind_the_best_weights_not_the_last_step():
    """An export holds best.pt: when the best validation came before the end, the card's
    cumulative iterations, minutes and validation entry are those of the best iteration."""
    from deepmri.train.segment import _behind_best

    history = [
        {"iteration": 0, "minutes": 0.0, "validation_dice": [0.90, 0.80]},
        {"iteration": 500, "minutes": 10.0, "validation_dice": [0.95, 0.90]},
        {"iteration": 1000, "minutes": 21.0, "validation_dice": [0.94, 0.89]},
    ]
    state = {
        "prior": {"iterations": 4000, "minutes": 100.0, "commands": ["first"]},
        "commands": ["second"],
        "iteration": 1000,
        "best_iteration": 500,
        "elapsed": 21.5 * 60.0,
        "history": history,
    }
    behind = _behind_best(state)
    assert (behind["iterations"], behind["minutes"]) == (4500, 110.0)
    assert behind["validation"] == history[1]
    assert behind["commands"] == ["first", "second"]
    # A run never validated better than its start (no best yet) counts all its steps.
    assert _behind_best(state | {"best_iteration": None})["iterations"] == 5000


def test_a_warm_start_from_best_pt_counts_the_training_behind_it(tmp_path, sources_file):
    from deepmri.train.segment import RECIPES, build_network, load_initial_weights

    state = _tiny_run(tmp_path / "run", sources_file, max_iterations=3, validation_every=2)
    network = build_network(replace(RECIPES[BRAIN_TISSUE], **TINY))
    prior = load_initial_weights(network, tmp_path / "run" / "best.pt")
    assert prior["iterations"] == state["best_iteration"] and prior["commands"] == ["test"]


def test_a_weight_average_is_what_is_validated_kept_and_exported(tmp_path, sources_file):
    from deepmri.train.segment import export

    _tiny_run(tmp_path / "start", sources_file, max_iterations=1)
    export(tmp_path / "start", tmp_path / "model")
    options = dict(init_from=tmp_path / "model", ema=0.999999)
    _tiny_run(tmp_path / "run", sources_file, max_iterations=3, **options)
    start = torch.load(tmp_path / "start" / "best.pt", weights_only=True)
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)

    def farthest(weights):  # from the starting weights (fp16 on the card, so 1e-3 apart at most)
        return max(float((weights[key] - start[key]).abs().max()) for key in start)

    # Averaged with a decay this close to 1, the kept weights stay at the start; trained ones moved.
    assert farthest(best) < 2e-3 < farthest(saved["network"])
    assert int(saved["averaged"]["n_averaged"]) == 4  # the start, then one per iteration
    resumed = _tiny_run(tmp_path / "run", sources_file, max_iterations=4, resume=True)
    assert resumed["ema"] == 0.999999
    assert farthest(torch.load(tmp_path / "run" / "best.pt", weights_only=True)) < 2e-3
    card = export(tmp_path / "run", tmp_path / "averaged")
    assert card["training"]["weight_average"] == "exponential moving average, decay 0.999999"


def test_the_weight_average_warms_its_decay_up_only_when_asked():
    """From the start the average moves by 1 - d a step; with the warm-up the first step moves it
    by 0.9 (d = n / (9 + n) after n updates, n = 1), so a random start does not linger."""
    from deepmri.errors import DeepMRIError
    from deepmri.train.averaging import weight_average

    network = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.zeros_(network.weight)
    plain = weight_average(network, 0.99)
    warmed = weight_average(network, 0.99, warm_up=True)
    torch.nn.init.ones_(network.weight)
    plain.update_parameters(network)
    warmed.update_parameters(network)
    assert plain.module.weight.item() == pytest.approx(0.01)
    assert warmed.module.weight.item() == pytest.approx(0.9)
    assert weight_average(network, 0.0) is None
    with pytest.raises(DeepMRIError, match="decay"):
        weight_average(network, 1.0)


def test_export_keeps_metrics_only_for_the_same_weights(tmp_path, sources_file):
    from deepmri.train.segment import export

    _tiny_run(tmp_path / "run", sources_file, max_iterations=1)
    card = export(tmp_path / "run", tmp_path / "model")
    card_path = tmp_path / "model" / "card.json"
    measured = json.loads(card_path.read_text()) | {"metrics": [{"name": "x", "value": 0.5}]}
    card_path.write_text(json.dumps(measured))
    again = export(tmp_path / "run", tmp_path / "model")
    assert again["weights"]["sha256"] == card["weights"]["sha256"]
    assert json.loads(card_path.read_text())["metrics"] == [{"name": "x", "value": 0.5}]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=True)
    torch.save({key: value * 1.5 for key, value in best.items()}, tmp_path / "run" / "best.pt")
    changed = export(tmp_path / "run", tmp_path / "model")
    assert changed["weights"]["sha256"] != card["weights"]["sha256"]
    assert json.loads(card_path.read_text())["metrics"] == []


def test_the_train_command_passes_the_generator_settings_and_device():
    from deepmri.cli import build_parser
    from deepmri.cli.train import _recipe_overrides

    parser = build_parser()
    plain = parser.parse_args(["train", "segment", "--model", "brain-extraction", "--out", "r"])
    assert _recipe_overrides(plain) is None and plain.device == "cpu"
    given = parser.parse_args(
        ["train", "segment", "--model", "brain-extraction", "--out", "r", "--bias-max", "0.8",
         "--csf-variation", "2.5", "--device", "cuda", "--ema", "0.998"]
    )  # fmt: skip
    assert _recipe_overrides(given) == {"bias_max": 0.8, "csf_variation_max": 2.5}
    assert given.device == "cuda" and given.ema == 0.998 and plain.ema == 0.0
    finer = parser.parse_args(
        ["train", "segment", "--model", "brain-extraction", "--out", "r", "--spacing", "1.5"]
    )  # fmt: skip
    # 192 x 224 x 192 mm at 1.5 mm: 224 / 1.5 = 149.3 rounds up to 152, which 8 divides.
    assert _recipe_overrides(finer) == {"spacing": 1.5, "shape": (128, 152, 128)}


def test_a_finer_grid_keeps_the_field_of_view_and_what_the_strides_divide():
    from deepmri.errors import DeepMRIError
    from deepmri.train.segment import RECIPES, grid_at

    recipe = RECIPES[BRAIN_EXTRACTION]
    assert grid_at(recipe, recipe.spacing)["shape"] == recipe.shape
    for spacing in (1.0, 1.25, 1.5, 1.75):
        shape = grid_at(recipe, spacing)["shape"]
        assert all(n % 8 == 0 for n in shape)
        field = np.asarray(shape) * spacing
        assert np.all(field >= np.asarray(recipe.shape) * recipe.spacing - 1e-6)
        assert np.all(field - 8 * spacing < np.asarray(recipe.shape) * recipe.spacing)
    with pytest.raises(DeepMRIError):
        grid_at(recipe, 0.0)


def test_a_card_gives_back_the_recipe_on_the_grid_it_was_trained_at():
    from deepmri.train.segment import RECIPES, _card, grid_at, recipe_on_card_grid

    recipe = RECIPES[BRAIN_EXTRACTION]
    state = {"iteration": 0, "elapsed": 0.0, "history": [], "seed": 0, "commands": []}
    for finer in ({}, grid_at(recipe, 1.5)):
        trained = replace(recipe, **finer)
        card = json.loads(json.dumps(_card(trained, state, "0.0.0")))  # as read from card.json
        assert recipe_on_card_grid(card) == trained


def test_the_generator_rotates_as_simpleitk_euler3d_does():
    import SimpleITK as sitk

    rng = np.random.default_rng(0)
    for angles in rng.uniform(-np.pi, np.pi, (20, 3)):
        transform = sitk.Euler3DTransform()
        transform.SetRotation(*angles)
        expected = np.asarray(transform.GetMatrix()).reshape(3, 3)
        assert np.allclose(euler_matrix(*angles), expected, atol=1e-12)


def test_a_sources_file_gives_back_the_same_label_maps(sources, tmp_path):
    loaded = load_sources(save_sources(sources, tmp_path / "sources"))
    original, again = sources["mni"], loaded["mni"]
    assert set(loaded) == {"mni"} and again.spacing == original.spacing
    for name in ("labels", "tissue", "image", "distance", "tight_distance"):
        first, second = getattr(original, name), getattr(again, name)
        assert first.dtype == second.dtype and np.array_equal(first, second), name
    assert again.grid.GetOrigin() == original.grid.GetOrigin()
    assert again.grid.GetDirection() == original.grid.GetDirection()
    assert again.grid.GetSize() == original.grid.GetSize()


def test_a_sources_file_from_other_label_code_or_for_another_model_is_refused(sources, tmp_path):
    from deepmri.errors import DeepMRIError
    from deepmri.train.segment import load_sources_for

    path = save_sources(sources, tmp_path / "sources.npz")
    with pytest.raises(
        DeepMRIError, match=r"brain-extraction trains from \['head', 'mni', 'mni152-head'\]"
    ):
        load_sources_for("brain-extraction", path)
    with np.load(path) as stored:
        arrays = {key: stored[key] for key in stored.files}
    arrays["label_code"] = np.asarray("0" * 16)
    with (tmp_path / "old.npz").open("wb") as stream:
        np.savez_compressed(stream, **arrays)
    with pytest.raises(TrainingDataError, match="other label code"):
        load_sources(tmp_path / "old.npz")
    (tmp_path / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(TrainingDataError, match="Cannot read"):
        load_sources(tmp_path / "broken.npz")


# Run in a child process where SimpleITK, nilearn and nibabel cannot be imported, as on the lent
# GPU machine (which has PyTorch, NumPy and SciPy but none of these).
WITHOUT_SIMPLEITK = """
import importlib.abc, sys
class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("SimpleITK", "nilearn", "nibabel"):
            raise ModuleNotFoundError(f"No module named {name!r} (absent in this test)")
sys.meta_path.insert(0, Absent())
"""


def test_training_from_a_sources_file_needs_no_simpleitk_and_trains_the_same(sources, tmp_path):
    path = save_sources(sources, tmp_path / "sources.npz")
    script = (
        WITHOUT_SIMPLEITK
        + f"""
from pathlib import Path
from deepmri.cli import main
from deepmri.train.segment import train

state = train("brain-tissue", Path({str(tmp_path / "file")!r}), seed=4, threads=1, workers=0,
              validation_size=1, max_iterations=2, recipe_overrides={TINY!r},
              sources_file=Path({str(path)!r}), command="test")
assert state["iteration"] == 2
try:
    main(["train", "segment", "--help"])
except SystemExit as done:
    assert done.code == 0
assert "SimpleITK" not in sys.modules
"""
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--sources FILE" in result.stdout
    _tiny_run(tmp_path / "built", None, max_iterations=2)  # the same run from label maps built here
    weights = [
        torch.load(tmp_path / run / "best.pt", weights_only=True) for run in ("file", "built")
    ]
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])

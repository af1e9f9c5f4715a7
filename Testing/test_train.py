"""Training side of segmentation: the synthetic generator, label maps and a tiny training run.

Fast by design (tiny grids, two iterations); the head registration and real runs are slow-marked.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("nilearn")

from deepmri.intensity import normalize_percentile  # noqa: E402
from deepmri.train.labels import BRAIN_LABELS, SHELL_FIRST, mni_source  # noqa: E402
from deepmri.train.synth import (  # noqa: E402
    BRAIN_EXTRACTION,
    BRAIN_TISSUE,
    GeneratorParameters,
    GridSpec,
    generate,
    sample_parameters,
)

SMALL = GridSpec((40, 48, 40), 4.0)


@pytest.fixture(scope="module")
def sources():
    return {"mni": mni_source()}


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
    # ml at 1 mm, measured: CSF 160, GM 1091, WM 636 for the ICBM152 2009a maps (argmax labels).
    assert 140 < volumes[1] < 180 and 1050 < volumes[2] < 1130 and 600 < volumes[3] < 670
    assert set(np.unique(mni.labels)) == {0, *BRAIN_LABELS}
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


def test_generator_output_is_normalised_with_brain_targets(sources):
    for seed in range(4):
        params = _mni_only(sample_parameters(seed, BRAIN_EXTRACTION, sources, SMALL.spacing))
        image, target = generate(params, sources, SMALL)
        assert image.shape == SMALL.shape and image.dtype == np.float32
        assert 0.0 <= image.min() and image.max() <= 1.0
        assert set(np.unique(target)) <= {0, 1}
        # Brain ~1.8 l at (4 mm)^3 = 64 ul per voxel; scaling and crops change it moderately.
        assert 10_000 < target.sum() < 45_000


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


def test_two_iteration_training_run_writes_a_loadable_model(tmp_path):
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
    assert state["iteration"] == 2 and len(state["history"]) == 1
    assert len(state["history"][0]["validation_dice"]) == 3
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
        command="test resume",
    )
    assert resumed["iteration"] == 3 and resumed["commands"] == ["test", "test resume"]

"""The pretrained thick-to-thin model: its training recipe at tiny size, and the task's method."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import corners, make_oblique_image, thick_oblique
from deepmri.errors import ModelError
from deepmri.models import Model
from deepmri.superres import superresolve
from deepmri.superres.net3d import (
    ThickSliceNet3d,
    acquired_input,
    apply_network,
    condition_channels,
    widen_inputs,
)
from deepmri.superres.profile import simulate_thick_slices
from deepmri.tasks import RunContext, get_task
from deepmri.train import superresolve as recipe_module
from deepmri.train.superresolve import SuperResolveRecipe, TrainingVolume, export, train

TINY = SuperResolveRecipe(
    width=4,
    depth=4,
    patch=(24, 16, 16),
    batch=2,
    iterations=4,
    validate_every=2,
    validation_patches=4,
    factors=(4,),
)


def tiny_volumes() -> list[TrainingVolume]:
    """A smooth random blob volume: enough for the recipe's code paths, not for learning."""
    rng = np.random.default_rng(0)
    noise = sitk.GetImageFromArray(rng.normal(size=(48, 48, 48)).astype(np.float32))
    blobs = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(noise, 2.0))
    return [TrainingVolume.of("blobs", np.clip(blobs * 40 + 1, 0, None))]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """Four training steps of a tiny network, exported as a model folder."""
    out = tmp_path_factory.mktemp("run")
    train(TINY, out, tiny_volumes(), log=lambda message: None)
    (out / "training.json").write_text(
        json.dumps({**json.loads((out / "training.json").read_text()), "command": "test"})
    )
    return export(TINY, out, out / "model", command="test"), out


def test_recipe_trains_logs_validates_resumes_and_exports_a_valid_small_card(tiny_model):
    folder, out = tiny_model
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [record["iteration"] for record in records] == [2, 4]
    assert all(record["iterations_per_minute"] > 0 for record in records)
    assert {"net_4x", "cubic_4x", "net_6x", "cubic_6x", "gain_min"} <= set(records[0])
    model = Model(folder)
    model.verify()
    assert model.card.task == "super-resolution"
    assert model.card.weights["dtype"] == "float16"
    assert model.weights_path.stat().st_size < 1_000_000
    assert model.card.training["command"] == "test"
    assert "Colin27" in model.card.training["data"]  # says it was never trained on it
    network = model.load_network()
    assert isinstance(network, ThickSliceNet3d)
    # Resume continues at the saved iteration to the new end, with the same validation set.
    longer = SuperResolveRecipe(**{**TINY.__dict__, "iterations": 6})
    state = train(longer, out, tiny_volumes(), resume=True, log=lambda message: None)
    assert state["iteration"] == 6
    lines = (out / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["iteration"] for line in lines] == [2, 4, 6]
    # A later version exported from the resumed run keeps the chain of commands behind it.
    again = export(longer, out, out / "model-2", "resume", version="0.2.0", commands=["a", "b"])
    card = Model(again).card
    assert card.version == "0.2.0"
    assert card.training["commands"] == ["a", "b"]
    assert card.training["iterations"] == 6


def test_run_recipe_records_the_command_chain_of_a_resumed_run(tmp_path):
    """`deepmri train superresolve --resume` keeps the commands before it; the export has them."""
    options = {
        "width": 4,
        "depth": 4,
        "batch_size": 2,
        "validation_patches": 4,
        "validate_every": 2,
        "volumes": tiny_volumes(),
    }
    recipe_module.run_recipe(tmp_path, iterations=2, command="first", **options)
    recipe_module.run_recipe(
        tmp_path,
        iterations=4,
        resume=True,
        command="second",
        export_to=tmp_path / "model",
        version="0.2.0",
        **options,
    )
    assert json.loads((tmp_path / "training.json").read_text())["commands"] == ["first", "second"]
    card = Model(tmp_path / "model").card
    assert (card.version, card.training["iterations"]) == ("0.2.0", 4)
    assert card.training["commands"] == ["first", "second"]
    assert card.training["command"] == "second"


def test_bf16_training_with_a_moving_average_validates_and_resumes_the_average(tmp_path):
    """`--bf16 --ema D`: the steps run under bfloat16 autocast; the averaged weights (not the raw
    ones) are validated, kept as best.pt and carried over a resume."""
    import torch

    recipe = SuperResolveRecipe(
        **{**TINY.__dict__, "bf16": True, "ema": 0.5, "learning_rate": 1e-2}
    )
    volumes = tiny_volumes()
    train(recipe, tmp_path, volumes, log=lambda message: None)
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    raw, averaged = saved["network"], saved["averaged"]
    average = {key: averaged[f"module.{key}"] for key in raw}
    assert any(not torch.equal(raw[key], average[key]) for key in raw)
    assert int(averaged["n_averaged"]) == 1 + recipe.iterations  # the start, then every step
    network = ThickSliceNet3d(recipe.width, recipe.depth)
    network.load_state_dict(average)
    scores = recipe_module.validate(network, recipe_module.validation_set(volumes, recipe), recipe)
    last = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[-1])
    assert last["net_4x"] == pytest.approx(scores["net_4x"], abs=1e-4)
    longer = SuperResolveRecipe(**{**recipe.__dict__, "iterations": 6})
    assert train(longer, tmp_path, volumes, resume=True, log=lambda message: None)["iteration"] == 6
    resumed = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["averaged"]
    assert int(resumed["n_averaged"]) == 1 + longer.iterations  # carried over, not restarted
    assert any(not torch.equal(average[key], resumed[f"module.{key}"]) for key in average)


def test_training_pairs_are_the_forward_model_then_cubic():
    """A patch's input is its truth acquired thick (profile, factor) and cubic-interpolated back:
    flat truth stays flat, and the conditioning channels say the spacing and slice phase."""
    flat = np.zeros((112, 112, 112), dtype=np.float32)
    flat[2:-2, 2:-2, 2:-2] = 1.0
    volume = TrainingVolume.of("flat", flat)
    volume.centres = np.array([[56, 56, 56]])
    rng = np.random.default_rng(1)
    acquisition = recipe_module.Acquisition(4.0, 3.0, "rect", 0.25, 0.0)
    inputs, truth = recipe_module.sample_patch(volume, TINY, rng, acquisition, augment=False)
    assert inputs.shape == (5, 24, 16, 16) and truth.shape == (24, 16, 16)
    np.testing.assert_allclose(inputs[0], truth, atol=1e-4)
    np.testing.assert_allclose(inputs[1], 4.0 / 6.0)
    np.testing.assert_allclose(inputs[2], 3.0 / 6.0)
    phase = np.arctan2(inputs[4, :, 0, 0], inputs[3, :, 0, 0])
    steps = np.diff(np.unwrap(phase))
    np.testing.assert_allclose(steps, 2 * np.pi / 4.0, atol=1e-5)


def test_the_profile_channel_flags_rect_patches():
    """With `profile_channel` a patch carries a sixth channel: 1 for a rect profile, 0 Gaussian."""
    recipe = SuperResolveRecipe(**{**TINY.__dict__, "profile_channel": True})
    volume = tiny_volumes()[0]
    for shape, flag in (("rect", 1.0), ("gaussian", 0.0)):
        acquisition = recipe_module.Acquisition(4.0, 3.0, shape, 0.25, 0.0)
        rng = np.random.default_rng(1)
        inputs, _ = recipe_module.sample_patch(volume, recipe, rng, acquisition, augment=False)
        assert inputs.shape == (6, 24, 16, 16)
        np.testing.assert_array_equal(inputs[5], flag)


def test_elastic_bends_training_patches_smoothly_and_never_validation_patches():
    """`elastic`: a smooth field of at most the asked voxels moves the sampling points of training
    patches; validation patches (augment off) are the same with or without it."""
    field = recipe_module._displacement(np.random.default_rng(3), (24, 16, 16), 3.0)
    field = field.reshape(3, 24, 16, 16)
    assert 0.3 < np.abs(field).max() <= 3.0
    for axis, length in zip((1, 2, 3), (24, 16, 16), strict=True):
        # linear between 4 control values in [-3, 3]: at most 6 voxels over a third of the axis
        assert np.abs(np.diff(field, axis=axis)).max() <= 6.0 / ((length - 1) / 3) + 1e-9
    bent = SuperResolveRecipe(**{**TINY.__dict__, "elastic": 3.0})
    volume = tiny_volumes()[0]
    acquisition = recipe_module.Acquisition(4.0, 3.0, "gaussian", 0.25, 0.0)

    def patch(recipe, augment):
        return recipe_module.sample_patch(
            volume, recipe, np.random.default_rng(5), acquisition, augment=augment
        )[1]

    np.testing.assert_array_equal(patch(bent, False), patch(TINY, False))
    assert np.abs(patch(bent, True) - patch(TINY, True)).max() > 0.01


def test_shelled_heads_are_whole_heads_that_validation_never_samples():
    """`shelled_heads`: MNI152's brain in synthetic layers is a head within its grid (dark air
    at the corners and ends of the middle rows); the fixed validation patches stay the same."""
    head = recipe_module.shelled_mni_heads(1)[0]
    z, y, x = head.values.shape
    assert not head.validated and (z, y, x) == recipe_module.SHELLED_HEAD_GRID
    corners_dark = head.values[[0, 0, -1, -1], [0, -1, 0, -1], [0, -1, -1, 0]]
    assert corners_dark.max() < 0.1
    for row in (head.values[z // 2, y // 2, :], head.values[z // 2, :, x // 2]):
        bright = np.flatnonzero(row > 0.15)  # air, layers, brain, layers, air
        assert bright[0] > 3 and bright[-1] < len(row) - 4  # the head ends inside the grid
    real = recipe_module.TrainingVolume.of("blobs", tiny_volumes()[0].values)
    recipe = SuperResolveRecipe(**{**TINY.__dict__, "validation_patches": 2})
    plain = recipe_module.validation_set([real], recipe)
    mixed = recipe_module.validation_set([real, head], recipe)
    for (_, truth, case), (_, truth2, case2) in zip(plain, mixed, strict=True):
        np.testing.assert_array_equal(truth, truth2)
        assert case == case2


def test_noise_without_a_generator_is_refused_not_skipped():
    """Asking the forward model for noise without the generator to draw it is an error: it used
    to return the noiseless input silently."""
    truth = np.ones((24, 4, 4))
    with pytest.raises(ValueError, match="rng"):
        acquired_input(truth, 4.0, 4.0, "gaussian", 0.5, slice(0, 24), False, noise=0.02)


def test_widened_inputs_start_as_the_original_network():
    """New input channels get zero weights: the network computes what it did, whatever they hold."""
    import torch

    torch.manual_seed(0)
    original = ThickSliceNet3d(width=4, depth=4).eval()
    torch.nn.init.normal_(original.body[-1].weight, std=0.1)  # a trained-looking last layer
    widened = ThickSliceNet3d(width=4, depth=4, in_channels=6).eval()
    widened.load_state_dict(widen_inputs(original.state_dict(), 6))
    inputs = torch.randn(1, 5, 12, 10, 10)
    flag = torch.full((1, 1, 12, 10, 10), 1.0)
    with torch.no_grad():
        before = original(inputs)
        after = widened(torch.cat([inputs, flag], dim=1))
    assert before.abs().max() > 1.0  # not trivially zero
    torch.testing.assert_close(after, before, atol=1e-6, rtol=0)


def test_a_run_from_a_model_with_the_profile_channel_starts_there_and_is_told_the_shape(
    tiny_model, tmp_path
):
    """`init_from` + `profile_channel`: the first validation is the model's own on the same
    patches; the exported card asks for six inputs; the task tells it the profile's shape."""
    import ast

    folder, _ = tiny_model
    volumes = tiny_volumes()
    original = Model(folder).load_network()
    expected = recipe_module.validate(original, recipe_module.validation_set(volumes, TINY), TINY)
    recipe = SuperResolveRecipe(
        **{
            **TINY.__dict__,
            "profile_channel": True,
            "rect_share": 1.0,  # every step moves the flag's weights
            "init_from": str(folder),
            "iterations": 2,
        }
    )
    messages: list[str] = []
    train(recipe, tmp_path, volumes, log=messages.append)
    start = ast.literal_eval(messages[0].removeprefix("start: validation "))
    for key in ("net_4x", "net_6x", "gain_4x_rect", "gain_6x_gaussian"):
        assert start[key] == pytest.approx(expected[key], abs=1e-3)
    exported = export(recipe, tmp_path, tmp_path / "model", command="test")
    card = Model(exported).card
    assert card.architecture["config"]["in_channels"] == 6
    assert card.training["init_from"] == str(folder)
    image = thick_oblique((0.9, 1.1, 4.0), (40, 36, 12))
    told = {
        shape: superresolve(
            image, factor=4, method="pretrained", model=str(exported), profile=shape
        )
        for shape in ("gaussian", "rect")
    }
    assert all(result.info["profile_told"] for result in told.values())
    difference = sitk.GetArrayFromImage(told["rect"].image) - sitk.GetArrayFromImage(
        told["gaussian"].image
    )
    assert np.abs(difference).max() > 0


def test_slabs_do_not_change_the_result():
    network = ThickSliceNet3d(width=4, depth=4).eval()
    volume = np.random.default_rng(2).normal(size=(20, 14, 30)).astype(np.float32)
    channels = condition_channels(20, 4.0, 4.0, 1.5)
    whole, _ = apply_network(network, volume, channels, "cpu", chunk_voxels=10**9)
    slabs, _ = apply_network(network, volume, channels, "cpu", chunk_voxels=20 * 14 * 3)
    np.testing.assert_allclose(slabs, whole, atol=1e-5)


@pytest.mark.parametrize(
    ("spacing", "size", "asked", "expected"),
    [
        ((0.9, 1.1, 4.0), (40, 36, 12), (0.9, 1.1, 1.0), (40, 36, 48)),
        ((0.9, 1.1, 4.0), (40, 36, 12), (0.9, 1.1, 1.3), (40, 36, 37)),
        ((3.0, 1.0, 1.0), (10, 32, 28), None, (30, 32, 28)),
    ],
)
def test_pretrained_method_keeps_geometry_exactly_on_oblique_input(
    tiny_model, spacing, size, asked, expected
):
    image = thick_oblique(spacing, size)
    before = sitk.GetArrayFromImage(image).copy()
    result = superresolve(
        image, spacing=asked, method="pretrained", model=str(tiny_model[0]), uncertainty=True
    )
    output = result.image
    assert output.GetSize() == expected
    assert output.GetDirection() == image.GetDirection()
    if asked is not None:
        assert output.GetSpacing() == asked
    centre = corners(output).mean(axis=0)
    np.testing.assert_allclose(centre, corners(image).mean(axis=0), atol=1e-9)
    if expected[2] * output.GetSpacing()[2] == size[2] * spacing[2]:
        np.testing.assert_allclose(corners(output), corners(image), atol=1e-9)
    assert output.GetPixelID() == sitk.sitkFloat32
    assert result.uncertainty.GetSize() == expected
    values = sitk.GetArrayFromImage(output)
    assert values.min() >= before.min() - 1e-4 and values.max() <= before.max() + 1e-4
    assert np.array_equal(sitk.GetArrayViewFromImage(image), before)
    # the plain pass and the card's two in-plane flips, which the uncertainty map is spread over
    assert result.info["model"] == "thick-to-thin-3d" and result.info["passes"] == 3


def test_task_runs_the_pretrained_method_with_its_uncertainty(tiny_model):
    task = get_task("superresolve")
    context = RunContext(wanted=frozenset({"uncertainty"}))
    options = {"method": "pretrained", "factor": 2, "model": str(tiny_model[0])}
    result = task({"image": thick_oblique()}, options, context)
    assert set(result.images) == {"superresolved", "uncertainty"}
    assert result.images["superresolved"].GetSize() == (40, 36, 24)
    assert "pretrained 3D thick-to-thin network" in result.info["description"]


def test_finetuning_the_pretrained_network_on_the_volume_keeps_geometry_and_the_model(tiny_model):
    """`finetune_steps`: the per-volume training started from the pretrained weights. The output
    keeps the exact geometry, differs from the untuned network's, is seeded, and the model on
    disk is left as it was (a plain run after it gives what a plain run gave before)."""
    image = thick_oblique((0.9, 1.1, 4.0), (40, 36, 12))
    options = {"factor": 4, "method": "pretrained", "model": str(tiny_model[0])}
    plain = sitk.GetArrayFromImage(superresolve(image, **options).image)
    task = get_task("superresolve")
    result = task({"image": image}, {**options, "finetune_steps": 3}, RunContext())
    tuned = result.images["superresolved"]
    assert tuned.GetSize() == (40, 36, 48)
    np.testing.assert_allclose(corners(tuned), corners(image), atol=1e-9)
    assert tuned.GetDirection() == image.GetDirection()
    assert result.info["finetune_steps"] == 3
    assert 0 < result.info["finetune_loss_last"] < 1
    assert np.abs(sitk.GetArrayFromImage(tuned) - plain).max() > 0
    again = task({"image": image}, {**options, "finetune_steps": 3}, RunContext())
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(again.images["superresolved"]), sitk.GetArrayFromImage(tuned)
    )
    after = sitk.GetArrayFromImage(superresolve(image, **options).image)
    np.testing.assert_array_equal(after, plain)


def test_cancel_during_finetuning_returns_nothing(tiny_model):
    from deepmri import Cancelled, CancelToken

    token = CancelToken()
    messages = []

    def progress(fraction, message):
        messages.append(message)
        if "step 2/" in message:
            token.cancel()

    with pytest.raises(Cancelled):
        superresolve(
            thick_oblique(),
            factor=2,
            method="pretrained",
            model=str(tiny_model[0]),
            finetune_steps=20,
            progress=progress,
            cancel=token,
        )
    assert not any("step 3/" in message for message in messages)


def test_a_missing_model_is_named_with_how_to_add_it():
    with pytest.raises(ModelError, match="No model 'no-such-model' is installed"):
        superresolve(thick_oblique(), method="pretrained", model="no-such-model")


def test_pretrained_output_is_the_cubic_interpolation_plus_the_networks_residual(tiny_model):
    """With the residual branch zeroed the method must reproduce the task's cubic B-spline
    (same normalisation, same slice positions): the network only adds to it."""
    image = simulate_thick_slices(
        sitk.Cast(make_oblique_image(size=(16, 12, 96), spacing=(1, 1, 1)), sitk.sitkFloat32), 4.0
    )
    model = Model(tiny_model[0])
    network = model.load_network()
    last = network.body[-1]
    last.weight.data.zero_()
    last.bias.data.zero_()
    from deepmri.models.model import save_model

    zero = save_model(network, model.card, tiny_model[1] / "zero").path
    restored = sitk.GetArrayFromImage(
        superresolve(image, factor=4, method="pretrained", model=str(zero)).image
    )
    cubic = sitk.GetArrayFromImage(superresolve(image, factor=4, method="cubic").image)
    # The ends follow each implementation's own boundary rule (scipy's reflect, SimpleITK's
    # mirror), whose effect on the spline coefficients decays by 0.27 per slice inwards.
    inner = slice(24, -24)
    np.testing.assert_allclose(restored[inner], cubic[inner], atol=1e-3 * np.ptp(cubic))


@pytest.mark.parametrize(
    ("factor", "thickness", "shape"), [(4, 4.0, "gaussian"), (4, 3.0, "rect"), (6, 6.0, "gaussian")]
)
def test_bundled_model_beats_cubic_on_an_mni_crop(mni_t1, factor, thickness, shape):
    """The shipped thick-to-thin-3d on an MNI152 crop (training anatomy, so a working check, not
    a held-out figure: those are Colin27's in Docs/superresolution.md).

    Measured with 0.8.0 (flips averaged): +2.78 (4x Gaussian), +2.34 (4x rect, 1 mm gap; the
    test tells the thickness, not the shape, so the network assumes a Gaussian), +1.85 dB (6x)
    over cubic B-spline (0.7.0: +2.68, +2.25, +1.73; 0.6.0: +2.49, +2.02, +1.58; 0.5.0: +2.43,
    +1.88, +1.55; 0.4.0: +2.23, +1.64, +1.39; 0.3.0: +1.74, +1.24, +1.06; 0.2.0: +0.79, +0.53,
    +0.66; 0.1.0: +0.54, +0.44, +0.43); required: +0.8 dB.
    """
    from deepmri.models.store import ModelStore
    from deepmri.superres.settings import PRETRAINED_MODEL

    try:
        ModelStore().get(PRETRAINED_MODEL)
    except ModelError:
        pytest.skip("the bundled thick-to-thin-3d model is not installed")
    truth = sitk.Cast(mni_t1[66:130, 78:158, 70:118], sitk.sitkFloat32)
    thick = simulate_thick_slices(truth, float(factor), thickness=thickness, shape=shape)
    values = sitk.GetArrayFromImage(truth)
    brain = values > 0

    def psnr(image):
        error = ((sitk.GetArrayFromImage(image) - values)[brain] ** 2).mean()
        return 10 * np.log10(values.max() ** 2 / error)

    options = {"factor": factor, "slice_thickness": thickness}
    restored = superresolve(thick, method="pretrained", uncertainty=True, **options)
    cubic = superresolve(thick, method="cubic", **options).image
    assert restored.image.GetSize() == truth.GetSize()
    np.testing.assert_allclose(restored.image.GetOrigin(), truth.GetOrigin(), atol=1e-9)
    assert psnr(restored.image) > psnr(cubic) + 0.8
    spread = sitk.GetArrayFromImage(restored.uncertainty)
    assert spread.min() >= 0 and 0 < spread.mean() < values.std()


def test_a_card_that_averages_flips_gives_their_mean_with_or_without_the_uncertainty_map(
    tiny_model,
):
    """`inference.average_flips`: the plain pass and the card's in-plane flips, always averaged,
    so asking for the uncertainty map does not change the volume; without it, one pass. The
    recipe's export switches it on (chosen on whole training volumes)."""
    image = simulate_thick_slices(
        sitk.Cast(make_oblique_image(size=(16, 12, 48), spacing=(1, 1, 1)), sitk.sitkFloat32), 4.0
    )
    model = Model(tiny_model[0])
    assert model.card.inference["average_flips"] is True
    averaging = tiny_model[0]
    card = model.card.to_dict()
    card["inference"]["average_flips"] = False
    from deepmri.models.model import save_model

    single = save_model(model.load_network(), card, tiny_model[1] / "single").path
    plain = superresolve(image, factor=4, method="pretrained", model=str(single))
    averaged = superresolve(image, factor=4, method="pretrained", model=str(averaging))
    with_map = superresolve(
        image, factor=4, method="pretrained", model=str(averaging), uncertainty=True
    )
    assert (plain.info["passes"], averaged.info["passes"]) == (1, 3)
    values = [sitk.GetArrayFromImage(result.image) for result in (plain, averaged, with_map)]
    np.testing.assert_array_equal(values[1], values[2])
    assert not np.allclose(values[0], values[1], atol=1e-6 * np.ptp(values[0]))

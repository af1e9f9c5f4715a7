"""The synthesis training recipe: simulated pairs as the task sees them, a tiny run, a valid card."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from deepmri.models import ModelCard, save_model
from deepmri.simulate import Grid
from deepmri.train.synthesize import (
    SynthesisRecipe,
    card_for,
    load_generator,
    make_pair,
    train,
)

pytest.importorskip("nilearn")

SMALL = Grid((32, 40, 32), 4.0)


def tiny_recipe(**settings) -> SynthesisRecipe:
    """A recipe small enough for a test: the 4 mm grid, a two-level UNet, one validation subject."""
    return SynthesisRecipe(
        **{
            "grid_shape": SMALL.shape,
            "spacing": SMALL.spacing,
            "patch": (32, 32, 32),
            "channels": (4, 8),
            "strides": (2,),
            "validate_every": 1,
            "validation_subjects": 1,
            **settings,
        }
    )


def test_pair_is_normalised_like_the_task_and_zero_outside_the_brain():
    image, target, subject = make_pair(3, "T1w", "T2w", SMALL)
    brain = subject.brain
    assert image.shape == target.shape == SMALL.shape
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert image[~brain].max() == 0.0 and target[~brain].max() == 0.0
    assert np.percentile(target[brain], 99.5) == pytest.approx(1.0, rel=1e-3)
    # Same anatomy: CSF is dark on the input and bright on the target.
    csf = subject.probabilities["csf"] > 0.9
    white = subject.probabilities["wm"] > 0.9
    assert image[csf].mean() < image[white].mean() and target[csf].mean() > target[white].mean()


def test_tiny_training_run_keeps_best_weights_and_writes_a_valid_synthesis_card(tmp_path):
    torch.set_num_threads(1)
    recipe = tiny_recipe(minutes=0.05, warmup_fraction=0.0, cosine_after=0.0)
    state = train(recipe, tmp_path / "run", log=lambda line: None)
    assert state["iteration"] >= 1 and state["best"] is not None
    # The checkpoint (optimiser state after the learning-rate decay) loads with weights_only.
    # A budget past the one already spent (on a loaded machine one iteration can take seconds).
    recipe.minutes = state["minutes"] + 0.05
    resumed = train(recipe, tmp_path / "run", log=lambda line: None, resume=True)
    assert resumed["iteration"] > state["iteration"]
    history = json.loads((tmp_path / "run" / "training.json").read_text())["history"]
    assert history and all(entry["validation_mae"] > 0 for entry in history)
    generator = load_generator(recipe, tmp_path / "run" / "best_generator.pt")
    model = save_model(generator, card_for(recipe, state, "test"), tmp_path / "t1w-to-t2w")
    card = ModelCard.from_file(tmp_path / "t1w-to-t2w" / "card.json")
    assert card.task == "synthesis" and card.extra["output"]["contrast"] == "T2w"
    assert "SIMULATED images only" in card.description
    assert card.weights["dtype"] == "float16"
    assert model.load_network() is not None


def test_site_folders_train_from_matching_file_names(tmp_path):
    import SimpleITK as sitk
    from deepmri.io import write_image
    from deepmri.train.synthesize import FolderPairs

    for folder in ("t1", "t2"):
        (tmp_path / folder).mkdir()
    for index in range(3):
        image, target, subject = make_pair(40 + index, "T1w", "T2w", SMALL)
        for folder, array in (("t1", image), ("t2", target)):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((4.0, 4.0, 4.0))
            write_image(volume, tmp_path / folder / f"case{index}.nii.gz")
    (tmp_path / "t1" / "unpaired.nii.gz").write_bytes(b"")  # no partner: ignored
    pairs = FolderPairs(tmp_path / "t1", tmp_path / "t2", spacing=4.0, patch=(32, 32, 32))
    assert len(pairs.training) == 2 and len(pairs.validation) == 1
    source, target, brain = pairs.pair(0)
    assert source.shape == target.shape and all(n % 8 == 0 and n >= 32 for n in source.shape)
    recipe = SynthesisRecipe(
        spacing=4.0,
        patch=(32, 32, 32),
        channels=(4, 8),
        strides=(2,),
        minutes=0.03,
        validate_every=1,
        warmup_fraction=0.0,
    )
    state = train(recipe, tmp_path / "run", log=lambda line: None, pairs=pairs)
    assert state["best"] is not None


def test_the_recipe_is_a_deepmri_train_sub_command(tmp_path, capsys):
    from deepmri.cli import main

    assert main(["train", "synthesize", "--out", str(tmp_path), "--source-dir", str(tmp_path)]) == 2
    assert "--source-dir and --target-dir go together" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before any run folder was made


def test_warm_start_from_a_run_or_a_model_folder_and_selection_by_psnr(tmp_path):
    torch.set_num_threads(1)
    first = tiny_recipe(minutes=0.03, cosine_after=None)
    state = train(first, tmp_path / "a", log=lambda line: None)
    start = load_generator(first, tmp_path / "a" / "best_generator.pt").state_dict()
    save_model(
        load_generator(first, tmp_path / "a" / "best_generator.pt"),
        card_for(first, state, "t"),
        tmp_path / "m",
    )
    for source in (tmp_path / "a" / "best_generator.pt", tmp_path / "m"):
        # Learning rate 0: the kept weights are exactly the ones started from.
        recipe = tiny_recipe(
            minutes=0.03,
            learning_rate=0.0,
            mse_weight=1.0,
            select="psnr",
            init_from=str(source),
            target="FLAIR",
            cosine_after=None,
        )
        out = tmp_path / f"b-{source.name}"
        state = train(recipe, out, log=lambda line: None)
        kept = load_generator(recipe, out / "best_generator.pt").state_dict()
        tolerance = 0.0 if source.suffix == ".pt" else 1e-3  # the model folder is fp16
        assert all(
            torch.allclose(kept[key], start[key], atol=tolerance, rtol=tolerance) for key in start
        )
        history = state["history"]
        assert state["best"]["validation_psnr"] == max(e["validation_psnr"] for e in history)


def test_warm_start_from_a_missing_file_is_one_error_before_any_run(tmp_path):
    from deepmri.cli import main

    out = tmp_path / "run"
    code = main(["train", "synthesize", "--out", str(out), "--init-from", str(tmp_path / "x.pt")])
    assert code == 2 and not out.exists()


def test_tissue_prior_model_starts_at_the_prior_and_the_task_makes_the_same_prior(tmp_path):
    """`--tissue-prior`: iteration 0 is the prior itself, and the task rebuilds it from the card."""
    import SimpleITK as sitk
    from deepmri.models import ModelStore
    from deepmri.settings import Settings
    from deepmri.tasks.synthesize import synthesize
    from deepmri.train.synthesize import brain_psnr, with_prior

    torch.set_num_threads(1)
    recipe = tiny_recipe(
        target="FLAIR", prior_subjects=2, tissue_prior=True, iterations=0, minutes=5.0
    )
    state = train(recipe, tmp_path / "run", log=lambda line: None)
    assert state["iteration"] == 0 and len(state["history"]) == 1
    table = state["prior"]["table"]
    assert table[0] < table[2] < table[1]  # FLAIR: CSF nulled, WM below GM (least squares)
    image, target, subject = make_pair(900_000_000, "T1w", "FLAIR", SMALL)
    prior = with_prior(image, subject.brain, state["prior"])[1]
    psnr = brain_psnr(prior, target, subject.brain)
    assert state["history"][0]["validation_psnr"] == pytest.approx(psnr, abs=1e-2)
    generator = load_generator(recipe, tmp_path / "run" / "best_generator.pt")
    card = card_for(recipe, state, "test")
    assert card["input"]["channels"] == 2 and card["input"]["prior"]["table"] == table
    card["id"] = "test-prior-flair"  # not the bundled t1w-to-flair's id
    save_model(generator, card, tmp_path / "models" / "test-prior-flair")
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(tmp_path / "models",))
    raw = sitk.GetImageFromArray(np.where(subject.brain, subject.images["T1w"], 0.0))
    raw.CopyInformation(subject.reference)
    result = synthesize(raw, "FLAIR", "test-prior-flair", skull_stripped=True, store=store)
    synthetic = sitk.GetArrayFromImage(result.image)
    assert synthetic.shape == prior.shape
    np.testing.assert_allclose(synthetic[subject.brain], prior[subject.brain], atol=2e-3)
    # A few steps of training move it away from the prior (the zero head learns).
    recipe.iterations = 3
    moved = train(recipe, tmp_path / "run", log=lambda line: None, resume=True)
    assert moved["iteration"] == 3 and moved["prior"] == state["prior"]
    head = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["generator"]
    assert head["head.weight"].abs().max() > 0


def _write_volumes(folder, contrast: str, seeds, prefix: str) -> None:
    """Brain-only simulated volumes on the 4 mm test grid, one file per seed."""
    import SimpleITK as sitk
    from deepmri.io import write_image

    folder.mkdir(parents=True)
    for seed in seeds:
        params_source = make_pair(seed, "T1w", contrast, SMALL)
        image = params_source[0] if contrast == "T1w" else params_source[1]
        volume = sitk.GetImageFromArray(image)
        volume.SetSpacing((4.0, 4.0, 4.0))
        write_image(volume, folder / f"{prefix}{seed}.nii.gz")


def test_unpaired_cyclegan_trains_resumes_and_exports_a_model_the_task_runs(tmp_path):
    """`--unpaired`: finite losses, a resumed run goes on, the export runs in the task."""
    import SimpleITK as sitk
    from deepmri.models import ModelStore
    from deepmri.settings import Settings
    from deepmri.tasks.synthesize import synthesize
    from deepmri.train.synthesize_unpaired import FolderVolumes, train_unpaired

    torch.set_num_threads(1)
    # Different subjects (seeds) and names in each folder: nothing to pair them by.
    _write_volumes(tmp_path / "t1", "T1w", (60, 61), "a")
    _write_volumes(tmp_path / "t2", "T2w", (70, 71, 72), "b")
    sources = FolderVolumes(tmp_path / "t1", "source", spacing=4.0, patch=(32, 32, 32))
    targets = FolderVolumes(tmp_path / "t2", "target", spacing=4.0, patch=(32, 32, 32))
    assert (len(sources.training), len(targets.training)) == (1, 2)
    assert np.percentile(targets.volumes[0][0][targets.volumes[0][1]], 99.5) == pytest.approx(
        1.0, rel=1e-3
    )
    recipe = tiny_recipe(unpaired=True, adversarial_weight=1.0, identity_weight=1.0, iterations=2)
    state = train_unpaired(recipe, tmp_path / "run", sources, targets, log=lambda line: None)
    assert state["iteration"] == 2 and len(state["history"]) == 2
    for entry in state["history"]:
        assert entry["validation"] == "cycle"
        for key in ("loss_cycle", "loss_adversarial", "loss_d", "validation_mae"):
            assert np.isfinite(entry[key]) and entry[key] > 0
    recipe.iterations = 4
    resumed = train_unpaired(
        recipe, tmp_path / "run", sources, targets, log=lambda line: None, resume=True
    )
    assert resumed["iteration"] == 4 and len(resumed["history"]) == 4
    assert (tmp_path / "run" / "best_generator_back.pt").exists()
    generator = load_generator(recipe, tmp_path / "run" / "best_generator.pt")
    site = {"source_dir": "t1", "target_dir": "t2", "volumes": (2, 3)}
    card = card_for(recipe, resumed, "deepmri train synthesize --unpaired", site=site)
    assert "UNPAIRED" in card["description"] and "SIMULATED" not in card["description"]
    assert "cycle" in card["training"]["validation_set"]
    card["id"] = "test-unpaired-t2w"
    save_model(generator, card, tmp_path / "models" / "test-unpaired-t2w")
    store = ModelStore(Settings(home=tmp_path / "home"), extra_paths=(tmp_path / "models",))
    image = sitk.ReadImage(str(tmp_path / "t1" / "a60.nii.gz"))
    result = synthesize(image, "T2w", "test-unpaired-t2w", skull_stripped=True, store=store)
    synthetic = sitk.GetArrayFromImage(result.image)
    assert result.image.GetSize() == image.GetSize()
    assert result.image.GetSpacing() == image.GetSpacing()
    assert np.isfinite(synthetic).all() and synthetic.max() > 0
    assert result.name_suffix == " -> T2w (synthetic)"


def test_unpaired_draws_source_and_target_volumes_in_independent_orders():
    from deepmri.train.synthesize_unpaired import Shuffled

    sources = Shuffled(5, np.random.default_rng([0, 1]))
    targets = Shuffled(5, np.random.default_rng([0, 2]))
    drawn = [(next(sources), next(targets)) for _ in range(20)]
    assert sorted(index for index, _ in drawn[:5]) == list(range(5))  # every volume each pass
    assert sum(a == b for a, b in drawn) < 10  # a fixed pairing would give 20


def test_unpaired_needs_site_folders(tmp_path, capsys):
    from deepmri.cli import main

    assert main(["train", "synthesize", "--out", str(tmp_path / "run"), "--unpaired"]) == 2
    assert "--unpaired trains on a site's own volumes" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_register_aligns_each_source_onto_its_target_before_paired_training(tmp_path):
    """`--register`: a source displaced by 8 mm is put back onto its target by the task."""
    import SimpleITK as sitk
    from deepmri.io import write_image
    from deepmri.train.synthesize import FolderPairs

    for folder in ("t1", "t2"):
        (tmp_path / folder).mkdir()
    for index in range(2):
        image, target, subject = make_pair(80 + index, "T1w", "T2w", SMALL)
        for folder, array, shift in (("t1", image, 8.0), ("t2", target, 0.0)):
            volume = sitk.GetImageFromArray(array)
            volume.SetSpacing((4.0, 4.0, 4.0))
            volume.SetOrigin((shift, 0.0, 0.0))  # the source's anatomy 8 mm to the left
            write_image(volume, tmp_path / folder / f"case{index}.nii.gz")

    def overlap(pairs) -> float:
        source, target, brain = pairs.pair(0)
        a, b = source > 0.05 * source.max(), target > 0.05 * target.max()
        return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())

    patch = (32, 32, 32)
    as_given = FolderPairs(tmp_path / "t1", tmp_path / "t2", spacing=4.0, patch=patch)
    aligned = FolderPairs(tmp_path / "t1", tmp_path / "t2", 4.0, patch, register="affine")
    # Measured: 0.986 registered, 0.948 as given (2 voxels off); the same grid gives 0.995.
    assert overlap(aligned) > 0.97 and overlap(aligned) > overlap(as_given) + 0.02


@pytest.mark.parametrize("source", ["T1w", "T2w", "FLAIR"])
def test_any_contrast_prior_names_the_tissues_by_anatomy_not_by_intensity(source):
    """`--source any --tissue-prior`: the classes are named by where they lie, whatever the contrast."""
    from deepmri.tasks.synthesize import tissue_posteriors

    image, _, subject = make_pair(90, source, "T1w" if source != "T1w" else "T2w", SMALL)
    brain = subject.brain
    named = tissue_posteriors(image, brain, order="anatomy").argmax(1)
    truth = np.stack([subject.probabilities[c][brain] for c in ("csf", "gm", "wm")], 1)
    agreement = float((named == truth.argmax(1)).mean())
    assert agreement > 0.7, agreement  # measured: T1w 0.84, T2w 0.75, FLAIR 0.82
    if source != "T1w":  # naming by intensity (darkest = CSF) gets these contrasts wrong
        by_intensity = tissue_posteriors(image, brain).argmax(1)
        assert float((by_intensity == truth.argmax(1)).mean()) < agreement - 0.2

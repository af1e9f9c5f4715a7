"""Held-out evaluation of contrast synthesis against a per-tissue baseline, in the same run.

Simulated subjects never seen in training (their own seeds: deformation, protocol, tissue
jitter, bias and noise) by MAE, PSNR and SSIM inside the brain; the real Colin27 T1 (no truth):
tissue-contrast ordering of the synthetic image inside tissue masks; a lesion check: a 10 mm
lesion with its own relaxation times, simulated into a held-out subject, must show in the
synthetic image with the sign the simulator predicts. The any -> T1w model is scored on the
same held-out subjects seen through several input conditions (`ANY_CONDITIONS`: T2w, PDw,
FLAIR and thick-slice ones), `*_t1w_from_any` the mean over them and `*_t1w_from_any_min` the
worst; its baseline is told each condition's contrast (its table is fitted per condition).
Targets without a model report null with the reason. Last line: JSON.

    python Testing/benchmarks/eval_synthesis.py [--subjects 6] [--pictures Docs/images]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from deepmri import data
from deepmri.errors import ModelError
from deepmri.simulate import ANY, LESION, sample_input_sequence, sample_subject
from deepmri.tasks.segment_classical import classical_tissue
from deepmri.tasks.synthesize import default_model, synthesize, tissue_prior
from deepmri.train.synthesize import TEST_SEEDS, Grid, make_pair, pair_from_parameters
from scipy import ndimage
from skimage.metrics import structural_similarity

# (key suffix, input contrast, target contrast, model scored)
PAIRS = (
    ("t2w", "T1w", "T2w", "t1w-to-t2w"),
    ("flair", "T1w", "FLAIR", "t1w-to-flair"),
    ("t1w_from_t2w", "T2w", "T1w", "t2w-to-t1w"),
)
BASELINE_SEEDS = 800_000_000  # fits the baseline's class -> intensity table (not test subjects)
LESION_SEED = TEST_SEEDS + 5_000
# any -> T1w: (key suffix, input family for `sample_input_sequence`, slice thickness in grid
# voxels or 0). The same held-out subjects (ANY_TEST_SEEDS + i) in every condition.
ANY_CONDITIONS = (
    ("t2w", "T2w", 0),
    ("pdw", "PDw", 0),
    ("flair", "FLAIR", 0),
    ("t2w_thick6mm", "T2w", 3),
    ("flair_thick6mm", "FLAIR", 3),
    ("t1w_thick8mm", "T1w", 4),
)
ANY_TEST_SEEDS = TEST_SEEDS + 10_000
ANY_MODEL = "any-to-t1w"
GRID = Grid()
ROOT = Path(__file__).resolve().parents[2]


def psnr(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    """Peak signal-to-noise ratio inside the brain; the peak is the truth's maximum there."""
    error = float(np.mean((prediction[brain] - truth[brain]) ** 2))
    peak = float(truth[brain].max())
    return float(10.0 * np.log10(peak**2 / max(error, 1e-12)))


def ssim(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    """Mean of the SSIM map (7^3 windows) over brain voxels, data range of the truth in the brain."""
    peak = float(truth[brain].max())
    _, full = structural_similarity(
        truth.astype(np.float64),
        prediction.astype(np.float64),
        data_range=peak,
        win_size=7,
        full=True,
    )
    return float(full[brain].mean())


def mae(prediction: np.ndarray, truth: np.ndarray, brain: np.ndarray) -> float:
    return float(np.abs(prediction[brain] - truth[brain]).mean())


def as_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    image = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
    image.CopyInformation(reference)
    return image


def tissue_classes(image: np.ndarray, brain: np.ndarray, source: str) -> np.ndarray:
    """GMM classes inside the brain (deepmri's classical_tissue), CSF darkest on T1w."""
    values = -image if source != "T1w" else image  # T2w/FLAIR: CSF brightest, negate first
    values = np.where(brain, values - values[brain].min() + 1e-3, 0.0)
    mask = sitk.GetImageFromArray(brain.astype(np.uint8))
    return sitk.GetArrayFromImage(classical_tissue(sitk.GetImageFromArray(values), mask))


def any_condition_pair(seed: int, family: str, factor: int):
    """A subject whose input is of `family` (sampled timings), in `factor`-voxel slices if > 0."""
    params = sample_subject(seed, (ANY,), grid=GRID)
    rng = np.random.default_rng([seed, 7])
    params.sequences[ANY] = sample_input_sequence(family, rng).to_dict()
    if factor:
        params.resolution = {"axis": int(rng.integers(3)), "factor": factor, "offset": 0}
    return pair_from_parameters(params, ANY, "T1w")


class PerTissueBaseline:
    """Segment the input into CSF/GM/WM, paint each class with its mean target intensity.

    The table (class -> mean normalised target) is fitted on simulated subjects of their own
    seeds, neither training nor test subjects; `maker(seed)` makes them (default: `make_pair`).
    """

    def __init__(self, source: str, target: str, subjects: int, maker=None) -> None:
        self.source = source
        maker = maker or (lambda seed: make_pair(seed, source, target, GRID))
        sums, counts = np.zeros(4), np.zeros(4)
        for index in range(subjects):
            image, truth, subject = maker(BASELINE_SEEDS + index)
            labels = tissue_classes(image, subject.brain, source)
            for value in (1, 2, 3):
                where = labels == value
                sums[value] += truth[where].sum()
                counts[value] += where.sum()
        self.table = sums / np.maximum(counts, 1)

    def __call__(self, image: np.ndarray, brain: np.ndarray) -> np.ndarray:
        return self.table[tissue_classes(image, brain, self.source)].astype(np.float32)


def network_prediction(model: str, subject, source: str, target: str) -> np.ndarray:
    """The synthesis task itself on the raw skull-stripped input (it normalises as in training)."""
    raw = np.where(subject.brain, subject.images[source], 0.0)
    result = synthesize(as_image(raw, subject.reference), target, model, skull_stripped=True)
    return sitk.GetArrayFromImage(result.image)


def installed_model(target: str, source: str = "T1w") -> str | None:
    """The id of the model the task picks for (source, target), if it is installed."""
    from deepmri.models import ModelStore

    try:
        return ModelStore().get(default_model(target, source)).card.id
    except ModelError:
        return None


def model_prior(model: str) -> dict | None:
    """The card's `input.prior` of the installed model (a network that corrects a prior)."""
    from deepmri.models import ModelStore

    try:
        return ModelStore().get(model).card.input.get("prior")
    except ModelError:
        return None


def evaluate_simulated(subjects: int, baseline_subjects: int, results: dict, notes: dict) -> dict:
    examples = {}
    for key, source, target, model_id in PAIRS:
        baseline = PerTissueBaseline(source, target, baseline_subjects)
        model = model_id if installed(model_id) else None
        # A model that corrects a per-tissue prior: the prior alone is scored too ("prior_"),
        # so the table says what the network adds to its own starting point.
        prior = model_prior(model_id) if model else None
        metrics = {name: {"net": [], "base": [], "prior": []} for name in ("psnr", "ssim", "mae")}
        for index in range(subjects):
            image, truth, subject = make_pair(TEST_SEEDS + index, source, target, GRID)
            brain = subject.brain
            predictions = {"base": baseline(image, brain)}
            if model:
                predictions["net"] = network_prediction(model, subject, source, target)
            if prior:
                predictions["prior"] = tissue_prior(image, brain, prior)
            score_predictions(metrics, predictions, truth, brain)
            if index == 0:
                examples[key] = (image, truth, predictions, brain)
        for name, values in metrics.items():
            results[f"baseline_{name}_{key}"] = float(np.mean(values["base"]))
            results[f"{name}_{key}"] = float(np.mean(values["net"])) if model else None
            if prior:
                results[f"prior_{name}_{key}"] = float(np.mean(values["prior"]))
        if not model:
            notes[key] = f"no {source} -> {target} model is installed ({model_id})"
    return examples


def score_predictions(scores: dict, predictions: dict, truth, brain) -> None:
    """Append each prediction's PSNR, SSIM and MAE inside the brain to scores[metric][which]."""
    for which, prediction in predictions.items():
        scores["psnr"][which].append(psnr(prediction, truth, brain))
        scores["ssim"][which].append(ssim(prediction, truth, brain))
        scores["mae"][which].append(mae(prediction, truth, brain))


def evaluate_any(
    subjects: int, baseline_subjects: int, model: str, results: dict, notes: dict
) -> dict:
    """any -> T1w on the held-out subjects through each of `ANY_CONDITIONS`, with baselines.

    The dedicated T2w -> T1w model is scored on the T2w conditions too (`*_by_t2w_model`), which
    is what the task's choice of model by source contrast rests on.
    """
    model_id = model if installed(model) else None
    if not model_id:
        notes["t1w_from_any"] = f"no any -> T1w model is installed ({model})"
    dedicated = T2W_TO_T1W if installed(T2W_TO_T1W) else None
    per = {name: {"net": [], "base": []} for name in ("psnr", "ssim", "mae")}
    examples = {}
    for key, family, factor in ANY_CONDITIONS:
        maker = lambda seed, f=family, k=factor: any_condition_pair(seed, f, k)  # noqa: E731
        baseline = PerTissueBaseline(family, "T1w", baseline_subjects, maker)
        scores = {name: {"net": [], "base": [], "t2w_model": []} for name in per}
        for index in range(subjects):
            image, truth, subject = maker(ANY_TEST_SEEDS + index)
            brain = subject.brain
            predictions = {"base": baseline(image, brain)}
            if model_id:
                predictions["net"] = network_prediction(model_id, subject, ANY, "T1w")
            if dedicated and family == "T2w":
                predictions["t2w_model"] = network_prediction(dedicated, subject, ANY, "T1w")
            score_predictions(scores, predictions, truth, brain)
            if index == 0:
                examples[key] = (image, truth, predictions, brain)
        for name, values in scores.items():
            for which, prefix in (("net", ""), ("base", "baseline_")):
                mean = float(np.mean(values[which])) if values[which] else None
                results[f"{prefix}{name}_t1w_from_any_{key}"] = mean
                if mean is not None:
                    per[name][which].append(mean)
            if values["t2w_model"]:
                results[f"{name}_t1w_from_any_{key}_by_t2w_model"] = float(
                    np.mean(values["t2w_model"])
                )
    for name, values in per.items():
        worst = max if name == "mae" else min
        for which, prefix in (("net", ""), ("base", "baseline_")):
            results[f"{prefix}{name}_t1w_from_any"] = (
                float(np.mean(values[which])) if values[which] else None
            )
            results[f"{prefix}{name}_t1w_from_any_min"] = (
                float(worst(values[which])) if values[which] else None
            )
    results["t1w_from_any_conditions"] = [key for key, _, _ in ANY_CONDITIONS]
    return examples


def installed(model: str) -> bool:
    """Whether the store finds `model` (an id or a model folder)."""
    from deepmri.models import ModelStore

    try:
        ModelStore().get(model)
    except ModelError:
        return False
    return True


T2W_TO_T1W = "t2w-to-t1w"


def evaluate_colin(results: dict, notes: dict) -> dict | None:
    """Colin27 (held out, real): contrast ordering of the synthetic image inside tissue masks."""
    if not data.colin27_available():
        for key in ("colin_t2w_order_ok", "colin_flair_order_ok", "seconds_cpu_1mm"):
            results[key] = None
        notes["colin"] = "Colin27 is not installed (apt-get install -y mricron-data)"
        return None
    brain_t1 = data.load_colin27("brain")
    values = sitk.GetArrayFromImage(brain_t1).astype(np.float32)
    brain = ndimage.binary_fill_holes(values > 0)
    classes = tissue_classes(values, brain, "T1w")
    # Tissue masks away from boundaries: eroded once, so partial volume does not decide the order.
    masks = {
        name: ndimage.binary_erosion(classes == value)
        for name, value in (("csf", 1), ("gm", 2), ("wm", 3))
    }
    pictures = {}
    for key, target in (("t2w", "T2w"), ("flair", "FLAIR")):
        model = installed_model(target)
        if not model:
            results[f"colin_{key}_order_ok"] = None
            notes[f"colin_{key}"] = f"no T1w -> {target} model is installed"
            continue
        started = time.process_time()
        wall = time.perf_counter()
        output = synthesize(brain_t1, target, model, skull_stripped=True, uncertainty=False)
        if key == "t2w":
            results["seconds_cpu_1mm"] = time.process_time() - started
            results["seconds_wall_1mm"] = time.perf_counter() - wall
        synthetic = sitk.GetArrayFromImage(output.image)
        means = {name: float(synthetic[mask].mean()) for name, mask in masks.items()}
        results[f"colin_{key}_means"] = means
        if target == "T2w":
            results["colin_t2w_order_ok"] = means["csf"] > means["gm"] > means["wm"]
        else:
            results["colin_flair_order_ok"] = (
                means["csf"] < means["gm"] and means["wm"] < means["gm"]
            )
        pictures[key] = (values, synthetic)
    if "seconds_cpu_1mm" not in results:
        results["seconds_cpu_1mm"] = None
    return pictures


def evaluate_lesion(results: dict, notes: dict) -> dict:
    """A held-out subject with a 10 mm lesion: does the synthetic lesion keep the true sign?"""
    examples = {}
    for key, target in (("t2w", "T2w"), ("flair", "FLAIR")):
        image, truth, subject = make_pair(LESION_SEED, "T1w", target, GRID, lesion=True)
        lesion = subject.probabilities[LESION]
        core = lesion > 0.9
        ring = ndimage.binary_dilation(lesion > 0.05, iterations=3) & ~(lesion > 0.05)
        ring &= subject.probabilities["wm"] > 0.8
        true_contrast = float(truth[core].mean() - truth[ring].mean())
        results[f"lesion_true_contrast_{key}"] = true_contrast
        model = installed_model(target)
        if not model:
            results[f"lesion_contrast_ok_{key}"] = None
            notes[f"lesion_{key}"] = f"no T1w -> {target} model is installed"
            continue
        synthetic = network_prediction(model, subject, "T1w", target)
        contrast = float(synthetic[core].mean() - synthetic[ring].mean())
        results[f"lesion_synthetic_contrast_{key}"] = contrast
        results[f"lesion_contrast_ok_{key}"] = bool(np.sign(contrast) == np.sign(true_contrast))
        examples[key] = (image, truth, synthetic, np.argwhere(core).mean(0).astype(int))
    return examples


def save_pictures(simulated, colin, lesion, folder: Path) -> list[str]:
    """Three planes of input / truth / network / baseline; Colin27 T1 and its synthetic T2w."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def planes(volume, centre):
        return [volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]]]

    if "t2w" in simulated:
        image, truth, predictions, brain = simulated["t2w"]
        rows = [("input T1w", image), ("truth T2w", truth)]
        titles = {"net": "network", "base": "per-tissue baseline", "prior": "network's prior"}
        rows += [(titles[k], v) for k, v in predictions.items()]
        centre = [n // 2 for n in image.shape]
        figure, axes = plt.subplots(3, len(rows), figsize=(2.6 * len(rows), 7.5))
        for column, (title, volume) in enumerate(rows):
            top = float(np.percentile(volume[brain], 99.5))
            for row, plane in enumerate(planes(volume, centre)):
                axes[row, column].imshow(plane, cmap="gray", origin="lower", vmin=0, vmax=top)
                axes[row, column].axis("off")
            axes[0, column].set_title(title, fontsize=9)
        figure.suptitle("Held-out simulated subject (2 mm): T1w -> T2w", fontsize=10)
        figure.tight_layout()
        path = folder / "synthesis-heldout.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(str(path))
    if colin and "t2w" in colin:
        values, synthetic = colin["t2w"]
        centre = [int(n) for n in np.argwhere(values > 0).mean(0)]
        figure, axes = plt.subplots(2, 3, figsize=(9, 6))
        for row, (volume, title) in enumerate(
            ((values, "Colin27 T1 (real)"), (synthetic, "-> T2w (synthetic)"))
        ):
            top = float(np.percentile(volume[values > 0], 99.5))
            for column, plane in enumerate(planes(volume, centre)):
                axes[row, column].imshow(plane, cmap="gray", origin="lower", vmin=0, vmax=top)
                axes[row, column].axis("off")
            axes[row, 0].set_title(title, fontsize=9)
        figure.tight_layout()
        path = folder / "synthesis-colin27.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(str(path))
    if "t2w" in lesion:
        image, truth, synthetic, centre = lesion["t2w"]
        figure, axes = plt.subplots(1, 3, figsize=(8, 3))
        for column, (volume, title) in enumerate(
            ((image, "input T1w"), (truth, "truth T2w"), (synthetic, "synthetic T2w"))
        ):
            top = float(np.percentile(volume[volume > 0], 99.5))
            axes[column].imshow(volume[centre[0]], cmap="gray", origin="lower", vmin=0, vmax=top)
            axes[column].set_title(title, fontsize=9)
            axes[column].axis("off")
        figure.suptitle("10 mm lesion (own T1/T2/PD), held-out subject, axial", fontsize=10)
        figure.tight_layout()
        path = folder / "synthesis-lesion.png"
        figure.savefig(path, dpi=80)
        plt.close(figure)
        written.append(str(path))
    return written


def save_any_picture(examples: dict, folder: Path) -> list[str]:
    """One held-out subject through each input condition: input, truth, baseline, network."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not examples:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    columns = ("input", "truth T1w", "per-tissue baseline", "any-to-t1w")
    figure, axes = plt.subplots(len(examples), 4, figsize=(8, 2.1 * len(examples)))
    for row, (key, (image, truth, predictions, brain)) in enumerate(examples.items()):
        centre = image.shape[0] // 2
        volumes = (image, truth, predictions["base"], predictions.get("net"))
        for column, volume in enumerate(volumes):
            axis = axes[row, column]
            axis.axis("off")
            if volume is None:
                continue
            top = float(np.percentile(volume[brain], 99.5))
            axis.imshow(volume[centre], cmap="gray", origin="lower", vmin=0, vmax=top)
            if row == 0:
                axis.set_title(columns[column], fontsize=9)
        axes[row, 0].text(
            -0.05,
            0.5,
            key,
            transform=axes[row, 0].transAxes,
            rotation=90,
            va="center",
            ha="right",
            fontsize=8,
        )
    figure.suptitle("any -> T1w: one held-out subject (2 mm), axial", fontsize=10)
    figure.tight_layout()
    path = folder / "synthesis-any-to-t1w.png"
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return [str(path)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=6, help="held-out simulated subjects")
    parser.add_argument("--baseline-subjects", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pictures", type=Path, default=None, help="folder for PNG figures")
    parser.add_argument(
        "--update-cards", action="store_true", help="write the metrics into the bundled cards"
    )
    parser.add_argument(
        "--any-model", default=ANY_MODEL, help="the any -> T1w model (an id or a model folder)"
    )
    parser.add_argument(
        "--only-any", action="store_true", help="only the any -> T1w evaluation (no Colin27)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    results: dict[str, Any] = {}
    notes: dict[str, str] = {}
    simulated, colin, lesion = {}, None, {}
    if not args.only_any:
        simulated = evaluate_simulated(args.subjects, args.baseline_subjects, results, notes)
    any_examples = evaluate_any(
        args.subjects, args.baseline_subjects, args.any_model, results, notes
    )
    if not args.only_any:
        colin = evaluate_colin(results, notes)
        lesion = evaluate_lesion(results, notes)
    if args.pictures:
        results["pictures"] = save_pictures(simulated, colin, lesion, args.pictures)
        results["pictures"] += save_any_picture(any_examples, args.pictures)
    results["held_out_subjects"] = args.subjects
    results["seconds_total"] = time.perf_counter() - started
    results["notes"] = notes
    if args.update_cards:
        update_cards(results, argv)
    for key, value in results.items():
        if key not in ("notes", "pictures"):
            print(f"{key:34s} {value}", file=sys.stderr)
    print(json.dumps(_rounded(results)))
    return 0


CARD_METRICS = {
    "t1w-to-t2w": [("psnr", "psnr_t2w"), ("ssim", "ssim_t2w"), ("mae", "mae_t2w")],
    "t1w-to-flair": [("psnr", "psnr_flair"), ("ssim", "ssim_flair"), ("mae", "mae_flair")],
    "t2w-to-t1w": [("psnr", "psnr_t1w_from_t2w"), ("ssim", "ssim_t1w_from_t2w")],
    ANY_MODEL: [
        ("psnr", "psnr_t1w_from_any"),
        ("ssim", "ssim_t1w_from_any"),
        ("mae", "mae_t1w_from_any"),
        ("psnr_worst_condition", "psnr_t1w_from_any_min"),
        ("ssim_worst_condition", "ssim_t1w_from_any_min"),
    ],
}


def update_cards(results: dict, argv: list[str] | None) -> None:
    """Held-out metrics (with the baseline beside each) into the card of each bundled model."""
    from deepmri.models import ModelStore
    from deepmri.models.card import CARD_FILE, ModelCard

    command = "python Testing/benchmarks/eval_synthesis.py " + " ".join(argv or sys.argv[1:])
    dataset = (
        f"{results['held_out_subjects']} held-out simulated subjects (seeds {TEST_SEEDS}+i: "
        "deformation, protocol, tissue jitter, bias and noise never used in training), "
        "inside the brain, 2 mm"
    )
    any_dataset = (
        f"{results['held_out_subjects']} held-out simulated subjects (seeds {ANY_TEST_SEEDS}+i, "
        "never used in training) each seen as "
        + ", ".join(results.get("t1w_from_any_conditions") or [])
        + "; the mean over these conditions (worst_condition: the lowest), inside the brain, "
        "2 mm; the baseline is told each condition's contrast"
    )
    for model_id, entries in CARD_METRICS.items():
        try:
            model = ModelStore().get(model_id)
        except ModelError:
            continue
        card = model.card.to_dict()
        metrics = [
            {
                "name": f"{name}_heldout_simulated",
                "value": round(results[key], 4),
                "baseline": round(results[f"baseline_{key}"], 4),
                "dataset": any_dataset if model_id == ANY_MODEL else dataset,
                "command": command,
            }
            for name, key in entries
            if results.get(key) is not None
        ]
        # A network on a per-tissue prior: the prior alone beside it (what the network adds).
        metrics += [
            {
                "name": f"{name}_heldout_simulated_prior_alone",
                "value": round(results[f"prior_{key}"], 4),
                "dataset": dataset,
                "command": command,
            }
            for name, key in entries
            if results.get(f"prior_{key}") is not None
        ]
        lesion_key = {
            "t1w-to-t2w": "lesion_contrast_ok_t2w",
            "t1w-to-flair": "lesion_contrast_ok_flair",
        }.get(model_id)
        if lesion_key and results.get(lesion_key) is not None:
            metrics.append(
                {
                    "name": "lesion_contrast_sign_ok",
                    "value": int(results[lesion_key]),
                    "dataset": "a 10 mm lesion simulated into a held-out subject",
                    "command": command,
                }
            )
        if not metrics:  # not evaluated in this run (e.g. --only-any): the card keeps its own
            continue
        card["metrics"] = metrics
        ModelCard.from_dict(card).save(model.path / CARD_FILE)


def _rounded(value: Any) -> Any:
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, dict):
        return {key: _rounded(item) for key, item in value.items()}
    return value


if __name__ == "__main__":
    raise SystemExit(main())

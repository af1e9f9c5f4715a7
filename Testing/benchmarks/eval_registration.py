"""Registration evaluation: DeepMRI's affine and deformable against ANTs SyN, elastix and ConvexAdam.

Pairs: Colin27 brain -> MNI152 2009a brain (T1 -> T1), the same with the moving image T2-like
(intensities inverted inside the brain: cross-contrast), and the MNI152 T1 under a known random
smooth deformation (end-point error in mm against the true inverse). Tissue labels (CSF, GM, WM)
come from ONE classical method (deepmri's GMM, `classical_tissue`) run once on each T1 image, and
are identical for every method. Every deformable method starts from the same DeepMRI affine (the
moving image resampled through it), so the figures compare the deformable stages. Each method runs
in its own process, several side by side (`--workers`), and reports the wall and the CPU seconds
of its own call; on a shared machine CPU seconds are the fairer comparison. Peers run where they are
installed (`pip install deepmri[peers]`) and are skipped with a printed reason otherwise;
`--reuse-peers` takes the figures of the peers not run from an earlier run's `results.json`, for
each pair whose DeepMRI affine is unchanged. Last line: JSON.

    OMP_NUM_THREADS=1 python Testing/benchmarks/eval_registration.py --threads 1 --workers 2 \\
        [--write-docs Docs/evaluation-registration.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

TISSUES = {1: "CSF", 2: "GM", 3: "WM"}


def dice_tissue(labels: np.ndarray, reference: np.ndarray) -> float:
    scores = []
    for value in TISSUES:
        a, b = labels == value, reference == value
        scores.append(2.0 * np.logical_and(a, b).sum() / max(a.sum() + b.sum(), 1))
    return float(np.mean(scores))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def smooth_deformation(reference: sitk.Image, amplitude_mm: float, seed: int) -> sitk.Image:
    """A random smooth displacement (control points every ~30 mm, cubic-like), LPS mm."""
    import torch

    rng = np.random.default_rng(seed)
    shape = [
        max(3, round(size * spacing / 30))
        for size, spacing in zip(
            reference.GetSize()[::-1], reference.GetSpacing()[::-1], strict=True
        )
    ]
    coarse = torch.from_numpy(rng.normal(size=(1, 3, *shape)))
    field = torch.nn.functional.interpolate(
        coarse, size=reference.GetSize()[::-1], mode="trilinear", align_corners=True
    )[0].numpy()
    field *= amplitude_mm / np.abs(field).max()
    image = sitk.GetImageFromArray(np.moveaxis(field, 0, -1), isVector=True)
    image.CopyInformation(reference)
    return sitk.Cast(image, sitk.sitkVectorFloat64)


def brain_labels(image: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    from deepmri.tasks.segment_classical import classical_tissue

    mask = sitk.Cast(sitk.BinaryFillhole(sitk.Cast(image > 0, sitk.sitkUInt8)), sitk.sitkUInt8)
    return mask, classical_tissue(image, mask)


# --- peers: each returns (its fixed->moving displacement field on the fixed grid, wall s, CPU s)


def run_syn(fixed: sitk.Image, moving: sitk.Image, workdir: Path):
    import ants

    sitk.WriteImage(sitk.Cast(fixed, sitk.sitkFloat32), str(workdir / "f.nii.gz"))
    sitk.WriteImage(sitk.Cast(moving, sitk.sitkFloat32), str(workdir / "m.nii.gz"))
    f, m = ants.image_read(str(workdir / "f.nii.gz")), ants.image_read(str(workdir / "m.nii.gz"))
    result, wall, cpu = _timed(ants.registration, f, m, type_of_transform="SyNOnly")
    warp_file = next(name for name in result["fwdtransforms"] if name.endswith(".nii.gz"))
    field = sitk.ReadImage(warp_file, sitk.sitkVectorFloat64)
    return field, wall, cpu


def run_elastix(fixed: sitk.Image, moving: sitk.Image, workdir: Path, threads: int):
    import itk

    f = itk.image_from_array(array(fixed).astype(np.float32))
    m = itk.image_from_array(array(moving).astype(np.float32))
    for image, source in ((f, fixed), (m, moving)):
        image.SetSpacing(source.GetSpacing())
        image.SetOrigin(source.GetOrigin())
        image.SetDirection(itk.matrix_from_array(np.asarray(source.GetDirection()).reshape(3, 3)))
    parameters = itk.ParameterObject.New()
    parameters.AddParameterMap(parameters.GetDefaultParameterMap("bspline", 4))
    (_, transform_parameters), wall, cpu = _timed(
        itk.elastix_registration_method,
        f,
        m,
        parameter_object=parameters,
        log_to_console=False,
        number_of_threads=threads,
    )
    # transformix writes deformationField.nii: into the job's folder, not the working directory
    field = itk.transformix_deformation_field(
        m, transform_parameters, output_directory=str(workdir)
    )
    vectors = itk.array_from_image(field).astype(np.float64)
    image = sitk.GetImageFromArray(vectors, isVector=True)
    image.CopyInformation(fixed)
    return image, wall, cpu


def run_convexadam(fixed: sitk.Image, moving: sitk.Image):
    import torch
    from convexAdam.convex_adam_MIND import convex_adam_pt

    displacement, wall, cpu = _timed(
        convex_adam_pt,
        sitk.Cast(fixed, sitk.sitkFloat32),
        sitk.Cast(moving, sitk.sitkFloat32),
        device=torch.device("cpu"),
    )
    # (k, j, i, 3) voxel displacements along the array axes -> LPS mm.
    from deepmri.registration.deformable import field_image_from_tensor

    spacing = np.asarray(fixed.GetSpacing()[::-1]).reshape(3, 1, 1, 1)
    field = field_image_from_tensor(np.moveaxis(displacement, -1, 0) * spacing, fixed)
    return field, wall, cpu


PEER_MODULES = {"syn": "ants", "elastix": "itk", "convexadam": "convexAdam"}


def prepare(workdir: Path, spacing: float) -> dict[str, str]:
    """Every input written once (so each job, in its own process, reads the same files)."""
    from deepmri import data
    from deepmri.registration.fields import compose
    from deepmri.simulate import inverted_contrast

    fixed = sitk.Cast(data.load_mni152("t1"), sitk.sitkFloat32)
    colin = sitk.Cast(data.load_colin27("brain"), sitk.sitkFloat32)
    if spacing != 1.0:
        from deepmri.geometry import resample_to_spacing

        fixed, colin = (resample_to_spacing(image, [spacing] * 3) for image in (fixed, colin))
    fixed_mask, fixed_labels = brain_labels(fixed)
    _, colin_labels = brain_labels(colin)
    warp = smooth_deformation(fixed, 8.0, seed=18)
    inverse = sitk.InvertDisplacementField(
        warp, maximumNumberOfIterations=50, maxErrorToleranceThreshold=0.01
    )
    images = {
        "fixed": fixed,
        "fixed_mask": fixed_mask,
        "fixed_labels": fixed_labels,
        "moving": colin,
        "moving_xcontrast": inverted_contrast(colin),
        "moving_labels": colin_labels,
        "moving_synthetic": sitk.Resample(fixed, fixed, compose(None, warp), sitk.sitkLinear, 0.0),
        "truth_synthetic": inverse,
    }
    paths = {}
    for name, image in images.items():
        paths[name] = str(workdir / f"{name}.nrrd")
        sitk.WriteImage(image, paths[name])
    return paths


def _timed(function, *args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    value = function(*args, **kwargs)
    return value, time.perf_counter() - wall, time.process_time() - cpu


def run_job(method: str, pair: str, paths: dict[str, str], threads: int, output: str) -> dict:
    """One method on one pair, in its own process: figures keyed like the final JSON."""
    os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    from deepmri.registration import register
    from deepmri.registration.fields import compose, folding_percent, jacobian_determinant

    read = {name: sitk.ReadImage(path) for name, path in paths.items()}
    fixed, mask = read["fixed"], read["fixed_mask"]
    reference = array(read["fixed_labels"])
    moving = read["moving" + pair]
    workdir = Path(tempfile.mkdtemp(prefix=f"{method}{pair}-"))
    results: dict[str, float | str | None] = {}
    truth = compose(None, read["truth_synthetic"])
    rng = np.random.default_rng(18)
    voxels = np.argwhere(array(mask) > 0)
    voxels = voxels[rng.choice(len(voxels), min(5000, len(voxels)), replace=False)]
    points = [
        fixed.TransformIndexToPhysicalPoint([int(v) for v in voxel[::-1]]) for voxel in voxels
    ]

    def end_point_error(transform: sitk.Transform) -> float:
        errors = [
            np.linalg.norm(np.subtract(transform.TransformPoint(p), truth.TransformPoint(p)))
            for p in points
        ]
        return float(np.mean(errors))

    if method == "deepmri":
        # Imports stay outside the timing, as for every peer (ants, itk, convexAdam are imported
        # before their calls are timed): MONAI's first import alone costs seconds.
        import monai.networks.blocks  # noqa: F401

        marks = {}

        def progress(fraction: float, message: str) -> None:
            if message == "linear alignment done":
                marks["wall"], marks["cpu"] = time.perf_counter(), time.process_time()

        wall, cpu = time.perf_counter(), time.process_time()
        ours = register(fixed, moving, "deformable", progress=progress)
        end_wall, end_cpu = time.perf_counter(), time.process_time()
        sitk.WriteTransform(ours.linear, str(Path(output) / f"affine{pair}.tfm"))
        results[f"seconds_affine{pair}"] = round(marks["wall"] - wall, 2)
        results[f"cpu_seconds_affine{pair}"] = round(marks["cpu"] - cpu, 2)
        results[f"seconds_deformable{pair}"] = round(end_wall - marks["wall"], 2)
        results[f"cpu_seconds_deformable{pair}"] = round(end_cpu - marks["cpu"], 2)
        results[f"folding_pct_deformable{pair}"] = folding_percent(ours.jacobian, mask)
        results[f"similarity_deformable{pair}"] = ours.measures["similarity"]
        if pair == "_synthetic":
            results["epe_mm_identity"] = end_point_error(sitk.Transform(3, sitk.sitkIdentity))
            results["epe_mm_affine"] = end_point_error(ours.linear)
            results["epe_mm_deformable"] = end_point_error(ours.transform)
            return results
        labels_affine = sitk.Resample(
            read["moving_labels"], fixed, ours.linear, sitk.sitkNearestNeighbor, 0
        )
        results[f"dice_tissue_affine{pair}"] = dice_tissue(array(labels_affine), reference)
        # The same route as the peers: labels through the affine, then through the field.
        warped = sitk.Resample(
            labels_affine, fixed, compose(None, ours.displacement), sitk.sitkNearestNeighbor, 0
        )
        results[f"dice_tissue_deformable{pair}"] = dice_tissue(array(warped), reference)
        if pair == "":
            affine_only = sitk.Resample(moving, fixed, ours.linear, sitk.sitkLinear, 0.0)
            save_overlay(fixed, affine_only, ours.warped, ours.jacobian, Path(output))
        return results

    if pair == "_synthetic":
        start = sitk.Transform(3, sitk.sitkIdentity)
    else:
        start = sitk.ReadTransform(str(Path(output) / f"affine{pair}.tfm"))
    moving_affine = sitk.Resample(moving, fixed, start, sitk.sitkLinear, 0.0)
    if method == "syn":
        field, wall, cpu = run_syn(fixed, moving_affine, workdir)
    elif method == "elastix":
        field, wall, cpu = run_elastix(fixed, moving_affine, workdir, threads)
    else:
        field, wall, cpu = run_convexadam(fixed, moving_affine)
    results[f"seconds_{method}{pair}"] = round(wall, 2)
    results[f"cpu_seconds_{method}{pair}"] = round(cpu, 2)
    results[f"folding_pct_{method}{pair}"] = folding_percent(jacobian_determinant(field), mask)
    if pair == "_synthetic":
        results[f"epe_mm_{method}"] = end_point_error(compose(start, field))
        return results
    labels_affine = sitk.Resample(read["moving_labels"], fixed, start, sitk.sitkNearestNeighbor, 0)
    peer_labels = sitk.Resample(
        labels_affine, fixed, compose(None, field), sitk.sitkNearestNeighbor, 0
    )
    results[f"dice_tissue_{method}{pair}"] = dice_tissue(array(peer_labels), reference)
    return results


def same_affine(first: Path, second: Path) -> bool:
    """Whether two written affines are the same transform (parameters to 1e-9)."""
    if not (first.exists() and second.exists()):
        return False
    a, b = sitk.ReadTransform(str(first)), sitk.ReadTransform(str(second))
    return np.allclose(a.GetParameters(), b.GetParameters(), rtol=0, atol=1e-9) and np.allclose(
        a.GetFixedParameters(), b.GetFixedParameters(), rtol=0, atol=1e-9
    )


def reusable_peer_results(previous: Path, output: Path, pair: str, peers: list[str]) -> dict:
    """A previous run's peer figures for `pair`, if that run's peers started where these would.

    Every input is made the same way each run and DeepMRI's affine is reproducible, so a peer's
    result depends only on that affine (the known-warp pair starts from the identity). Seconds
    reused this way come from the earlier run's machine load: say so when reporting them.
    """
    if pair != "_synthetic" and not same_affine(
        previous / f"affine{pair}.tfm", output / f"affine{pair}.tfm"
    ):
        return {}
    stored = json.loads((previous / "results.json").read_text(encoding="utf-8"))
    figures = {}
    for peer in peers:
        keys = [
            key
            for key in stored
            if key.endswith(f"_{peer}{pair}") and not key.startswith("epe_mm_")
        ]
        if pair == "_synthetic":
            keys.append(f"epe_mm_{peer}")
        found = {key: stored[key] for key in keys if stored.get(key) is not None}
        if found:
            figures.update(found)
    return figures


def main() -> None:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="threads per method")
    parser.add_argument("--workers", type=int, default=2, help="methods run side by side")
    parser.add_argument("--peers", default="syn,elastix,convexadam")
    parser.add_argument("--output", default=None, help="folder for overlays (PNG) and affines")
    parser.add_argument("--write-docs", default=None)
    parser.add_argument(
        "--spacing", type=float, default=1.0, help="resample both images first (a quick smoke run)"
    )
    parser.add_argument(
        "--reuse-peers",
        default=None,
        help="a previous run's --output folder (with its results.json): the figures of the "
        "peers not run this time (not in --peers) are taken from it, for each pair whose DeepMRI "
        "affine is the same as this run's",
    )
    arguments = parser.parse_args()
    output = Path(arguments.output or tempfile.mkdtemp(prefix="eval-registration-"))
    output.mkdir(parents=True, exist_ok=True)
    available = []
    for name in [name for name in arguments.peers.split(",") if name]:
        try:
            __import__(PEER_MODULES[name])
            if name == "elastix":
                import itk

                itk.ElastixRegistrationMethod  # noqa: B018 - loads the elastix module
            available.append(name)
        except Exception as error:  # noqa: BLE001 - any import failure skips the peer
            print(f"skipping {name}: {PEER_MODULES.get(name)} is not importable ({error})")
    paths = prepare(Path(tempfile.mkdtemp(prefix="eval-inputs-")), arguments.spacing)
    print("tissue labels: classical GMM once per T1 image, the same for every method", flush=True)
    results: dict[str, float | str | None] = {}
    context = multiprocessing.get_context("spawn")

    def submit(pool, method, pair):
        return pool.submit(
            run_job, method, pair, paths, arguments.threads, str(output)
        ), f"{method}{pair}"

    previous = Path(arguments.reuse_peers) if arguments.reuse_peers else None

    def reused(pair: str) -> dict:
        if previous is None:
            return {}
        others = [name for name in PEER_MODULES if name not in available]
        figures = reusable_peer_results(previous, output, pair, others)
        print(f"reused from {previous} for pair '{pair}':", json.dumps(figures), flush=True)
        return figures

    with ProcessPoolExecutor(arguments.workers, mp_context=context) as pool:
        first = [submit(pool, "deepmri", pair) for pair in ("", "_xcontrast")]
        later = [submit(pool, "deepmri", "_synthetic")]
        results.update(reused("_synthetic"))
        if "syn" in available and "epe_mm_syn" not in results:
            later.append(submit(pool, "syn", "_synthetic"))
        for future, name in first:
            results.update(future.result())
            print(name, json.dumps(future.result()), flush=True)
        for pair in ("", "_xcontrast"):
            results.update(reused(pair))
            later += [
                submit(pool, method, pair)
                for method in available
                if f"dice_tissue_{method}{pair}" not in results
            ]
        for future, name in later:
            try:
                results.update(future.result())
                print(name, json.dumps(future.result()), flush=True)
            except Exception as error:  # noqa: BLE001 - a failing peer is reported, not fatal
                print(f"{name} failed: {error}", flush=True)
    for name in ("syn", "elastix", "convexadam"):
        for pair in ("", "_xcontrast"):
            results.setdefault(f"dice_tissue_{name}{pair}", None)
    results.setdefault("epe_mm_syn", None)
    for kind in ("seconds", "cpu_seconds"):
        for pair in ("", "_xcontrast", "_synthetic"):
            if results.get(f"{kind}_syn{pair}") and results.get(f"{kind}_deformable{pair}"):
                results[f"speedup_vs_syn_{kind}{pair}"] = round(
                    results[f"{kind}_syn{pair}"] / results[f"{kind}_deformable{pair}"], 2
                )
    print("overlays:", output, flush=True)
    (output / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
    if arguments.write_docs:
        write_docs(Path(arguments.write_docs), results, arguments)
    print(
        json.dumps(
            {key: (round(v, 4) if isinstance(v, float) else v) for key, v in results.items()}
        )
    )


def save_overlay(fixed, affine_only, warped, jacobian, output: Path) -> None:
    """Three planes: fixed, affine-only and deformable overlays (magenta/green) and the Jacobian."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f, a, w, j = (array(image) for image in (fixed, affine_only, warped, jacobian))
    f, a, w = (x / np.percentile(x[x > 0], 99) for x in (f, a, w))
    centre = [s // 2 for s in f.shape]
    planes = [lambda x: x[centre[0]], lambda x: x[:, centre[1]], lambda x: x[:, :, centre[2]]]
    figure, axes = plt.subplots(3, 3, figsize=(11, 11))
    for row, plane in enumerate(planes):
        for column, (title, other) in enumerate((("affine", a), ("deformable", w))):
            rgb = np.stack([plane(other), plane(f), plane(other)], -1).clip(0, 1)
            axes[row, column].imshow(rgb[::-1], interpolation="nearest")
            axes[row, column].set_title(f"fixed (green) vs {title} (magenta)")
        shown = axes[row, 2].imshow(plane(j)[::-1], cmap="RdBu_r", vmin=0, vmax=2)
        axes[row, 2].set_title("Jacobian determinant")
    figure.colorbar(shown, ax=axes[:, 2], shrink=0.6)
    for axis in axes.ravel():
        axis.axis("off")
    figure.savefig(output / "registration-overlay.png", dpi=80)
    plt.close(figure)


def write_docs(path: Path, results: dict, arguments) -> None:
    def cell(key: str) -> str:
        value = results.get(key)
        if value is None:
            return "—"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = [
        "| method | tissue Dice T1->T1 | tissue Dice T2-like->T1 | wall s (T1) | CPU s (T1) "
        "| CPU s (T2-like) | folding % in brain (T1) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, label in (
        ("affine", "DeepMRI affine (start of all below)"),
        ("deformable", "DeepMRI deformable"),
        ("syn", "ANTs SyN (SyNOnly, antspyx defaults)"),
        ("elastix", "elastix B-spline (itk-elastix default map)"),
        ("convexadam", "ConvexAdam (defaults, CPU)"),
    ):
        lines.append(
            f"| {label} | {cell('dice_tissue_' + name)} | {cell('dice_tissue_' + name + '_xcontrast')} "
            f"| {cell('seconds_' + name)} | {cell('cpu_seconds_' + name)} "
            f"| {cell('cpu_seconds_' + name + '_xcontrast')} | {cell('folding_pct_' + name)} |"
        )
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    marker = "<!-- table -->"
    table = "\n".join(lines)
    command = (
        "OMP_NUM_THREADS=1 python Testing/benchmarks/eval_registration.py "
        f"--threads {arguments.threads} --workers {arguments.workers}"
    )
    if arguments.reuse_peers:
        command += f" --peers {arguments.peers} --reuse-peers PREVIOUS_OUTPUT"
    block = f"{marker}\n{table}\n\nCommand: `{command}`\n\n```json\n{json.dumps(results, indent=1)}\n```\n{marker}"
    if text.count(marker) >= 2:
        start, end = text.index(marker), text.rindex(marker) + len(marker)
        text = text[:start] + block + text[end:]
    else:
        text = text + "\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())

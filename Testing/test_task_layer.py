"""A task declared only here, with two inputs, runs through every core front door unchanged.

`DifferenceTask` (fixed and moving volumes -> their difference and its mean) is registered in this
file alone; the CLI gets its sub-command and help, batch takes a two-column CSV, and the
background worker (`python -m deepmri.worker`, a real subprocess) reports progress, writes the
`TaskResult` and stops on cancel.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_image
from deepmri.batch import read_cases, run_batch
from deepmri.cli import main
from deepmri.errors import InvalidImageError
from deepmri.geometry import same_geometry
from deepmri.io import read_image, write_image, write_json
from deepmri.progress import check_cancel
from deepmri.tasks import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskResult,
    get_task,
    register_task,
    task_reference,
    unregister_task,
)

HERE = Path(__file__).resolve().parent


class DifferenceTask(Task):
    """moving - fixed (or its absolute value), slice by slice, `delay_s` per slice for tests."""

    name = "test-difference"
    title = "Difference"
    help = "difference of two volumes on the fixed grid"
    inputs = (
        InputSpec("fixed", Kind.VOLUME, "the reference volume"),
        InputSpec("moving", Kind.VOLUME, "the volume compared with it"),
    )
    options = (
        OptionSpec("scale", float, 1.0, "factor applied to the difference"),
        OptionSpec("absolute", bool, False, "take the absolute value"),
        OptionSpec("reduce", str, "mean", "summary measure", choices=("mean", "max")),
        OptionSpec("delay_s", float, 0.0, "seconds to wait per slice"),
    )
    outputs = (
        OutputSpec("difference", Kind.VOLUME, "the difference volume"),
        OutputSpec("mask", Kind.LABELS, "where the volumes differ", optional=True),
    )

    def run(self, inputs, options, context: RunContext) -> TaskResult:
        fixed, moving = inputs["fixed"], inputs["moving"]
        if fixed.GetSize() != moving.GetSize():
            raise InvalidImageError("The fixed and moving volumes differ in size.")
        a = sitk.GetArrayFromImage(fixed).astype(np.float32)
        b = sitk.GetArrayFromImage(moving).astype(np.float32)
        difference = np.empty_like(a)
        for k in range(a.shape[0]):
            check_cancel(context.cancel)
            difference[k] = (b[k] - a[k]) * options["scale"]
            if options["absolute"]:
                difference[k] = np.abs(difference[k])
            time.sleep(options["delay_s"])
            context.progress((k + 1) / a.shape[0], f"slice {k + 1} of {a.shape[0]}")
        image = sitk.GetImageFromArray(difference)
        image.CopyInformation(fixed)
        images = {"difference": image}
        if context.wants("mask"):
            mask = sitk.GetImageFromArray((difference != 0).astype(np.uint8))
            mask.CopyInformation(fixed)
            images["mask"] = mask
        reduce = np.mean if options["reduce"] == "mean" else np.max
        measures = {"difference": round(float(reduce(difference)), 4)}
        return TaskResult(self.name, images=images, measures=measures, info={"unit": "a.u."})


@pytest.fixture
def difference_task():
    task = register_task(DifferenceTask, replace=True)
    yield task
    unregister_task(task.name)


@pytest.fixture
def pair(tmp_path) -> tuple[Path, Path]:
    fixed = make_oblique_image(size=(12, 10, 8), seed=1)
    moving = make_oblique_image(size=(12, 10, 8), seed=2)
    return write_image(fixed, tmp_path / "fixed.nii.gz"), write_image(moving, tmp_path / "m.nrrd")


def expected_difference(pair, scale=1.0, absolute=False) -> np.ndarray:
    a, b = (sitk.GetArrayFromImage(read_image(path)).astype(np.float32) for path in pair)
    difference = (b - a) * np.float32(scale)
    return np.abs(difference) if absolute else difference


def test_the_cli_builds_the_sub_command_and_its_help_from_the_declaration(difference_task, capsys):
    with pytest.raises(SystemExit) as done:
        main(["test-difference", "--help"])
    assert done.value.code == 0
    help_text = " ".join(capsys.readouterr().out.split())
    for expected in (
        "fixed",
        "moving",
        "--scale SCALE",
        "factor applied to the difference (default: 1.0)",
        "--absolute, --no-absolute",
        "--reduce {mean,max}",
        "--delay-s",
        "--mask [PATH]",
        "--device",
        "--precision {auto,fp32,fp16,bf16}",
        "--threads",
        "-o OUTPUT",
    ):
        assert expected in help_text, expected


def test_the_cli_runs_the_task_with_typed_options_and_writes_each_output(
    difference_task, pair, tmp_path, capsys
):
    output = tmp_path / "out" / "difference.nrrd"
    command = ["test-difference", str(pair[0]), str(pair[1]), "-o", str(output)]
    assert main([*command, "--scale", "2", "--absolute", "--mask", "--reduce", "max"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    written = read_image(output)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(written), expected_difference(pair, 2.0, True), rtol=1e-6
    )
    assert same_geometry(written, read_image(pair[0]), tolerance=1e-6)
    assert summary["outputs"]["mask"] == str(tmp_path / "out" / "mask.nrrd")  # beside -o
    assert read_image(tmp_path / "out" / "mask.nrrd").GetPixelID() == sitk.sitkUInt8
    assert summary["measures"]["difference"] == pytest.approx(
        float(expected_difference(pair, 2.0, True).max()), abs=1e-3
    )


def test_a_cli_output_folder_receives_the_whole_result(difference_task, pair, tmp_path, capsys):
    folder = tmp_path / "result"
    assert main(["test-difference", str(pair[0]), str(pair[1]), "-o", str(folder)]) == 0
    result = TaskResult.read(folder)
    assert sorted(result.images) == ["difference"] and result.info == {"unit": "a.u."}
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(result.images["difference"]), expected_difference(pair)
    )


@pytest.mark.parametrize(
    ("extra", "complaint"),
    [
        (["-o", "{tmp}/d.jpg"], "file ending"),
        (["-o", "{tmp}/d.nii.gz", "--mask", "{tmp}/mask.png"], "mask.png"),
        (["-o", "{tmp}/d.nii.gz", "--device", "cuda:3"], "cuda:3"),
        (["-o", "{tmp}/d.nii.gz", "--device", "quantum"], "not a device name"),
    ],
)
def test_bad_output_paths_and_devices_are_refused_before_any_work(
    difference_task, pair, tmp_path, capsys, monkeypatch, extra, complaint
):
    import torch

    if "cuda:3" in extra and torch.cuda.device_count() > 3:
        pytest.skip("this machine has a cuda:3")
    ran = []
    monkeypatch.setattr(DifferenceTask, "run", lambda *arguments: ran.append(1))
    arguments = [part.replace("{tmp}", str(tmp_path / "o")) for part in extra]
    assert main(["test-difference", str(pair[0]), str(pair[1]), *arguments]) == 2
    error = capsys.readouterr().err
    assert error.startswith("deepmri: error:") and complaint in error
    assert len(error.strip().splitlines()) == 1
    assert not ran and not (tmp_path / "o").exists()


def test_batch_runs_a_two_column_csv_with_a_per_row_option(difference_task, pair, tmp_path):
    cases = tmp_path / "pairs.csv"
    cases.write_text(
        f"id,fixed,moving,scale\nplain,{pair[0].name},{pair[1].name},\n"
        f"double,{pair[0]},{pair[1]},2\n"
    )
    listed = read_cases(cases, "test-difference")
    assert [case.inputs["moving"] for case in listed] == [pair[1], pair[1]]
    report = run_batch(
        listed, "test-difference", tmp_path / "out", options={"absolute": "yes"}, wanted=["mask"]
    )
    assert [result.status for result in report.results] == ["done", "done"]
    for case_id, scale in (("plain", 1.0), ("double", 2.0)):
        result = TaskResult.read(tmp_path / "out" / case_id)
        np.testing.assert_allclose(
            sitk.GetArrayFromImage(result.images["difference"]),
            expected_difference(pair, scale, True),
            rtol=1e-6,
        )
        assert "mask" in result.images
        row = next(row for row in report.summary_rows if row["id"] == case_id)
        assert row["difference"] == pytest.approx(
            float(expected_difference(pair, scale, True).mean()), abs=1e-3
        )
    # The same run again finds both cases done; a missing required column is named.
    again = run_batch(listed, "test-difference", tmp_path / "out", options={"absolute": "yes"})
    assert [result.status for result in again.results] == ["skipped", "skipped"]
    (tmp_path / "bad.csv").write_text(f"id,fixed\na,{pair[0]}\n")
    with pytest.raises(Exception, match="no column moving"):
        read_cases(tmp_path / "bad.csv", "test-difference")


def test_batch_from_the_command_line_takes_the_task_and_its_options(
    difference_task, pair, tmp_path, capsys
):
    (tmp_path / "pairs.csv").write_text(f"id,fixed,moving\nonly,{pair[0]},{pair[1]}\n")
    command = ["batch", str(tmp_path / "pairs.csv"), "--task", "test-difference"]
    assert main([*command, "-o", str(tmp_path / "out"), "--option", "scale=3"]) == 0
    assert "1 done, 0 failed, 0 pending" in capsys.readouterr().out
    difference = read_image(tmp_path / "out" / "only" / "difference.nii.gz")
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(difference), expected_difference(pair, 3.0), rtol=1e-6
    )


def start_worker(tmp_path: Path, pair, options: dict, wanted=()) -> subprocess.Popen:
    task = get_task("test-difference")
    request = {
        # Not registered in the worker's process: named by its import path instead.
        "task": task_reference(task),
        "inputs": {"fixed": str(pair[0]), "moving": str(pair[1])},
        "options": options,
        "config": {"device": "cpu", "precision": "auto", "threads": 1},
        "wanted": list(wanted),
        "output_dir": str(tmp_path / "job"),
    }
    path = write_json(request, tmp_path / "request.json")
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), *sys.path])}
    return subprocess.Popen(
        [sys.executable, "-m", "deepmri.worker", str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
    )


def test_the_worker_runs_a_task_it_imports_by_reference_and_reports_progress(
    difference_task, pair, tmp_path
):
    assert task_reference(difference_task) == "test_task_layer:DifferenceTask"
    process = start_worker(tmp_path, pair, {"scale": 0.5}, wanted=["mask"])
    out, err = process.communicate(timeout=120)
    assert process.returncode == 0, err
    events = [json.loads(line) for line in out.splitlines()]
    fractions = [event["fraction"] for event in events if event["event"] == "progress"]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) > 8
    final = events[-1]
    assert final["event"] == "result" and final["folder"] == str(tmp_path / "job")
    assert final["files"] == {"difference": "difference.nrrd", "mask": "mask.nrrd"}
    result = TaskResult.read(final["folder"])
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(result.images["difference"]), expected_difference(pair, 0.5)
    )
    assert result.measures["difference"] == pytest.approx(
        float(expected_difference(pair, 0.5).mean()), abs=1e-3
    )


def test_the_worker_stops_on_sigterm_and_writes_nothing(difference_task, pair, tmp_path):
    process = start_worker(tmp_path, pair, {"delay_s": 1.0})
    first = json.loads(process.stdout.readline())
    while first.get("message", "").startswith("Starting"):
        first = json.loads(process.stdout.readline())
    assert first["event"] == "progress" and first["message"] == "slice 1 of 8"
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 3
    assert json.loads(out.splitlines()[-1])["event"] == "cancelled"
    assert not (tmp_path / "job").exists()


def test_the_worker_reports_a_bad_request_as_one_error_event(difference_task, pair, tmp_path):
    process = start_worker(tmp_path, pair, {"reduce": "median"})
    out, _ = process.communicate(timeout=60)
    assert process.returncode == 1
    event = json.loads(out.splitlines()[-1])
    assert event["event"] == "error" and "mean, max" in event["message"]


class ClashingTask(DifferenceTask):
    name = "test-clashing"
    options = (OptionSpec("mask", bool, False, "an option named like an optional output"),)


def test_a_task_whose_flags_clash_is_refused_alone_and_the_cli_still_works(
    difference_task, pair, tmp_path, capsys
):
    clashing = register_task(ClashingTask, replace=True)
    try:
        command = ["test-clashing", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "x")]
        assert main(command) == 2
        assert "--mask for more than one" in capsys.readouterr().err
        command = ["test-difference", str(pair[0]), str(pair[1]), "-o", str(tmp_path / "y")]
        assert main(command) == 0
    finally:
        unregister_task(clashing.name)

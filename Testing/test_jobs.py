"""Background jobs: a real worker process (progress, prompt cancel, clean errors) and a thread job,
both followed by the panels' shared job runner.

The worker runs real work (slice-wise Gaussian smoothing, a threshold segmenter); no fake sleeps.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_image
from deepmri import worker
from deepmri.errors import Cancelled, DeepMRIError
from deepmri.progress import check_cancel
from deepmri.runconfig import RunConfig
from deepmri.tasks import InputSpec, Kind, OutputSpec, Task
from DeepMRILib import jobs
from DeepMRILib.widgets import ERROR_STYLE, JobRunner

TESTING_DIR = str(Path(__file__).resolve().parent)
PLUG_INS = {"PYTHONPATH": TESTING_DIR}


class CrashingTask(Task):
    """A task with a programming error (not a DeepMRIError), run by reference in the worker."""

    name = "test-crash"
    inputs = (InputSpec("image", Kind.VOLUME, "any volume"),)
    outputs = (OutputSpec("image", Kind.VOLUME, "never made"),)

    def run(self, inputs, options, context):
        return json.loads(inputs["image"])  # TypeError: an image is not JSON text


def run_to_end(job) -> list[jobs.ProgressEvent]:
    events = []
    while not job.done:
        events.extend(job.poll())
        time.sleep(0.02)
    events.extend(job.poll())
    return events


def smooth_like_the_worker(image: sitk.Image, sigma: float, passes: int) -> np.ndarray:
    volume = sitk.GetArrayFromImage(image).astype(np.float32)
    for _ in range(passes):
        for k in range(volume.shape[0]):
            plane = sitk.GetImageFromArray(volume[k])
            plane.SetSpacing(image.GetSpacing()[:2])
            volume[k] = sitk.GetArrayFromImage(sitk.SmoothingRecursiveGaussian(plane, sigma))
    return volume


def test_smooth_job_streams_progress_and_returns_the_smoothed_image_on_the_input_grid(
    oblique_image,
):
    config = RunConfig(device="cpu", precision="fp16", threads=2)
    job = jobs.start_job(
        "smooth", {"image": oblique_image}, {"sigma_mm": 1.5, "passes": 2}, config=config
    )
    request = json.loads((job.folder / "request.json").read_text())
    assert request["config"] == {"device": "cpu", "precision": "fp16", "threads": 2}
    assert request["wanted"] == [] and request["task"] == "smooth"
    assert Path(request["inputs"]["image"]).is_file()
    events = run_to_end(job)
    assert job.state == jobs.SUCCEEDED, job.error
    depth = oblique_image.GetSize()[2]
    slices = [event for event in events if event.message.startswith("Smoothing")]
    assert len(slices) == 2 * depth
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert slices[0].message == f"Smoothing slice 1/{depth} (pass 1/2)"
    result = job.result()
    smoothed = result.images["smoothed"]
    assert smoothed.GetSize() == oblique_image.GetSize()
    np.testing.assert_allclose(smoothed.GetOrigin(), oblique_image.GetOrigin())
    np.testing.assert_allclose(smoothed.GetDirection(), oblique_image.GetDirection())
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(smoothed), smooth_like_the_worker(oblique_image, 1.5, 2), rtol=1e-6
    )
    assert result.info == {"sigma_mm": 1.5, "passes": 2}
    assert not job.folder.exists()


def test_cancel_stops_the_worker_at_its_next_check_and_leaves_no_files(mni_t1):
    # About a minute of smoothing on 2 cores: only a prompt cancel ends it early.
    job = jobs.start_job("smooth", {"image": mni_t1}, {"sigma_mm": 2.0, "passes": 40})
    while not any(event.fraction > 0 for event in job.poll()):
        assert job.state == jobs.RUNNING
        time.sleep(0.02)
    started = time.monotonic()
    # A generous grace: a loaded machine takes seconds to end a Python that has loaded torch.
    job.cancel(grace_s=15.0)
    print(f"cancel took {time.monotonic() - started:.2f} s")
    assert job.state == jobs.CANCELLED
    # Exited by itself with the cancelled status inside the grace, not killed.
    assert job._process.returncode == worker.EXIT_CANCELLED
    assert job.fraction < 0.5
    assert not job.folder.exists()
    with pytest.raises(Cancelled):
        job.result()


def test_a_2d_input_fails_with_the_workers_message_not_a_traceback():
    slice_2d = make_oblique_image()[:, :, 3]
    job = jobs.start_job("smooth", {"image": slice_2d}, {})
    assert job.wait() == jobs.FAILED
    assert job.error == "The input is 2D; smoothing works on 3D volumes."
    with pytest.raises(jobs.JobError, match="The input is 2D") as raised:
        job.result()
    assert "Traceback" not in str(raised.value)
    assert not job.folder.exists()


def test_an_unreadable_input_file_names_the_file(tmp_path):
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_text("this is not an image")
    job = jobs.start_job("smooth", {"image": not_an_image}, {})
    assert job.wait() == jobs.FAILED
    assert f"'{not_an_image}'" in job.error


def test_an_unknown_task_is_refused_with_the_known_names(oblique_image):
    job = jobs.start_job("sharpen", {"image": oblique_image}, {})
    assert job.wait() == jobs.FAILED
    assert job.error.startswith("Unknown task 'sharpen'; known tasks: ")
    assert "segment" in job.error and "smooth" in job.error


def test_an_unexpected_crash_is_reported_with_the_last_error_line(oblique_image):
    job = jobs.start_job("test_jobs:CrashingTask", {"image": oblique_image}, environment=PLUG_INS)
    assert job.wait() == jobs.FAILED
    assert job.error.startswith("The background process stopped unexpectedly (exit status 1): ")
    assert "TypeError" in job.error


def test_a_task_named_by_reference_returns_its_declared_outputs(oblique_image):
    job = jobs.start_job(
        "threshold_segmenter:ThresholdSegmentTask",
        {"image": oblique_image},
        {"model": "threshold"},
        wanted=["probability", "uncertainty"],
        environment=PLUG_INS,
    )
    events = run_to_end(job)
    assert job.state == jobs.SUCCEEDED, job.error
    assert events and events[-1].fraction == 1.0
    result = job.result()
    assert set(result.images) == {
        "labels",
        "probability-dark",
        "probability-middle",
        "probability-bright",
        "uncertainty",
    }
    assert [label["name"] for label in result.info["label_info"]] == ["Dark", "Middle", "Bright"]
    from threshold_segmenter import threshold_segment

    expected = threshold_segment(oblique_image).labels
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(result.images["labels"]), sitk.GetArrayFromImage(expected)
    )


def counting(steps: int, release: threading.Event | None = None):
    """Work for a thread job: `steps` progress reports, waiting for `release` before the end."""

    def work(progress, cancel):
        for step in range(steps):
            check_cancel(cancel)
            progress((step + 1) / steps, f"Step {step + 1}")
            if release is not None and step == 0:
                release.wait(30)
        check_cancel(cancel)
        return "counted"

    return work


def test_a_thread_job_reports_progress_and_its_result_like_a_worker_job():
    job = jobs.ThreadJob(counting(4))
    events = run_to_end(job)
    assert job.state == jobs.SUCCEEDED and job.error is None
    assert [event.message for event in events] == ["Step 1", "Step 2", "Step 3", "Step 4"]
    assert job.fraction == 1.0 and job.result() == "counted"


def test_a_thread_job_cancels_at_the_functions_next_check():
    release = threading.Event()
    job = jobs.ThreadJob(counting(4, release))
    while not job.poll():
        time.sleep(0.01)
    job.cancel()
    release.set()
    assert job.wait(30) == jobs.CANCELLED
    with pytest.raises(Cancelled):
        job.result()


def test_a_thread_job_that_fails_gives_its_message():
    def fail(progress, cancel):
        raise DeepMRIError("The server said 404: no such model.")

    job = jobs.ThreadJob(fail)
    assert job.wait(30) == jobs.FAILED
    assert job.error == "The server said 404: no such model."
    with pytest.raises(DeepMRIError, match="404"):
        job.result()


class Shown:
    """The attributes of a Qt progress bar, label and timer that the job runner sets."""

    def __init__(self) -> None:
        self.value, self.text, self.style, self.visible, self.ticking = 0, "", "", False, False

    def show(self) -> None:
        self.visible = True

    def hide(self) -> None:
        self.visible = False

    def setStyleSheet(self, style: str) -> None:
        self.style = style

    def start(self) -> None:
        self.ticking = True

    def stop(self) -> None:
        self.ticking = False


def follow(runner: JobRunner, timer: Shown) -> None:
    deadline = time.monotonic() + 30
    while timer.ticking and time.monotonic() < deadline:
        runner.poll()
        time.sleep(0.01)


def test_the_panels_job_runner_shows_progress_then_hands_over_the_result():
    bar, label, timer, results, changes = Shown(), Shown(), Shown(), [], []
    runner = JobRunner(bar, label, on_change=lambda: changes.append(runner.running), timer=timer)
    runner.start(jobs.ThreadJob(counting(3)), results.append, what="Counting failed")
    assert runner.running and bar.visible and timer.ticking
    follow(runner, timer)
    assert results == ["counted"] and not runner.running
    assert bar.value == 100 and not bar.visible and label.text == "Step 3"
    assert changes == [True, False]  # the panel re-enables Apply once the job ends


def test_the_job_runner_reports_a_cancel_and_an_error_in_the_status_line():
    bar, label, timer, results = Shown(), Shown(), Shown(), []
    runner = JobRunner(bar, label, timer=timer)
    release = threading.Event()
    runner.start(jobs.ThreadJob(counting(3, release)), results.append, what="Counting failed")
    runner.cancel()
    release.set()
    follow(runner, timer)
    assert results == [] and label.text == "Cancelled. Nothing was added to the scene."

    def fail(progress, cancel):
        raise DeepMRIError("No brain was found in the input.")

    runner.start(jobs.ThreadJob(fail), results.append, what="Segmentation failed")
    follow(runner, timer)
    assert results == []
    assert label.text == "Segmentation failed: No brain was found in the input."
    assert label.style == ERROR_STYLE

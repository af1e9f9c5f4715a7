"""Background jobs in a real worker process: progress streaming, prompt cancel, clean errors.

The worker runs real work (slice-wise Gaussian smoothing, a threshold segmenter); no fake sleeps.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import make_oblique_image
from deepmri import worker
from deepmri.errors import Cancelled
from DeepMRILib import jobs

TESTING_DIR = str(Path(__file__).resolve().parent)


def run_to_end(job: jobs.Job) -> list[jobs.ProgressEvent]:
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
    job = jobs.start_job("smooth", {"image": oblique_image}, {"sigma_mm": 1.5, "passes": 2})
    events = run_to_end(job)
    assert job.state == jobs.SUCCEEDED
    depth = oblique_image.GetSize()[2]
    assert len(events) == 2 * depth
    fractions = [event.fraction for event in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert events[0].message == f"Smoothing slice 1/{depth} (pass 1/2)"
    result = job.result()
    smoothed = result.outputs["image"]
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
    while not job.poll():
        assert job.state == jobs.RUNNING
        time.sleep(0.02)
    started = time.monotonic()
    job.cancel(grace_s=2.0)
    print(f"cancel took {time.monotonic() - started:.2f} s")
    assert job.state == jobs.CANCELLED
    # Exited by itself with the cancelled status inside the 2 s grace, not killed.
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
    assert job.error.startswith(f"Could not read '{not_an_image}' as an image")


def test_an_unknown_task_is_refused_with_the_known_names(oblique_image):
    job = jobs.start_job("sharpen", {"image": oblique_image}, {})
    assert job.wait() == jobs.FAILED
    assert job.error == "Unknown task 'sharpen'; known tasks: segment, smooth."


def test_an_unexpected_crash_is_reported_with_the_last_error_line(oblique_image):
    # json.loads cannot take an image: a programming error, not a DeepMRIError.
    job = jobs.start_job("segment", {"image": oblique_image}, {"function": "json:loads"})
    assert job.wait() == jobs.FAILED
    assert job.error.startswith("The background process stopped unexpectedly (exit status 1): ")
    assert "TypeError" in job.error


def test_segment_task_returns_labels_probabilities_and_label_info(oblique_image):
    job = jobs.start_job(
        "segment",
        {"image": oblique_image},
        {
            "function": "threshold_segmenter:threshold_segment",
            "model": "threshold",
            "probabilities": True,
            "uncertainty": True,
        },
        environment={"PYTHONPATH": TESTING_DIR},
    )
    events = run_to_end(job)
    assert job.state == jobs.SUCCEEDED, job.error
    assert events and events[-1].fraction == 1.0
    result = job.result()
    assert set(result.outputs) == {
        "labels",
        "probability_1",
        "probability_2",
        "probability_3",
        "uncertainty",
    }
    assert result.info["probability_names"]["probability_2"] == "Middle"
    assert [label["name"] for label in result.info["label_info"]] == ["Dark", "Middle", "Bright"]
    from threshold_segmenter import threshold_segment

    expected = threshold_segment(oblique_image).labels
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(result.outputs["labels"]), sitk.GetArrayFromImage(expected)
    )

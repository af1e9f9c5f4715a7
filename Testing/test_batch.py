"""Batch over a cohort: a corrupt case fails alone, finished cases are not redone, shards cover all.

Cases are real MRI from packages (nibabel's small head, MNI152 at 4 mm); the fast task is the
classical brain mask (task segment-classical), and one case also goes through the learned segment
task when its models exist. Tasks written here are registered in the test only.
"""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import SimpleITK as sitk
from deepmri import Cancelled, CancelToken
from deepmri.batch import (
    DONE_MARKER,
    FAILED_MARKER,
    Case,
    CaseListError,
    format_summary,
    is_done,
    read_cases,
    run_batch,
    select_cases,
)
from deepmri.cli import main
from deepmri.geometry import resample_to_spacing, same_geometry
from deepmri.io import write_image
from deepmri.tasks import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    Task,
    TaskResult,
    available_tasks,
    register_task,
    unregister_task,
)

TASK = "segment-classical"


def _nibabel_head() -> Path:
    nibabel = pytest.importorskip("nibabel")
    return Path(nibabel.__file__).parent / "tests" / "data" / "anatomical.nii"


@pytest.fixture
def cohort(tmp_path, mni_t1) -> Path:
    """Three cases: two real scans and one corrupt file, listed with a relative path."""
    write_image(resample_to_spacing(mni_t1, [4.0, 4.0, 4.0]), tmp_path / "scans" / "mni.nii.gz")
    (tmp_path / "scans" / "broken.nii.gz").write_bytes(b"\x1f\x8b this is not a NIfTI file")
    rows = [
        ("head-01", str(_nibabel_head())),
        ("broken-02", "scans/broken.nii.gz"),
        ("mni-03", "scans/mni.nii.gz"),
    ]
    path = tmp_path / "cases.csv"
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["id", "input"])
        writer.writerows(rows)
    return path


def _summary(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as handle:
        return {row["id"]: row for row in csv.DictReader(handle)}


def test_corrupt_case_fails_alone_and_rerun_does_not_redo_finished_cases(cohort, tmp_path, capsys):
    output = tmp_path / "out"
    status = main(["batch", str(cohort), "--task", TASK, "-o", str(output)])
    captured = capsys.readouterr()
    assert status == 1  # a case failed, the others finished
    summary = _summary(output / "summary.csv")
    assert {case: row["status"] for case, row in summary.items()} == {
        "head-01": "done",
        "broken-02": "failed",
        "mni-03": "done",
    }
    assert "broken.nii.gz" in summary["broken-02"]["message"]
    assert "FAILED broken-02" in captured.err and "case 3/3" in captured.err
    assert "2 done, 1 failed, 0 pending" in captured.out
    # The mask lies on the input grid and holds a plausible brain volume (MNI brain ~1.5-1.9 L).
    labels = sitk.ReadImage(str(output / "mni-03" / "labels.nii.gz"))
    mni = sitk.ReadImage(str(tmp_path / "scans" / "mni.nii.gz"))
    assert same_geometry(labels, mni, tolerance=1e-5)
    assert 1000 < float(summary["mni-03"]["Brain (mL)"]) < 2200
    assert "FAILED" in (output / "broken-02" / "log.txt").read_text()

    finished = {
        case: (output / case / DONE_MARKER).stat().st_mtime_ns for case in ("head-01", "mni-03")
    }
    status = main(["batch", str(cohort), "--task", TASK, "-o", str(output)])
    assert status == 1
    assert "already done, skipped" in capsys.readouterr().err
    for case, stamp in finished.items():
        assert (output / case / DONE_MARKER).stat().st_mtime_ns == stamp

    # Repairing the broken scan and running again finishes the cohort.
    write_image(mni, tmp_path / "scans" / "broken.nii.gz")
    assert main(["batch", str(cohort), "--task", TASK, "-o", str(output)]) == 0
    summary = _summary(output / "summary.csv")
    assert all(row["status"] == "done" for row in summary.values())
    assert not (output / "broken-02" / FAILED_MARKER).exists()
    for case, stamp in finished.items():
        assert (output / case / DONE_MARKER).stat().st_mtime_ns == stamp


def test_interrupted_batch_leaves_no_partial_output_and_resumes(cohort, tmp_path):
    cases = read_cases(cohort)
    cases = [case for case in cases if case.id != "broken-02"]
    output = tmp_path / "out"
    token = CancelToken()

    def cancel_during_second_case(fraction: float, message: str) -> None:
        if message.startswith("case 2/2"):
            token.cancel()

    with pytest.raises(Cancelled):
        run_batch(cases, TASK, output, progress=cancel_during_second_case, cancel=token)
    assert is_done(output, cases[0], TASK)
    second = output / cases[1].id
    assert not is_done(output, cases[1], TASK)
    assert [p.name for p in second.iterdir()] == ["log.txt"]  # no output, no partial file
    assert _summary(output / "summary.csv")[cases[1].id]["status"] == "pending"

    report = run_batch(cases, TASK, output)
    assert [result.status for result in report.results] == ["skipped", "done"]


def test_shards_and_case_index_cover_every_case_exactly_once():
    cases = [Case(f"c{i}", {"image": Path(f"{i}.nii.gz")}, index=i) for i in range(7)]
    shards = [select_cases(cases, shard=f"{i}/3") for i in range(3)]
    assert sorted(case.id for shard in shards for case in shard) == sorted(c.id for c in cases)
    assert [case.id for case in shards[1]] == ["c1", "c4"]
    assert select_cases(cases, case_index=5) == [cases[5]]
    with pytest.raises(CaseListError, match="outside the case list"):
        select_cases(cases, case_index=7)
    with pytest.raises(CaseListError, match="i/n"):
        select_cases(cases, shard="3/3")


def test_shards_run_separately_share_one_complete_summary(cohort, tmp_path):
    output = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        main(["batch", str(cohort), "--task", TASK, "-o", str(output), "--shard", shard])
    summary = _summary(output / "summary.csv")
    assert sorted(summary) == ["broken-02", "head-01", "mni-03"]
    assert [summary[c]["status"] for c in ("head-01", "broken-02", "mni-03")] == [
        "done",
        "failed",
        "done",
    ]


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("name,input\na,b.nii\n", "no column id"),
        ("id,input\na,x.nii\na,y.nii\n", "appears twice"),
        ("id,input\n../up,x.nii\n", "names the output folder"),
        ("id,input\na,\n", "has no input"),
    ],
)
def test_malformed_case_list_is_rejected_with_the_line_at_fault(tmp_path, text, complaint):
    path = tmp_path / "cases.csv"
    path.write_text(text)
    with pytest.raises(CaseListError, match=complaint):
        read_cases(path)


class RecordModel(Task):
    """Copies its input and records the `model` option it was given."""

    name = "record-model"
    inputs = (InputSpec("image", Kind.VOLUME, "a volume"),)
    options = (OptionSpec("model", str, "builtin", "a model id"),)
    outputs = (OutputSpec("copy", Kind.VOLUME, "the input"),)
    seen: dict[str, str] = {}

    def run(self, inputs, options, context):
        self.seen[str(inputs["image"].GetSize())] = options["model"]
        return TaskResult(
            self.name,
            images={"copy": inputs["image"]},
            measures={"model seen": options["model"]},
            info={"model_id": options["model"]},
        )


@pytest.fixture
def record_model():
    task = register_task(RecordModel, replace=True)
    task.seen.clear()
    yield task
    unregister_task(task.name)


def test_model_column_overrides_the_batch_option_and_reaches_the_task(
    tmp_path, mni_t1, record_model
):
    assert "record-model" in available_tasks() and "segment" in available_tasks()
    write_image(resample_to_spacing(mni_t1, [6.0, 6.0, 6.0]), tmp_path / "a.nii.gz")
    write_image(resample_to_spacing(mni_t1, [8.0, 8.0, 8.0]), tmp_path / "b.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input,model\na,a.nii.gz,special\nb,b.nii.gz,\n")
    cases = read_cases(tmp_path / "cases.csv", "record-model")
    report = run_batch(cases, "record-model", tmp_path / "o", options={"model": "fallback"})
    assert sorted(record_model.seen.values()) == ["fallback", "special"]
    assert [row["model seen"] for row in report.summary_rows] == ["special", "fallback"]
    assert [row["model"] for row in report.summary_rows] == ["special", "fallback"]
    marker = json.loads((tmp_path / "o" / "a" / DONE_MARKER).read_text())
    assert marker["outputs"] == ["copy.nii.gz", "result.json"]
    assert marker["options"] == {"model": "special"}
    # Another batch option is another result: the case is not taken as done.
    assert not is_done(tmp_path / "o", cases[1], "record-model", {"model": "other"})
    assert is_done(tmp_path / "o", cases[1], "record-model", {"model": "fallback"})


def _segment_model_available() -> bool:
    try:
        from deepmri.models import ModelStore

        ModelStore().get("brain-extraction")
    except Exception:  # noqa: BLE001 - any failure means the bundled model is not there yet
        return False
    return True


_SLOW_TASK_SCRIPT = """
import sys, time
from deepmri.cli import main
from deepmri.tasks import InputSpec, Kind, OutputSpec, Task, TaskResult, register_task

class Sleepy(Task):
    name = "sleepy"
    inputs = (InputSpec("image", Kind.VOLUME, "a volume"),)
    outputs = (OutputSpec("copy", Kind.VOLUME, "the input"),)

    def run(self, inputs, options, context):
        image = inputs["image"]
        if image.GetSpacing()[0] > 7:  # the coarse case stands for a long one
            for step in range(1200):
                context.progress(step / 1200, "working")
                time.sleep(0.05)
        return TaskResult(self.name, images={"copy": image})

register_task(Sleepy)
sys.exit(main(sys.argv[1:]))
"""


def test_sigterm_from_a_scheduler_stops_cleanly_and_the_rerun_resumes(tmp_path, mni_t1):
    write_image(resample_to_spacing(mni_t1, [6.0, 6.0, 6.0]), tmp_path / "fast.nii.gz")
    write_image(resample_to_spacing(mni_t1, [8.0, 8.0, 8.0]), tmp_path / "slow.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input\nfast,fast.nii.gz\nslow,slow.nii.gz\n")
    (tmp_path / "run.py").write_text(_SLOW_TASK_SCRIPT)
    output = tmp_path / "out"
    command = [sys.executable, str(tmp_path / "run.py"), "batch", str(tmp_path / "cases.csv")]
    process = subprocess.Popen(
        [*command, "--task", "sleepy", "-o", str(output)],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    log = output / "slow" / "log.txt"
    deadline = time.monotonic() + 120
    while not (log.exists() and "working" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "Run the same command again to resume" in stderr
    assert (output / "fast" / DONE_MARKER).exists()
    assert sorted(p.name for p in (output / "slow").iterdir()) == ["log.txt"]
    assert "cancelled" in log.read_text()
    summary = _summary(output / "summary.csv")
    assert (summary["fast"]["status"], summary["slow"]["status"]) == ("done", "pending")


def test_long_summaries_list_only_the_cases_that_need_attention():
    rows = [{"id": f"c{i}", "status": "done", "seconds": 1, "model": "m"} for i in range(50)]
    rows[7]["status"] = "failed"
    text = format_summary(rows)
    assert "c7" in text and "c8 " not in text
    assert "49 done cases not listed" in text and text.endswith("49 done, 1 failed, 0 pending\n")
    assert "c49" in format_summary(rows, max_rows=100)


def test_one_case_through_the_real_segment_task_with_a_model_from_an_extra_folder(
    tmp_path, mni_t1, monkeypatch
):
    """The real segment task, engine and model store; the network is small and untrained."""
    torch = pytest.importorskip("torch")
    from deepmri.models import example_card, save_model
    from deepmri.nets import build_network

    torch.manual_seed(0)
    card = example_card(id="batch-test-net")
    network = build_network(card["architecture"]["name"], card["architecture"]["config"])
    model = save_model(network, card, tmp_path / "models" / "batch-test-net", dtype="float32")
    monkeypatch.setenv("DEEPMRI_MODEL_PATH", str(tmp_path / "models"))
    scan = write_image(resample_to_spacing(mni_t1, [4.0, 4.0, 4.0]), tmp_path / "mni.nii.gz")
    (tmp_path / "cases.csv").write_text("id,input,model\nmni,mni.nii.gz,batch-test-net\n")
    output = tmp_path / "out"
    command = ["batch", str(tmp_path / "cases.csv"), "-o", str(output), "--device", "cpu"]
    assert main([*command, "--probabilities"]) == 0
    row = _summary(output / "summary.csv")["mni"]
    assert (row["status"], row["model"]) == ("done", "batch-test-net")
    assert float(row["Foreground (mL)"]) >= 0.0
    input_image = sitk.ReadImage(str(scan))
    for name in ("labels.nii.gz", "probability-foreground.nii.gz"):
        written = sitk.ReadImage(str(output / "mni" / name))
        assert same_geometry(written, input_image, tolerance=1e-5), name
    probability = sitk.GetArrayFromImage(
        sitk.ReadImage(str(output / "mni" / "probability-foreground.nii.gz"))
    )
    assert 0.0 <= probability.min() and probability.max() <= 1.0
    marker = json.loads((output / "mni" / DONE_MARKER).read_text())
    assert marker["provenance"]["models"][0]["sha256"] == model.card.weights["sha256"]


def test_batch_progress_only_moves_forward(cohort, tmp_path):
    fractions: list[float] = []
    run_batch(read_cases(cohort), TASK, tmp_path / "out", progress=lambda f, m: fractions.append(f))
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_a_csf_border_column_sets_the_border_per_case_and_an_empty_cell_keeps_the_cards(
    tmp_path, mni_t1
):
    if not _segment_model_available():
        pytest.skip("the bundled brain-extraction model is not installed yet")
    write_image(resample_to_spacing(mni_t1, [2.0, 2.0, 2.0]), tmp_path / "mni.nii.gz")
    (tmp_path / "cases.csv").write_text(
        "id,input,model,csf_border_mm\nnone,mni.nii.gz,brain-extraction,0\n"
        "card,mni.nii.gz,brain-extraction,\n"
    )
    output = tmp_path / "out"
    assert main(["batch", str(tmp_path / "cases.csv"), "-o", str(output), "--device", "cpu"]) == 0
    masks = {
        case: sitk.GetArrayFromImage(sitk.ReadImage(str(output / case / "labels.nii.gz"))) > 0
        for case in ("none", "card")
    }
    # No CSF outside the brain is a subset of the card's default mask, and a smaller one
    # (measured on this MNI brain at 2 mm: 0.91 of its volume).
    assert not (masks["none"] & ~masks["card"]).any()
    assert masks["none"].sum() < 0.95 * masks["card"].sum()
    options = {
        case: json.loads((output / case / DONE_MARKER).read_text())["options"]
        for case in ("none", "card")
    }
    assert float(options["none"]["csf_border_mm"]) == 0.0
    assert options["card"].get("csf_border_mm") in (None, "")
    # The learned task as any case runs: summary row, labels on the input grid, a plausible brain.
    summary = _summary(output / "summary.csv")
    assert summary["card"]["status"] == "done" and summary["card"]["model"] == "brain-extraction"
    labels = sitk.ReadImage(str(output / "card" / "labels.nii.gz"))
    assert same_geometry(labels, sitk.ReadImage(str(tmp_path / "mni.nii.gz")), tolerance=1e-5)
    assert 1000 < float(masks["card"].sum()) * 8 / 1000 < 2200  # mL at 2 mm

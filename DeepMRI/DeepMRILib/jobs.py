"""Background jobs: one `Job` protocol, backed by a worker process (tasks) or a thread (downloads).

Slicer's GUI stays responsive: the widget polls `job.poll()` from a timer, shows its progress events
and calls `job.cancel()` from its Cancel button, whatever runs behind it. No Qt here.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import SimpleITK as sitk
from deepmri.errors import Cancelled, DeepMRIError
from deepmri.io import write_image, write_json
from deepmri.progress import CancelToken, ProgressCallback
from deepmri.runconfig import RunConfig
from deepmri.tasks.base import TaskResult

RUNNING, SUCCEEDED, FAILED, CANCELLED = "running", "succeeded", "failed", "cancelled"
DEFAULT_CANCEL_GRACE_S = 2.0
OUTPUT_FOLDER = "outputs"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


class JobError(DeepMRIError):
    """The background work failed; the message is its own (no traceback)."""


@dataclass(frozen=True)
class ProgressEvent:
    """One progress report: a fraction in [0, 1] and what the job is doing."""

    fraction: float
    message: str


class Job(Protocol):
    """What a widget needs of any background work: poll, state, cancel, result."""

    fraction: float
    message: str

    @property
    def state(self) -> str: ...  # running, succeeded, failed or cancelled

    @property
    def done(self) -> bool: ...

    @property
    def error(self) -> str | None: ...

    def poll(self) -> list[ProgressEvent]: ...

    def cancel(self) -> None: ...

    def result(self) -> Any: ...


class _Reports:
    """Progress kept for `poll()`: the latest fraction and message, and the events not yet read."""

    def __init__(self) -> None:
        self.fraction = 0.0
        self.message = "Starting"
        self._unread: list[ProgressEvent] = []

    def _report(self, fraction: float, message: str) -> None:
        self.fraction, self.message = float(fraction), str(message)
        self._unread.append(ProgressEvent(self.fraction, self.message))

    def _take_unread(self) -> list[ProgressEvent]:
        events, self._unread = self._unread, []
        return events


def worker_python() -> str:
    """The Python that runs workers: Slicer's PythonSlicer inside Slicer, else this interpreter.

    Inside Slicer `sys.executable` can be the application itself, which would open a second
    Slicer; PythonSlicer is Slicer's own Python with the same packages.
    """
    if "slicer" in sys.modules and hasattr(sys.modules["slicer"], "app"):
        # The launcher puts Slicer's bin folder on PATH; else look next to the application.
        python_slicer = shutil.which("PythonSlicer") or shutil.which(
            "PythonSlicer", path=str(Path(sys.executable).parent)
        )
        if python_slicer:
            return python_slicer
    return sys.executable


def _worker_environment(extra: Mapping[str, str] | None) -> dict[str, str]:
    """Environment for the child: `deepmri`'s folder first on its path, unbuffered output.

    A PYTHONPATH in `extra` is added to the path (not substituted), so plug-in tasks named in
    a request can be imported next to `deepmri`.
    """
    import deepmri

    extra = dict(extra or {})
    package_parent = str(Path(deepmri.__file__).resolve().parent.parent)
    environment = dict(os.environ)
    paths = [package_parent]
    for value in (extra.pop("PYTHONPATH", ""), environment.get("PYTHONPATH", "")):
        paths.extend(part for part in value.split(os.pathsep) if part)
    environment["PYTHONPATH"] = os.pathsep.join(dict.fromkeys(paths))
    environment["PYTHONUNBUFFERED"] = "1"
    environment.update(extra)
    return environment


class WorkerJob(_Reports):
    """A task running in a worker process (`python -m deepmri.worker request.json`).

    `result()` is the worker's `TaskResult`, read back from its files, or what `then` makes of
    it (the Slicer logic adds nodes there, in the GUI thread).

    Examples:
        >>> job = start_job("segment", {"image": image}, {"model": "tissue"})  # doctest: +SKIP
        >>> while not job.done:  # doctest: +SKIP
        ...     for event in job.poll():
        ...         print(f"{event.fraction:.0%} {event.message}")
        >>> labels = job.result().images["labels"]  # doctest: +SKIP
    """

    def __init__(
        self,
        task: str,
        process: subprocess.Popen,
        folder: Path,
        then: Callable[[TaskResult], Any] | None = None,
    ) -> None:
        super().__init__()
        self.task = task
        self.folder = folder
        self._process = process
        self._then = then
        self._events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self._final: dict[str, Any] | None = None
        self._state = RUNNING
        self._cancel_requested = False
        self._result: Any = None
        self._has_result = False
        self._output_lines: list[str] = []
        self._reader = threading.Thread(target=self._read_stdout, daemon=True)
        self._reader.start()

    # The reader thread only moves lines into a queue; state changes happen in _drain().
    def _read_stdout(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            line = line.strip()
            if not line:
                continue
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if not isinstance(event, dict):
                event = {"event": "log", "message": line}
            self._events.put(event)
        self._events.put(None)

    @property
    def state(self) -> str:
        """running, succeeded, failed or cancelled (up to date as of the last poll)."""
        return self._state

    @property
    def done(self) -> bool:
        """True once the worker has ended and all its events have been read (none are lost)."""
        self._drain()
        return self._state != RUNNING

    @property
    def error(self) -> str | None:
        """The worker's error message when the job failed, else None."""
        if self._state == FAILED and self._final is not None:
            return str(self._final.get("message"))
        return None

    @property
    def log(self) -> list[str]:
        """Lines the worker printed that were not events (warnings from libraries, for example)."""
        return list(self._output_lines)

    def poll(self) -> list[ProgressEvent]:
        """Progress events not yet returned by an earlier call; never blocks."""
        self._drain()
        return self._take_unread()

    def _drain(self) -> None:
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if event is None:
                self._finish()
                return
            kind = event.get("event")
            if kind == "progress":
                self._report(event.get("fraction", 0.0), event.get("message", ""))
            elif kind in ("result", "error", "cancelled"):
                self._final = event
            else:
                self._output_lines.append(str(event.get("message", "")))

    def _finish(self) -> None:
        """The worker's stdout closed: settle the state from its last event and exit status."""
        return_code = self._process.wait()
        final = self._final or {}
        if self._cancel_requested or final.get("event") == "cancelled":
            self._state = CANCELLED
            self.message = "Cancelled"
            self._remove_folder()
        elif final.get("event") == "result" and return_code == 0:
            self._state = SUCCEEDED
            self.fraction, self.message = 1.0, "Finished"
        else:
            if final.get("event") != "error":
                self._final = {"event": "error", "message": self._crash_message(return_code)}
            self._state = FAILED
            self.message = str(self._final["message"])
            self._remove_folder()

    def _crash_message(self, return_code: int) -> str:
        stderr_tail = ""
        stderr_path = self.folder / "stderr.txt"
        if stderr_path.exists():
            lines = [line for line in stderr_path.read_text(errors="replace").splitlines() if line]
            # The exception line of a traceback ("ValueError: ..."), else the last line written.
            exception_lines = [line for line in lines if _EXCEPTION_LINE.match(line)]
            stderr_tail = (exception_lines or lines or [""])[-1]
        detail = f": {stderr_tail}" if stderr_tail else ""
        return f"The background process stopped unexpectedly (exit status {return_code}){detail}"

    def wait(self, timeout: float | None = None) -> str:
        """Block until the worker ends (or `timeout` seconds pass); returns the state."""
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._drain()
            return self._state
        self._reader.join(timeout)
        self._drain()
        return self._state

    def cancel(self, grace_s: float = DEFAULT_CANCEL_GRACE_S) -> None:
        """Stop the worker: ask politely (SIGTERM -> cancel token), kill after `grace_s` seconds.

        Partial outputs are deleted with the job's temporary folder.
        """
        if self._state != RUNNING:
            return
        self._cancel_requested = True
        if self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(grace_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._reader.join()
        self._drain()

    def result(self) -> Any:
        """The task's result (through `then`, if given); the temporary folder is then deleted.

        Waits for the worker. Raises `JobError` with the worker's message if it failed,
        `Cancelled` if it was cancelled.
        """
        if self._has_result:
            return self._result
        state = self.wait()
        if state == CANCELLED:
            raise Cancelled("The job was cancelled; nothing was written.")
        if state == FAILED:
            raise JobError(self.error or "The background job failed.")
        try:
            task_result = TaskResult.read(self.folder / OUTPUT_FOLDER)
        finally:
            self._remove_folder()
        self._result = self._then(task_result) if self._then else task_result
        self._has_result = True
        return self._result

    def _remove_folder(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __del__(self) -> None:
        # A forgotten job must not keep a process running or leave files behind.
        process = getattr(self, "_process", None)
        if process is not None and process.poll() is None:
            process.kill()
        folder = getattr(self, "folder", None)
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)


def start_job(
    task: str,
    inputs: Mapping[str, sitk.Image | sitk.Transform | str | os.PathLike],
    options: Mapping[str, Any] | None = None,
    *,
    config: RunConfig | None = None,
    wanted: Iterable[str] = (),
    then: Callable[[TaskResult], Any] | None = None,
    python: str | None = None,
    environment: Mapping[str, str] | None = None,
    temporary_root: str | os.PathLike | None = None,
) -> WorkerJob:
    """Start a registered task in a worker process and return its `WorkerJob` at once.

    Images and transforms in `inputs` are written to the job's temporary folder (NRRD and HDF5,
    geometry intact); paths are passed as they are. `options` must be JSON-serialisable;
    `config` (device, precision, threads) travels in the request, `wanted` names the optional
    outputs to make.
    """
    from deepmri.io import write_transform

    folder = Path(tempfile.mkdtemp(prefix=f"deepmri-{task}-", dir=temporary_root))
    try:
        input_paths = {}
        for name, value in inputs.items():
            if isinstance(value, sitk.Image):
                path = write_image(value, folder / f"input_{name}.nrrd", False)
            elif isinstance(value, sitk.Transform):
                path = write_transform(value, folder / f"input_{name}.h5")
            else:
                path = Path(value).resolve()
            input_paths[name] = str(path)
        request = {
            "task": task,
            "inputs": input_paths,
            "options": dict(options or {}),
            "config": (config or RunConfig()).to_dict(),
            "wanted": sorted(wanted),
            "output_dir": str(folder / OUTPUT_FOLDER),
        }
        request_path = write_json(request, folder / "request.json")
        with open(folder / "stderr.txt", "wb") as stderr:
            process = subprocess.Popen(
                [python or worker_python(), "-m", "deepmri.worker", str(request_path)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                stdin=subprocess.DEVNULL,
                text=True,
                env=_worker_environment(environment),
                creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
            )
    except Exception:
        shutil.rmtree(folder, ignore_errors=True)
        raise
    return WorkerJob(task, process, folder, then)


class ThreadJob(_Reports):
    """Runs `function(progress, cancel)` in a thread: I/O-bound work such as a download.

    The GUI thread polls it like a `WorkerJob`; `cancel()` sets the token the function checks
    and returns at once (the function raises `deepmri.Cancelled` at its next check).

    Examples:
        >>> job = ThreadJob(lambda progress, cancel: fetch_model(url, cache, progress=progress,
        ...     cancel=cancel))  # doctest: +SKIP
    """

    def __init__(self, function: Callable[[ProgressCallback, CancelToken], Any]) -> None:
        super().__init__()
        self._events: queue.Queue[tuple[float, str]] = queue.Queue()
        self._token = CancelToken()
        self._value: Any = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._thread.start()

    def _run(self, function: Callable[[ProgressCallback, CancelToken], Any]) -> None:
        try:
            self._value = function(
                lambda fraction, message: self._events.put((fraction, message)), self._token
            )
        except BaseException as failure:  # handed to the GUI thread, which reports it
            self._failure = failure

    @property
    def state(self) -> str:
        if self._thread.is_alive():
            return RUNNING
        if isinstance(self._failure, Cancelled):
            return CANCELLED
        return FAILED if self._failure is not None else SUCCEEDED

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    @property
    def error(self) -> str | None:
        return str(self._failure) if self.state == FAILED else None

    def poll(self) -> list[ProgressEvent]:
        while True:
            try:
                self._report(*self._events.get_nowait())
            except queue.Empty:
                return self._take_unread()

    def wait(self, timeout: float | None = None) -> str:
        self._thread.join(timeout)
        return self.state

    def cancel(self) -> None:
        self._token.cancel()

    def result(self) -> Any:
        """The function's return value (waits for it); re-raises what it raised."""
        self._thread.join()
        if self._failure is not None:
            raise self._failure
        return self._value

"""The task registry: every capability (segment, register, ...) under one name, for every front door.

Built-in tasks are named here by module and imported on first use, so listing tasks or building the
CLI imports no networks. `register_task` adds one more (a plug-in, or a test's own task).

Examples:
    >>> "segment" in available_tasks()
    True
"""

from __future__ import annotations

import importlib

from deepmri.tasks.base import (
    InputSpec,
    Kind,
    OptionSpec,
    OutputSpec,
    RunContext,
    Task,
    TaskError,
    TaskResult,
)

# name -> "module:attribute" of a Task subclass or instance; imported on first use.
BUILTIN_TASKS: dict[str, str] = {
    "segment": "deepmri.tasks.segment:SegmentTask",
    "segment-classical": "deepmri.tasks.segment_classical:ClassicalSegmentTask",
    "register": "deepmri.tasks.register:RegisterTask",
    "superresolve": "deepmri.tasks.superresolve:SuperResolveTask",
    "smooth": "deepmri.tasks.smooth:SmoothTask",
    "synthesize": "deepmri.tasks.synthesize:SynthesizeTask",
}

_registered: dict[str, Task] = {}


def register_task(task: Task | type[Task], *, replace: bool = False) -> Task:
    """Make `task` available to the CLI, batch, the worker and the Slicer logic by its name."""
    instance = task() if isinstance(task, type) else task
    if not instance.name:
        raise TaskError(f"{type(instance).__name__} has no name.")
    if not replace and (instance.name in _registered or instance.name in BUILTIN_TASKS):
        if _registered.get(instance.name) is not instance:
            raise TaskError(f"A task named '{instance.name}' is already registered.")
    _registered[instance.name] = instance
    return instance


def unregister_task(name: str) -> None:
    """Remove a task registered at run time (tests clean up with this)."""
    _registered.pop(name, None)


def available_tasks() -> list[str]:
    return sorted(set(BUILTIN_TASKS) | set(_registered))


def get_task(name: str) -> Task:
    """The task registered under `name`; a `TaskError` listing the known names otherwise.

    `name` may also be an import path "package.module:Class" of a task that is not registered
    in this process (a plug-in, or a test's own task run by the background worker): it is
    imported and registered under its own name.
    """
    if name in _registered:
        return _registered[name]
    if name in BUILTIN_TASKS:
        return register_task(_load(BUILTIN_TASKS[name]), replace=True)
    if ":" in name:
        return register_task(_load(name), replace=True)
    raise TaskError(f"Unknown task '{name}'; known tasks: {', '.join(available_tasks())}.")


def task_reference(task: Task) -> str:
    """The "module:Class" path `get_task` imports `task` by in another process."""
    cls = type(task)
    return f"{cls.__module__}:{cls.__qualname__}"


def _load(reference: str) -> Task | type[Task]:
    module_name, _, attribute = reference.partition(":")
    try:
        loaded = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise TaskError(f"Cannot load the task '{reference}': {error}") from error
    if not (isinstance(loaded, Task) or (isinstance(loaded, type) and issubclass(loaded, Task))):
        raise TaskError(f"'{reference}' is not a deepmri Task.")
    return loaded


__all__ = [
    "BUILTIN_TASKS",
    "InputSpec",
    "Kind",
    "OptionSpec",
    "OutputSpec",
    "RunContext",
    "Task",
    "TaskError",
    "TaskResult",
    "available_tasks",
    "get_task",
    "register_task",
    "task_reference",
    "unregister_task",
]

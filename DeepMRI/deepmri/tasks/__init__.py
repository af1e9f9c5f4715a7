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
    """The task registered under `name`; a `TaskError` listing the known names otherwise."""
    if name in _registered:
        return _registered[name]
    if name not in BUILTIN_TASKS:
        raise TaskError(f"Unknown task '{name}'; known tasks: {', '.join(available_tasks())}.")
    module_name, _, attribute = BUILTIN_TASKS[name].partition(":")
    task = getattr(importlib.import_module(module_name), attribute)
    return register_task(task, replace=True)


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
    "unregister_task",
]

"""One sub-command per registered task, built from its declaration: `deepmri segment IMAGE -o OUT`.

Each input is a positional argument (an optional input is `--name FILE`), each option a flag with
its type, default, choices and help (booleans as `--x/--no-x`), plus `--device`, `--precision`,
`--threads` and `-o/--output`: a file for the first output when it ends like one (`.nii.gz`,
`.h5`, ...), else a folder that receives the whole result. An optional output is made when its
flag is given, `--name [PATH]` (a folder for a family of outputs such as `--probability DIR`;
`--probabilities` works too). Bad paths, options and devices are refused before any work.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepmri.errors import ImageIOError

# Flags every task sub-command has; a task may not declare an option or output of these names.
GENERIC_FLAGS = ("device", "precision", "threads", "output")


def register(subparsers: argparse._SubParsersAction) -> None:
    from deepmri.tasks import available_tasks

    for name in available_tasks():
        if name in subparsers.choices:
            continue  # a command of its own (models, batch, ...) keeps its name
        task = _load_or_skip(name)
        if task is not None:
            add_task_command(subparsers, task)


def _load_or_skip(name: str) -> Any:
    """The task, or None where its built-in module is not there yet (a feature being written)."""
    from deepmri.tasks import BUILTIN_TASKS, TaskError, get_task

    try:
        return get_task(name)
    except TaskError as error:
        cause = error.__cause__
        module = BUILTIN_TASKS.get(name, "").partition(":")[0]
        if isinstance(cause, ModuleNotFoundError) and cause.name == module:
            return None
        raise


def declared_flags(task: Any) -> list[str]:
    """Every command-line flag the declaration asks for, in order (duplicates included)."""
    flags = [f"--{_flag(spec.name)}" for spec in task.inputs if spec.optional]
    for spec in task.options:
        flags.append(f"--{_flag(spec.name)}")
        if spec.type is bool:
            flags.append(f"--no-{_flag(spec.name)}")
    for spec in task.outputs:
        if spec.optional:
            flags.append(f"--{_flag(spec.name)}")
            if spec.many:
                flags.append(f"--{_plural(_flag(spec.name))}")
    return flags + [f"--{name}" for name in GENERIC_FLAGS] + ["-o"]


def add_task_command(subparsers: argparse._SubParsersAction, task: Any) -> argparse.ArgumentParser:
    """Add `deepmri <task.name>` with arguments built from the task's declaration.

    A declaration whose names collide (an option and an optional output both called
    "uncertainty", say) gets a sub-command that says so when used, so one task's mistake never
    breaks the other commands.
    """
    from deepmri.runconfig import PRECISIONS
    from deepmri.tasks import TaskError

    flags = declared_flags(task)
    clashes = sorted({flag for flag in flags if flags.count(flag) > 1})
    if clashes:
        parser = subparsers.add_parser(task.name, help=f"{task.help} (unusable: see its --help)")
        parser.add_argument("ignored", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        message = (
            f"Task '{task.name}' cannot run from the command line: its declaration uses "
            f"{', '.join(clashes)} for more than one input, option or output (or a flag the CLI "
            "owns). Rename one in the task's declaration."
        )

        def refuse(arguments: argparse.Namespace) -> int:
            raise TaskError(message)

        parser.set_defaults(handler=refuse)
        parser.description = message
        return parser

    outputs = ", ".join(
        f"{spec.name}{' (optional)' if spec.optional else ''}: {spec.help}" for spec in task.outputs
    )
    parser = subparsers.add_parser(
        task.name,
        help=task.help,
        description=f"{task.help}. Outputs: {outputs}.",
    )
    for spec in task.inputs:
        if spec.optional:
            parser.add_argument(
                f"--{_flag(spec.name)}",
                dest=f"input_{spec.name}",
                type=Path,
                default=None,
                metavar="FILE",
                help=spec.help,
            )
        else:
            parser.add_argument(f"input_{spec.name}", type=Path, metavar=spec.name, help=spec.help)
    for spec in task.options:
        keywords: dict[str, Any] = {"dest": f"option_{spec.name}", "default": spec.default}
        if spec.type is bool:
            keywords["action"] = argparse.BooleanOptionalAction
        else:
            keywords.update(type=spec.type, metavar=spec.name.upper())
            if spec.count > 1:
                keywords["nargs"] = spec.count
            if spec.choices is not None:
                keywords.update(choices=spec.choices, metavar=None)
        shown = "" if "default" in spec.help else f" (default: {_shown(spec.default)})"
        parser.add_argument(f"--{_flag(spec.name)}", help=spec.help + shown, **keywords)
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        required=True,
        help="file for the first output, or a folder for the whole result",
    )
    for spec in task.outputs:
        if not spec.optional:
            continue
        flags = [f"--{_flag(spec.name)}"] + (
            [f"--{_plural(_flag(spec.name))}"] if spec.many else []
        )
        where = " (into DIR)" if spec.many else ""
        parser.add_argument(
            *flags,
            dest=f"want_{spec.name}",
            nargs="?",
            const="",
            default=None,
            metavar="DIR" if spec.many else "PATH",
            help=f"also write {spec.help}{where}; without a path, beside the output",
        )
    parser.add_argument(
        "--device",
        default=None,
        help="auto, cpu, cuda (or gpu), cuda:N or mps (default: DEEPMRI_DEVICE or auto)",
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="GPU arithmetic (default: DEEPMRI_PRECISION or auto)",
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch")
    parser.set_defaults(handler=lambda arguments: run_task(task, arguments))
    return parser


def _flag(name: str) -> str:
    return name.replace("_", "-")


def _plural(name: str) -> str:
    return name[:-1] + "ies" if name.endswith("y") else name + "s"


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "yes" if default else "no"
    if isinstance(default, tuple):
        return " ".join(map(str, default))
    return str(default)


def run_task(task: Any, arguments: argparse.Namespace) -> int:
    """Check everything (device, options, output paths), read the inputs, run, write, summarise."""
    from deepmri.cli.progress_bar import TextProgress
    from deepmri.runconfig import RunConfig
    from deepmri.tasks import RunContext

    config = RunConfig.from_settings(
        device=arguments.device, precision=arguments.precision, threads=arguments.threads
    )
    config.resolve_device()
    options = task.resolve_options(
        {
            spec.name: getattr(arguments, f"option_{spec.name}")
            for spec in task.options
            if getattr(arguments, f"option_{spec.name}") is not None
        }
    )
    wanted = {
        spec.name: getattr(arguments, f"want_{spec.name}")
        for spec in task.outputs
        if spec.optional and getattr(arguments, f"want_{spec.name}") is not None
    }
    plan = OutputPlan(task, Path(arguments.output), wanted)
    inputs = _read_inputs(task, arguments)
    context = RunContext(config=config, progress=TextProgress(), wanted=frozenset(wanted))
    result = task(inputs, options, context)
    written = plan.write(result)
    summary: dict[str, Any] = {
        "task": task.name,
        "output": str(arguments.output),
        "outputs": written,
    }
    if "model_id" in result.info:
        summary["model"] = result.info["model_id"]
    summary["measures"] = result.measures
    print(json.dumps(summary, default=str))
    return 0


def _read_inputs(task: Any, arguments: argparse.Namespace) -> dict[str, Any]:
    from deepmri.io import read_image, read_transform
    from deepmri.tasks import Kind

    inputs = {}
    for spec in task.inputs:
        path = getattr(arguments, f"input_{spec.name}")
        if path is not None:
            inputs[spec.name] = (read_transform if spec.kind is Kind.TRANSFORM else read_image)(
                path
            )
    return inputs


class OutputPlan:
    """Where each output goes, decided (and checked) before the task runs."""

    def __init__(self, task: Any, output: Path, wanted: dict[str, str]) -> None:
        from deepmri.io import check_image_path, check_transform_path
        from deepmri.tasks import Kind

        self.task = task
        self.primary = task.outputs[0]
        looks_like_file = bool(output.suffix) and not output.is_dir()
        self.file: Path | None = None
        if looks_like_file:
            if self.primary.many:
                raise ImageIOError(
                    f"'{output}' looks like a file, but '{self.primary.name}' is a family of "
                    "outputs: give a folder."
                )
            is_transform = self.primary.kind is Kind.TRANSFORM
            (check_transform_path if is_transform else check_image_path)(output)
            self.file = output
            self.folder = output.parent
            self.suffix = ".nii.gz" if is_transform else _image_suffix(output)
        else:
            self.folder = output
            self.suffix = ".nii.gz"
        self.destinations: dict[str, Path] = {}
        for output_name, path in wanted.items():
            spec = next(spec for spec in task.outputs if spec.name == output_name)
            if not path:
                continue
            destination = Path(path)
            if not spec.many:
                checker = check_transform_path if spec.kind is Kind.TRANSFORM else check_image_path
                checker(destination)
            self.destinations[output_name] = destination

    def write(self, result: Any) -> dict[str, str]:
        """Write every output of `result`; returns output key -> path written."""
        from deepmri.io import write_image, write_transform
        from deepmri.tasks import TaskResult

        written: dict[str, str] = {}
        rest = TaskResult(result.task, measures=result.measures, info=result.info)
        for pool, target in ((result.images, rest.images), (result.transforms, rest.transforms)):
            for key, value in pool.items():
                spec = self.task.output_spec(key)
                path = None
                if spec.name in self.destinations:
                    destination = self.destinations[spec.name]
                    path = destination / f"{key}{self.suffix}" if spec.many else destination
                elif self.file is not None and spec is self.primary:
                    path = self.file
                if path is None:
                    target[key] = value
                    continue
                writer = write_transform if pool is result.transforms else write_image
                written[key] = str(writer(value, path))
        if rest.images or rest.transforms:
            if self.file is None:
                files = rest.write(self.folder, self.suffix)
            else:
                files = _write_beside(rest, self.folder, self.suffix)
            written.update({key: str(self.folder / name) for key, name in files.items()})
        return written


def _write_beside(result: Any, folder: Path, suffix: str) -> dict[str, str]:
    """Outputs without a path of their own, beside the output file, named by their key."""
    from deepmri.io import write_image, write_transform

    files = {}
    for key, image in result.images.items():
        files[key] = write_image(image, folder / f"{key}{suffix}").name
    for key, transform in result.transforms.items():
        files[key] = write_transform(transform, folder / f"{key}.h5").name
    return files


def _image_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()

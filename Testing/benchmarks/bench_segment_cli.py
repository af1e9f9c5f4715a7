"""What a user waits for: `deepmri segment` on a 1 mm head from the command line, CPU seconds and memory.

Each run is its own `deepmri` process, exactly as a user or a batch script starts it, so the figures
include everything: interpreter start, importing torch and MONAI, reading the file, loading both
models (brain extraction, then tissue), inference, resampling back and writing the labels. Beside it,
in the same run and on the same input:

- `import`: a process that only imports the segmentation task (the fixed start-up cost);
- `baseline`: `deepmri segment-classical` (threshold + Gaussian mixture, no network), the cheapest
  way to a tissue map, as the ratio's denominator;
- `brain-extraction` alone, to split the two models.

    python Testing/benchmarks/bench_segment_cli.py [--repeats 3] [--threads 2] [--input HEAD]

CPU seconds (user + system of the child, from wait4) move far less than wall time on a shared
machine; both are printed, medians over --repeats interleaved rounds. Peak memory is the child's
maximum resident set (ru_maxrss). The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COLIN27 = Path("/usr/share/mricron/templates/ch2.nii.gz")


def default_input(folder: Path) -> tuple[Path, str]:
    """Colin27 (a real 1 mm whole head) if installed, else the MNI152 T1 written to `folder`."""
    if COLIN27.is_file():
        return COLIN27, "Colin27 whole head, 181x217x181 at 1 mm"
    from deepmri.data import load_mni152
    from deepmri.io import write_image

    path = write_image(load_mni152("t1"), folder / "mni152_t1.nii.gz")
    return path, "MNI152 2009a T1 (skull-stripped), 197x233x189 at 1 mm"


def run_child(command: list[str], threads: int) -> dict[str, float]:
    """Run one process; wall seconds, CPU seconds (user + system) and peak RSS in MB."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=environment
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({process.returncode}): {stderr[-500:]}")
    return {
        "wall_s": wall,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "peak_mb": usage.ru_maxrss / 1024.0,
    }


def commands(image: Path, output: Path, threads: int) -> dict[str, list[str]]:
    deepmri = [sys.executable, "-m", "deepmri"]
    common = ["--threads", str(threads), "--device", "cpu"]
    return {
        "import": [sys.executable, "-c", "import deepmri.tasks.segment"],
        "baseline": [*deepmri, "segment-classical", str(image), "-o", str(output / "c.nii.gz")],
        "brain-extraction": [
            *deepmri,
            "segment",
            str(image),
            "-o",
            str(output / "b.nii.gz"),
            "--model",
            "brain-extraction",
            *common,
        ],
        "extraction+tissue": [
            *deepmri,
            "segment",
            str(image),
            "-o",
            str(output / "t.nii.gz"),
            "--model",
            "brain-tissue",
            *common,
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--input", type=Path, default=None, help="a 1 mm head (default: Colin27)")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        image, description = (
            (arguments.input, str(arguments.input)) if arguments.input else default_input(folder)
        )
        runs: dict[str, list[dict[str, float]]] = {}
        for round_index in range(arguments.repeats):
            for name, command in commands(image, folder, arguments.threads).items():
                runs.setdefault(name, []).append(run_child(command, arguments.threads))
                last = runs[name][-1]
                print(
                    f"round {round_index + 1} {name:18s} wall {last['wall_s']:6.1f} s  "
                    f"CPU {last['cpu_s']:6.1f} s  peak {last['peak_mb']:6.0f} MB",
                    flush=True,
                )
    summary = {
        name: {key: round(statistics.median(run[key] for run in values), 2) for key in values[0]}
        for name, values in runs.items()
    }
    print(f"\ninput: {description}; {arguments.threads} threads; medians of {arguments.repeats}")
    print(f"{'run':18s} {'wall s':>8s} {'CPU s':>8s} {'peak MB':>8s}")
    for name, figures in summary.items():
        print(
            f"{name:18s} {figures['wall_s']:8.1f} {figures['cpu_s']:8.1f} {figures['peak_mb']:8.0f}"
        )
    full, baseline = summary["extraction+tissue"], summary["baseline"]
    result = {
        "input": description,
        "threads": arguments.threads,
        "repeats": arguments.repeats,
        "cpu_s_cli_extraction_tissue": full["cpu_s"],
        "wall_s_cli_extraction_tissue": full["wall_s"],
        "peak_mb_cli_extraction_tissue": full["peak_mb"],
        "cpu_s_cli_extraction": summary["brain-extraction"]["cpu_s"],
        "cpu_s_import": summary["import"]["cpu_s"],
        "cpu_s_baseline": baseline["cpu_s"],
        "ratio_cpu_vs_baseline": round(full["cpu_s"] / max(baseline["cpu_s"], 1e-9), 2),
        "load_average_end": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""What averaging the pretrained model's in-plane flips costs: one pass against the card's passes.

The shipped `thick-to-thin-3d` card averages the plain pass and its in-plane flips
(`inference.average_flips`, chosen on whole training volumes for +0.12 dB on the least case);
this times `superresolve(method="pretrained")` on the evaluation's 256x256x40 input (Colin27 in
a 256x256x160 box made 1x1x4 mm) with that card and with a copy that runs the plain pass only
(same weights). The two alternate run by run (A B A B ...) so load from other processes falls on
both alike; medians and their ratio are printed, with peak memory of the process. Last line: JSON.

    python Testing/benchmarks/bench_superresolve_passes.py [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from deepmri.models.store import ModelStore
from deepmri.superres import superresolve
from deepmri.superres.settings import PRETRAINED_MODEL

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import cpu_flags  # noqa: E402 (the benchmarks' folder, as a script)
from eval_superresolution import speed_input  # noqa: E402


def single_pass_copy(model_dir: Path, into: Path) -> Path:
    """The same weights with a card that runs the plain pass only."""
    copy = into / "single-pass"
    shutil.copytree(model_dir, copy)
    card_path = copy / "card.json"
    card = json.loads(card_path.read_text())
    card["inference"]["average_flips"] = False
    card_path.write_text(json.dumps(card, indent=2))
    return copy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    shipped = ModelStore().get(PRETRAINED_MODEL)
    thick = speed_input()
    seconds: dict[str, list[float]] = {"averaged": [], "single": []}
    passes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as folder:
        models = {
            "averaged": str(shipped.path),
            "single": str(single_pass_copy(shipped.path, Path(folder))),
        }
        for _ in range(args.repeats):
            for name, model in models.items():
                started = time.monotonic()
                result = superresolve(thick, factor=4, method="pretrained", model=model)
                seconds[name].append(time.monotonic() - started)
                passes[name] = int(result.info["passes"])
                print(f"{name}: {seconds[name][-1]:.1f} s, {passes[name]} passes", flush=True)
    medians = {name: statistics.median(values) for name, values in seconds.items()}
    print(
        json.dumps(
            {
                "model": f"{shipped.card.id} {shipped.card.version}",
                "input_size": "x".join(str(n) for n in thick.GetSize()),
                "seconds_averaged": round(medians["averaged"], 1),
                "seconds_single_pass": round(medians["single"], 1),
                "passes": passes,
                "ratio_averaged_to_single": round(medians["averaged"] / medians["single"], 2),
                "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                "threads": args.threads,
                "amx_bf16": "amx_bf16" in cpu_flags(),
                "load_average": [round(value, 1) for value in os.getloadavg()[:2]],
            }
        )
    )


if __name__ == "__main__":
    main()

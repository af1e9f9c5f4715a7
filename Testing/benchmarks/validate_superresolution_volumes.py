"""Pretrained thick-to-thin candidates scored on whole training volumes, as Colin27 is scored.

The recipe picks weights on 96 fixed patches of its two training volumes; those patches are
centred on tissue and small, and a draw of 24 of them moves the gain by +-0.6 dB
(Docs/superresolution.md). Before a candidate replaces the bundled model it is also scored here:
the MNI152 T1 and the pydeface mean head, each made thick along its third axis exactly as
`eval_superresolution.py` makes Colin27 thick (its cases, its head mask, its PSNR), restored by
`superresolve --method pretrained` told the profile, against cubic B-spline. Training anatomy,
never Colin27: a selection measure, not a held-out one.

    python Testing/benchmarks/validate_superresolution_volumes.py --models \
        DeepMRI/Resources/Models/thick-to-thin-3d runs/sr/ft4/model [--threads 1]

Last line: JSON with `{model}_{volume}_{case}` gains over cubic (dB) and, per model, `{model}_least`
(the least over volumes and cases) and `{model}_mean`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

sys.path.insert(0, str(Path(__file__).parent))

from deepmri import data  # noqa: E402
from deepmri.superres import SSLSettings  # noqa: E402
from deepmri.train.labels import fetch_pydeface_head  # noqa: E402
from eval_superresolution import PROFILES, one_mm_case, run_case  # noqa: E402

# (factor, profile name): the evaluation's cases on a 1 mm volume
CASES = ((4, "gaussian"), (4, "rect-gap"), (6, "gaussian"))


def training_volumes(cache: Path) -> dict[str, sitk.Image]:
    """The recipe's two real volumes, cropped and cut as the evaluation cuts Colin27."""
    return {
        "mni152": one_mm_case(data.load_mni152("t1")),
        "pydeface": one_mm_case(sitk.ReadImage(str(fetch_pydeface_head(cache)))),
    }


def score(models: list[str], cache: Path) -> dict[str, float]:
    profiles = {profile[0]: profile for profile in PROFILES}
    results: dict[str, float] = {}
    settings = SSLSettings()
    for volume_name, truth in training_volumes(cache).items():
        for factor, profile_name in CASES:
            profile = profiles[profile_name]
            cubic, _ = run_case(truth, factor, profile, settings, methods=("cubic",))
            for index, model in enumerate(models):
                row, _ = run_case(
                    truth, factor, profile, settings, methods=("pretrained",), model=model
                )
                key = f"m{index}_{volume_name}_{factor}x_{profile_name}"
                results[key] = row["pretrained_psnr"] - cubic["cubic_psnr"]
                print(f"{model}: {key} {results[key]:+.3f} dB", flush=True)
    for index in range(len(models)):
        gains = [value for key, value in results.items() if key.startswith(f"m{index}_")]
        results[f"m{index}_least"] = min(gains)
        results[f"m{index}_mean"] = float(np.mean(gains))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", required=True, help="model folders or ids")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="where the pydeface head is")
    arguments = parser.parse_args(argv)
    torch.set_num_threads(arguments.threads)
    with tempfile.TemporaryDirectory() as scratch:
        results = score(arguments.models, arguments.cache or Path(scratch))
    for index, model in enumerate(arguments.models):
        print(f"m{index} = {model}")
    print(json.dumps({key: round(value, 4) for key, value in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One training step of the brain-extraction network in fp32 and under bfloat16 autocast.

The recipe's network (`deepmri.train.segment.build_network`) on a full patch of its grid
(96x112x96 at 2 mm; `--spacing 1.5` gives the 128x152x128 grid `--spacing` trains on), DiceCE
loss, AdamW, one torch thread (as the background training runs), same inputs for both. The two
precisions alternate step by step (A B A B ...) so load from other processes falls on both alike;
medians are reported with their ratio. bf16 autocast pays only on CPUs with bf16 arithmetic
(AMX or AVX-512 BF16); on AVX2 it was 15x slower (Docs/training.md). Last line: JSON.

    python Testing/benchmarks/bench_train_step.py [--steps 8] [--threads 1] [--spacing 1.5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch
from deepmri.train.segment import RECIPES, build_network, grid_at
from monai.losses import DiceCELoss


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per precision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--spacing", type=float, help="the grid's voxel size in mm (default 2)")
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    recipe = RECIPES["brain-extraction"]
    if arguments.spacing:
        recipe = replace(recipe, **grid_at(recipe, arguments.spacing))
    network = build_network(recipe).train()
    optimizer = torch.optim.AdamW(network.parameters(), lr=1e-4)
    loss_function = DiceCELoss(to_onehot_y=True, softmax=True)
    image = torch.rand(1, 1, *recipe.shape)
    target = torch.randint(0, recipe.out_channels, (1, 1, *recipe.shape))

    def step(bf16: bool) -> float:
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            output = network(image)
        loss_function(output.float(), target).backward()
        optimizer.step()
        return time.perf_counter() - start

    step(False), step(True)  # warm-up: oneDNN picks its kernels on the first call
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(arguments.steps):
        times["fp32"].append(step(False))
        times["bf16"].append(step(True))
    flags = cpu_flags()
    results = {
        "seconds_step_fp32": round(statistics.median(times["fp32"]), 3),
        "seconds_step_bf16": round(statistics.median(times["bf16"]), 3),
        "threads": arguments.threads,
        "spacing_mm": recipe.spacing,
        "patch": list(recipe.shape),
        "amx_bf16": "amx_bf16" in flags,
        "avx512_bf16": "avx512_bf16" in flags,
    }
    results["bf16_speedup"] = round(results["seconds_step_fp32"] / results["seconds_step_bf16"], 2)
    for name, values in times.items():
        print(f"{name}: " + " ".join(f"{value:.3f}" for value in values))
    print(f"fp32 / bf16 = {results['bf16_speedup']}x")
    print(json.dumps(results))


if __name__ == "__main__":
    main()

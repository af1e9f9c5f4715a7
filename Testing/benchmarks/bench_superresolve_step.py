"""One training step of the thick-to-thin recipe's network in fp32 and under bfloat16 autocast.

`deepmri.superres.net3d.ThickSliceNet3d` at the sizes given, a batch of real training patches
(`deepmri.train.superresolve.batch`: MNI152 and the pydeface head made thick), MSE on the patch
interior, Adam, one torch thread (as the background training runs), the same inputs for both.
The two precisions alternate step by step (A B A B ...) so load from other processes falls on
both alike; medians are reported with their ratio, and the time to make one batch beside them
(the same in both). Validation after a bf16 run stays fp32; `validation_fp32_vs_bf16` is the
largest PSNR difference between the two on the recipe's validation patches for the network as
trained for these few steps. Last line: JSON.

    python Testing/benchmarks/bench_superresolve_step.py [--sizes 16x7 32x8] [--steps 6]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from deepmri.superres.net3d import ThickSliceNet3d
from deepmri.train.superresolve import (
    CHANNELS_LAST,
    SuperResolveRecipe,
    _interior,
    batch,
    training_volumes,
    validate,
    validation_set,
)

sys.path.insert(0, str(Path(__file__).parent))
from bench_train_step import cpu_flags  # noqa: E402 (the benchmarks' folder, as a script)


def training_step(
    network: torch.nn.Module,
    optimiser: torch.optim.Optimizer,
    inputs: torch.Tensor,
    truths: torch.Tensor,
    bf16: bool,
) -> float:
    """Seconds for one forward, backward and Adam step (MSE on the interior, as the recipe)."""
    start = time.perf_counter()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        output = network(inputs.to(memory_format=CHANNELS_LAST))
    loss = torch.nn.functional.mse_loss(_interior(output.float(), 4), _interior(truths, 4))
    optimiser.zero_grad(set_to_none=True)
    loss.backward()
    optimiser.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["16x7", "32x8"], help="WIDTHxDEPTH")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per precision")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=Path("runs/cache"))
    arguments = parser.parse_args()
    torch.set_num_threads(arguments.threads)
    torch.manual_seed(0)
    recipe = SuperResolveRecipe(validation_patches=8)
    volumes = training_volumes(arguments.cache)
    rng = np.random.default_rng(0)
    started = time.perf_counter()
    batches = [batch(volumes, recipe, rng) for _ in range(arguments.steps + 1)]
    seconds_batch = (time.perf_counter() - started) / len(batches)
    patches = validation_set(volumes, recipe)
    results: dict[str, object] = {"seconds_batch_data": round(seconds_batch, 3)}
    for size in arguments.sizes:
        width, depth = (int(value) for value in size.split("x"))
        network = ThickSliceNet3d(width, depth).to(memory_format=CHANNELS_LAST)
        optimiser = torch.optim.Adam(network.parameters(), lr=3e-4)

        for bf16 in (False, True):  # warm-up: oneDNN picks its kernels on the first call
            training_step(network, optimiser, *batches[0], bf16=bf16)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for inputs, truths in batches[1:]:
            times["fp32"].append(training_step(network, optimiser, inputs, truths, bf16=False))
            times["bf16"].append(training_step(network, optimiser, inputs, truths, bf16=True))
        fp32 = validate(network, patches, recipe)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = validate(network, patches, recipe)
        difference = max(abs(fp32[key] - bf16[key]) for key in ("net_4x", "net_6x"))
        entry = {
            "parameters": sum(p.numel() for p in network.parameters()),
            "seconds_step_fp32": round(statistics.median(times["fp32"]), 3),
            "seconds_step_bf16": round(statistics.median(times["bf16"]), 3),
            "validation_fp32_vs_bf16_db": round(difference, 4),
        }
        entry["bf16_speedup"] = round(entry["seconds_step_fp32"] / entry["seconds_step_bf16"], 2)
        results[size] = entry
        print(size, json.dumps(entry), flush=True)
    flags = cpu_flags()
    results.update(
        threads=arguments.threads,
        amx_bf16="amx_bf16" in flags,
        avx512_bf16="avx512_bf16" in flags,
    )
    print(json.dumps(results))


if __name__ == "__main__":
    main()

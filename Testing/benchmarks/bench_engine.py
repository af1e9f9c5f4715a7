"""Speed, peak memory and agreement of deepmri.engine against MONAI's sliding_window_inference.

One MONAI 3D UNet (fixed seed), the MNI152 T1 at its own 1 mm grid (197x233x189), ROI 96^3,
overlap 0.5, Gaussian blending, fp32 on the CPU, all runs in this one process. Times four runs:
MONAI at sw_batch_size=1 (its default), MONAI at its best tile batch of 1/2/4/8, the engine at
exactly that best setting, and the engine at its own defaults. Last line: the speedup ratio.

    python Testing/benchmarks/bench_engine.py [--repeats 3] [--threads N]

Schedule: round 1 sweeps MONAI over the tile batches and picks the fastest; every round then runs
the four configurations back to back, so load from other processes on a shared machine falls on
all of them alike. Times are medians over rounds (each run is listed, to show the spread).

Peak memory: for each run, the process's resident set (RSS) high-water mark is reset just before
the call (Linux /proc/self/clear_refs, "5") and read from VmHWM just after, minus the RSS at the
start; the kernel keeps that mark, so no short-lived peak is missed as with sampling. To make the
start RSS clean, malloc's dynamic mmap threshold is pinned (every tensor-sized block is its own
mapping, returned to the system when freed) and malloc_trim(0) runs before each call.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import SimpleITK as sitk
import torch
from deepmri import engine
from deepmri.data import load_mni152
from deepmri.intensity import normalize_percentile
from monai.inferers import sliding_window_inference
from monai.networks.nets import UNet

ROI = (96, 96, 96)
OVERLAP = 0.5
TILE_BATCHES = (1, 2, 4, 8)
AGREEMENT_TOLERANCE = 1e-4
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter; setting it also turns off the dynamic threshold


def benchmark_network() -> torch.nn.Module:
    """The network of the benchmark: a mid-sized MONAI 3D UNet, fixed random weights."""
    torch.manual_seed(0)
    return UNet(
        spatial_dims=3,
        in_channels=1,
        out_channels=4,
        channels=(16, 32, 64, 128, 256),
        strides=(2, 2, 2, 2),
        num_res_units=2,
    ).eval()


def mni152_input() -> torch.Tensor:
    """The MNI152 T1 as a (1, 1, z, y, x) float32 tensor, normalised as the segmentation task does."""
    array = sitk.GetArrayFromImage(load_mni152())
    return torch.from_numpy(normalize_percentile(array))[None, None].contiguous()


class PeakMemory:
    """Peak RSS growth of this process during one call, from the kernel's high-water mark."""

    def __init__(self) -> None:
        if not Path("/proc/self/clear_refs").exists():
            sys.exit("This benchmark measures peak memory through Linux /proc; run it on Linux.")
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def measure(self, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        """Run `call`; return its output, wall seconds and peak RSS growth in MiB."""
        gc.collect()
        self.libc.malloc_trim(0)
        start_kib = self._status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        began = time.perf_counter()
        output = call()
        seconds = time.perf_counter() - began
        peak_kib = self._status_kib("VmHWM")
        return output, seconds, (peak_kib - start_kib) / 1024


@dataclass
class Configuration:
    name: str
    tile_batch: int | str
    call: Callable[[], torch.Tensor]
    seconds: list[float] = field(default_factory=list)
    peaks_mib: list[float] = field(default_factory=list)
    differences: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def monai_call(network: torch.nn.Module, volume: torch.Tensor, tile_batch: int):
    def call() -> torch.Tensor:
        with torch.no_grad():
            return sliding_window_inference(
                volume, ROI, tile_batch, network, overlap=OVERLAP, mode="gaussian"
            )

    return call


def engine_call(network: torch.nn.Module, volume: torch.Tensor, tile_batch: int | None, seen: list):
    def call() -> torch.Tensor:
        if tile_batch is None:  # the engine's own defaults (precision "auto" is fp32 on the CPU)
            result = engine.infer(network, volume, ROI, overlap=OVERLAP, device="cpu")
        else:
            result = engine.infer(
                network,
                volume,
                ROI,
                overlap=OVERLAP,
                device="cpu",
                precision="fp32",
                sw_batch_size=tile_batch,
            )
        seen.append(result.tile_batch)
        return result.prediction

    return call


def run(
    config: Configuration, meter: PeakMemory, references: dict[str, torch.Tensor]
) -> torch.Tensor:
    output, seconds, peak = meter.measure(config.call)
    config.seconds.append(seconds)
    config.peaks_mib.append(peak)
    for name, reference in references.items():
        difference = (output - reference).abs().max().item()
        config.differences[name] = max(config.differences.get(name, 0.0), difference)
    print(
        f"  {config.name} (tile batch {config.tile_batch}): {seconds:.1f} s, peak +{peak:.0f} MiB",
        flush=True,
    )
    return output


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="rounds; times are medians (3)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (its default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    began = time.perf_counter()
    meter = PeakMemory()
    network = benchmark_network()
    volume = mni152_input()
    windows = engine.count_windows(volume.shape[2:], ROI, OVERLAP)
    print(
        f"MNI152 T1 {tuple(volume.shape[2:])} (z, y, x), ROI {ROI}, overlap {OVERLAP}, gaussian, "
        f"{windows} tiles; MONAI UNet 16-256, fp32, {engine.describe_device('cpu')}; "
        f"torch {torch.__version__}",
        flush=True,
    )
    with torch.no_grad():  # first-call set-up (thread pool, kernels) outside the timings
        for batch in (1, 2):
            network(torch.zeros(batch, 1, *ROI))

    monai = {
        b: Configuration(f"MONAI sw_batch_size={b}", b, monai_call(network, volume, b))
        for b in TILE_BATCHES
    }
    references: dict[str, torch.Tensor] = {}
    print("round 1: MONAI tile-batch sweep", flush=True)
    outputs = {b: run(monai[b], meter, {}) for b in TILE_BATCHES}
    for b in TILE_BATCHES[1:]:  # MONAI itself differs slightly by tile batch (other conv kernels)
        monai[b].differences["MONAI defaults"] = (outputs[b] - outputs[1]).abs().max().item()
    best = min(TILE_BATCHES, key=lambda b: monai[b].seconds[0])
    references = {"MONAI defaults": outputs[1], "MONAI best": outputs[best]}
    del outputs
    defaults_seen: list[int] = []
    equal = Configuration("engine at MONAI's best", best, engine_call(network, volume, best, []))
    own = Configuration(
        "engine defaults", "auto", engine_call(network, volume, None, defaults_seen)
    )
    for round_number in range(1, args.repeats + 1):
        if round_number > 1:
            print(f"round {round_number}", flush=True)
            for config in (monai[1], monai[best]) if best != 1 else (monai[1],):
                run(config, meter, {})
        for config in (equal, own):
            run(config, meter, references)
        own.tile_batch = defaults_seen[-1]

    print()
    print(
        f"Medians of {args.repeats} runs ({torch.get_num_threads()} torch threads, shared machine)"
    )
    print()
    print(
        "| run | tile batch | median s | runs s | peak MiB | max abs diff vs MONAI defaults / best |"
    )
    print("|---|---|---|---|---|---|")
    for config in [*monai.values(), equal, own]:
        runs = " ".join(f"{s:.1f}" for s in config.seconds)
        diffs = " / ".join(
            f"{config.differences[k]:.1e}" if k in config.differences else "-" for k in references
        )
        print(
            f"| {config.name} | {config.tile_batch} | {config.median:.1f} | {runs} | "
            f"{max(config.peaks_mib):.0f} | {diffs} |"
        )
    worst = max(max(c.differences.values()) for c in (equal, own))
    print()
    print(
        f"MONAI's best tile batch: {best} (fastest in round 1); engine default tile batch: {own.tile_batch}"
    )
    print(
        f"every engine output within {AGREEMENT_TOLERANCE:g} of MONAI's: {worst <= AGREEMENT_TOLERANCE} (max {worst:.1e})"
    )
    print(
        f"peak memory at equal settings: engine {max(equal.peaks_mib):.0f} MiB, "
        f"MONAI {max(monai[best].peaks_mib):.0f} MiB"
    )
    print(f"benchmark wall time: {time.perf_counter() - began:.0f} s")
    print(f"engine overhead at equal settings: {equal.median / monai[best].median:.2f}")
    print(f"speedup vs MONAI defaults: {monai[1].median / own.median:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Speed, peak memory and agreement of deepmri.engine against MONAI's sliding_window_inference.

One MONAI 3D UNet (fixed seed, eval mode), the MNI152 T1 at its own 1 mm grid (197x233x189,
normalised to 0..1 float32), ROI 96^3, overlap 0.5, Gaussian blending, fp32, all in one process.
Four runs are timed: MONAI at sw_batch_size=1 (its default), MONAI at its best tile batch of
1/2/4/8, the engine at exactly MONAI's best settings, and the engine at its own defaults.

    python Testing/benchmarks/bench_engine.py [--repeats 3] [--threads 2] [--budget 660]
    python Testing/benchmarks/bench_engine.py --device cuda [--precision fp16]

Schedule: round 1 runs MONAI at every tile batch (the sweep that picks MONAI's best), then the
two engine runs; every later round runs the four configurations back to back (A B C D), so load
from other processes on a shared machine falls on all of them alike. Times are medians over the
rounds; every run is listed to show the spread. A new round starts only if the previous round's
run times still fit in --budget seconds, so the run count is printed, never assumed.

Peak memory (CPU): for each run the process's resident-set high-water mark is reset just before
the call (Linux /proc/self/clear_refs, "5") and read from VmHWM just after, minus the RSS at the
start. The kernel keeps that mark, so no short-lived peak is missed as it can be with sampling,
and no child process is needed. malloc's mmap threshold is pinned (tensor-sized blocks are their
own mappings, returned to the system when freed) and malloc_trim(0) runs before each call so the
start RSS is clean. On CUDA: torch.cuda peak allocated bytes minus those allocated at the start.

Precision: by default every row is fp32 except "engine defaults", which keeps the engine's own
policy ("auto": fp32 on the CPU, bf16/fp16 autocast on CUDA). --precision fp16 (or bf16) sets it
for every engine row, and the MONAI rows run under torch.autocast with the same dtype, so that
"equal settings" stays equal.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import statistics
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
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
    """The MNI152 T1 as a (1, 1, z, y, x) float32 tensor in 0..1, as the segmentation task does."""
    array = sitk.GetArrayFromImage(load_mni152())
    return torch.from_numpy(normalize_percentile(array))[None, None].contiguous()


class PeakMemory:
    """Peak memory growth during one call: kernel RSS high-water mark, or CUDA peak allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        if device.type == "cuda":
            return
        if not Path("/proc/self/clear_refs").exists():
            sys.exit(
                "This benchmark measures CPU peak memory through Linux /proc; run it on Linux."
            )
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)

    @staticmethod
    def _status_kib(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
        raise RuntimeError(f"{key} missing from /proc/self/status")

    def measure(self, call: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float, float]:
        """Run `call`; return its output, wall and CPU seconds, and peak memory growth in MiB."""
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            start = torch.cuda.memory_allocated(self.device)
        else:
            self.libc.malloc_trim(0)
            start = self._status_kib("VmRSS") * 1024
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        began, began_cpu = time.perf_counter(), time.process_time()
        output = call()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds, cpu_seconds = time.perf_counter() - began, time.process_time() - began_cpu
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device)
        else:
            peak = self._status_kib("VmHWM") * 1024
        return output, seconds, cpu_seconds, (peak - start) / 2**20


@dataclass
class Configuration:
    """One benchmarked configuration, with every run's time, peak and disagreement."""

    name: str
    tile_batch: int | str
    call: Callable[[], torch.Tensor]
    seconds: list[float] = field(default_factory=list)
    cpu_seconds: list[float] = field(default_factory=list)
    peaks_mib: list[float] = field(default_factory=list)
    differences: dict[str, float] = field(default_factory=dict)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def cpu_median(self) -> float:
        return statistics.median(self.cpu_seconds)

    @property
    def peak(self) -> float:
        return max(self.peaks_mib)


def autocast_context(device: torch.device, precision: str):
    """MONAI rows run under the same autocast as the engine's rows (none for fp32)."""
    dtype = engine.autocast_dtype(device, precision)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def monai_call(
    network: torch.nn.Module,
    volume: torch.Tensor,
    tile_batch: int,
    device: torch.device,
    precision: str,
) -> Callable[[], torch.Tensor]:
    """MONAI as its documentation shows it: input on the device, torch.no_grad, gaussian mode."""
    on_device = volume.to(device)

    def call() -> torch.Tensor:
        with torch.no_grad(), autocast_context(device, precision):
            output = sliding_window_inference(
                on_device, ROI, tile_batch, network, overlap=OVERLAP, mode="gaussian"
            )
        return output.float().cpu()  # the engine also hands back float32 on the CPU

    return call


def engine_call(
    network: torch.nn.Module,
    volume: torch.Tensor,
    tile_batch: int | None,
    device: torch.device,
    precision: str | None,
    seen: list[int],
) -> Callable[[], torch.Tensor]:
    """The engine at a given tile batch, or at its own defaults (tile_batch None)."""

    def call() -> torch.Tensor:
        if tile_batch is None:  # its own defaults; precision only when asked for (--precision)
            extra = {} if precision is None else {"precision": precision}
            result = engine.infer(network, volume, ROI, overlap=OVERLAP, device=device, **extra)
        else:
            result = engine.infer(
                network,
                volume,
                ROI,
                overlap=OVERLAP,
                device=device,
                precision=precision,
                sw_batch_size=tile_batch,
            )
        seen.append(result.tile_batch)
        return result.prediction

    return call


def run(
    config: Configuration, meter: PeakMemory, references: dict[str, torch.Tensor]
) -> torch.Tensor:
    """Time one run of `config` and compare its output with each reference."""
    output, seconds, cpu_seconds, peak = meter.measure(config.call)
    config.seconds.append(seconds)
    config.cpu_seconds.append(cpu_seconds)
    config.peaks_mib.append(peak)
    for name, reference in references.items():
        difference = (output - reference).abs().max().item()
        config.differences[name] = max(config.differences.get(name, 0.0), difference)
    print(
        f"  {config.name} (tile batch {config.tile_batch}): {seconds:.1f} s ({cpu_seconds:.1f} s CPU), peak +{peak:.0f} MiB",
        flush=True,
    )
    return output


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="most rounds; medians (3)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (2)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (cpu)")
    parser.add_argument(
        "--precision",
        default=None,
        choices=("fp32", "fp16", "bf16"),
        help="precision of every row (MONAI rows by autocast); unset: fp32, engine defaults row auto",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=660.0,
        help="seconds: no new round starts if the last one would not fit (660)",
    )
    return parser.parse_args(argv)


def warm_up(network: torch.nn.Module, device: torch.device, precision: str) -> None:
    """First-call set-up (thread pool, kernels, cuDNN plans) outside the timings."""
    with torch.no_grad(), autocast_context(device, precision):
        for batch in (1, 2):
            network(torch.zeros(batch, 1, *ROI, device=device))


def print_table(configs: list[Configuration], references: dict[str, torch.Tensor]) -> None:
    print(
        "| run | tile batch | median s | runs s | median CPU s | peak MiB "
        "| max abs diff vs MONAI defaults / best |"
    )
    print("|---|---|---|---|---|---|---|")
    for config in configs:
        runs = " ".join(f"{s:.1f}" for s in config.seconds)
        diffs = " / ".join(
            f"{config.differences[k]:.1e}" if k in config.differences else "-" for k in references
        )
        print(
            f"| {config.name} | {config.tile_batch} | {config.median:.1f} | {runs} | "
            f"{config.cpu_median:.1f} | {config.peak:.0f} | {diffs} |"
        )


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    precision = args.precision or "fp32"
    torch.set_num_threads(args.threads)
    device = engine.select_device(args.device)
    began = time.perf_counter()
    meter = PeakMemory(device)
    network = benchmark_network().to(device)
    volume = mni152_input()
    windows = engine.count_windows(volume.shape[2:], ROI, OVERLAP)
    print(
        f"MNI152 T1 {tuple(volume.shape[2:])} (z, y, x), ROI {ROI}, overlap {OVERLAP}, gaussian, "
        f"{windows} tiles; MONAI UNet 16-256, {args.precision or 'fp32 (engine defaults: auto)'}, "
        f"{engine.describe_device(device)}; "
        f"torch {torch.__version__}",
        flush=True,
    )
    warm_up(network, device, precision)

    monai = {
        b: Configuration(
            f"MONAI sw_batch_size={b}", b, monai_call(network, volume, b, device, precision)
        )
        for b in TILE_BATCHES
    }
    print("round 1: MONAI tile-batch sweep, then the engine", flush=True)
    outputs = {b: run(monai[b], meter, {}) for b in TILE_BATCHES}
    for b in TILE_BATCHES[1:]:  # MONAI itself differs slightly by tile batch (other conv kernels)
        monai[b].differences["MONAI defaults"] = (outputs[b] - outputs[1]).abs().max().item()
    best = min(TILE_BATCHES, key=lambda b: monai[b].seconds[0])
    references = {"MONAI defaults": outputs[1], "MONAI best": outputs[best]}
    del outputs
    defaults_seen: list[int] = []
    equal = Configuration(
        "engine at MONAI's best",
        best,
        engine_call(network, volume, best, device, precision, []),
    )
    own = Configuration(
        "engine defaults",
        "auto",
        engine_call(network, volume, None, device, args.precision, defaults_seen),
    )
    for config in (equal, own):
        run(config, meter, references)
    own.tile_batch = defaults_seen[-1]
    rounds = 1
    schedule = [monai[1], monai[best], equal, own] if best != 1 else [monai[1], equal, own]
    while rounds < args.repeats:
        elapsed = time.perf_counter() - began
        round_seconds = sum(config.seconds[-1] for config in schedule)  # the last round's runs
        if elapsed + round_seconds > args.budget:
            print(
                f"stopping after {rounds} round(s): another would pass --budget {args.budget:.0f} s"
            )
            break
        rounds += 1
        print(f"round {rounds}: {' / '.join(c.name for c in schedule)}", flush=True)
        for config in schedule:
            run(config, meter, references if config in (equal, own) else {})

    print()
    print(
        f"Medians of {rounds} round(s), {torch.get_num_threads()} torch threads, "
        f"{engine.describe_device(device)}"
    )
    print()
    print_table([*monai.values(), equal, own], references)
    worst = max(max(c.differences.values()) for c in (equal, own))
    print()
    print(f"MONAI's best tile batch: {best} (fastest in round 1); engine default: {own.tile_batch}")
    print(
        f"every engine output within {AGREEMENT_TOLERANCE:g} of MONAI's: "
        f"{worst <= AGREEMENT_TOLERANCE} (max {worst:.1e})"
    )
    print(
        f"peak memory at equal settings: engine {equal.peak:.0f} MiB, "
        f"MONAI {monai[best].peak:.0f} MiB"
    )
    print(  # this process's CPU seconds (all its threads): far less moved by other load
        f"same ratios in CPU seconds: overhead {equal.cpu_median / monai[best].cpu_median:.2f}, "
        f"speedup {monai[1].cpu_median / own.cpu_median:.2f}"
    )
    load = ", ".join(f"{value:.1f}" for value in os.getloadavg())
    print(f"benchmark wall time: {time.perf_counter() - began:.0f} s; load average now: {load}")
    print(f"engine overhead at equal settings: {equal.median / monai[best].median:.2f}")
    print(f"speedup vs MONAI defaults: {monai[1].median / own.median:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

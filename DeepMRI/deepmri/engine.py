"""The inference engine: MONAI's sliding-window inference plus the policy MONAI leaves to callers.

MONAI tiles, batches and blends (Gaussian); this module adds device choice, precision, the tile
batch for the device, test-time flips with an uncertainty map, CPU accumulation for volumes that
do not fit the device, out-of-memory recovery, progress and cancel between tile batches.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from monai.inferers import sliding_window_inference

from deepmri.errors import DeepMRIError, OutOfMemoryError
from deepmri.progress import CancelLike, ProgressCallback, check_cancel, no_progress
from deepmri.runconfig import PRECISIONS, RunConfig

# Tiles per forward pass on the CPU. For a 96^3 MONAI UNet on 2 cores, 4 tiles need 1.7x less CPU
# time per volume than 1 (PyTorch runs batched convolutions in oneDNN); 8 save another ~12% for
# 1.7x the memory, too much of a risk where running out of memory kills the process
# (Docs/benchmarks.md).
CPU_TILE_BATCH = 4
# Accumulate the blended output on the CPU when it would take more than this share of free
# device memory (the output and MONAI's weight map are both full-volume float32 tensors).
DEVICE_OUTPUT_SHARE = 0.25
OUT_OF_MEMORY_MESSAGES = ("out of memory", "can't allocate memory")


@dataclass
class InferenceResult:
    """Blended network output on the CPU, and the per-voxel spread over test-time flips."""

    prediction: torch.Tensor
    uncertainty: torch.Tensor | None = None
    device: str = "cpu"
    tile_batch: int = 1


def select_device(preference: str | torch.device | None = None) -> torch.device:
    """The torch device for a device name ("auto" or None: cuda > mps > cpu), checked to exist.

    The name is not read from the environment here: the front doors resolve the user's choice
    once (`deepmri.runconfig.RunConfig.from_settings`) and pass it down.

    Examples:
        >>> select_device("cpu")
        device(type='cpu')
    """
    if isinstance(preference, torch.device):
        preference = str(preference)
    return RunConfig(device=preference or "auto").resolve_device()


def describe_device(device: str | torch.device | None = None) -> str:
    """A one-line description for the user, e.g. 'CUDA: NVIDIA H100 (80 GB)' or 'CPU (2 threads)'.

    Examples:
        >>> describe_device("cpu") == f"CPU ({torch.get_num_threads()} threads)"
        True
    """
    device = select_device(device)
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        return f"CUDA: {properties.name} ({properties.total_memory / 2**30:.0f} GB)"
    if device.type == "mps":
        return "Apple GPU (MPS)"
    return f"CPU ({torch.get_num_threads()} threads)"


def default_tile_batch(device: torch.device, roi_size: Sequence[int]) -> int:
    """Tiles per forward pass: measured best on CPU; on a GPU, as many as free memory allows."""
    if device.type != "cuda":
        return CPU_TILE_BATCH
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # About 1.5 GB of activations per 96^3 tile for a mid-sized 3D UNet under fp16 autocast.
    per_tile = 1.5e9 * math.prod(roi_size) / 96**3
    return int(max(1, min(16, free_bytes * 0.6 // per_tile)))


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype for a precision policy; None means plain fp32."""
    if precision not in PRECISIONS:
        raise DeepMRIError(f"Precision must be one of {', '.join(PRECISIONS)}, not '{precision}'.")
    if precision == "fp32" or (precision == "auto" and device.type != "cuda"):
        return None
    if precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if precision == "fp16" else torch.bfloat16


def count_windows(spatial_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> int:
    """How many tiles MONAI's sliding window visits (same scan rule), for progress reporting."""
    total = 1
    for size, roi in zip(spatial_size, roi_size, strict=True):
        roi = min(roi, size) if roi > 0 else size
        interval = max(int(roi * (1 - overlap)), 1) if roi < size else roi
        total *= math.ceil((size - roi) / interval) + 1 if size > roi else 1
    return total


class _Predictor:
    """Wraps the network for MONAI: checks cancel and reports progress once per tile batch."""

    def __init__(
        self,
        network: torch.nn.Module,
        postprocess: Callable[[torch.Tensor], torch.Tensor] | None,
        amp_dtype: torch.dtype | None,
        device: torch.device,
        batches_total: int,
        progress: ProgressCallback,
        cancel: CancelLike | None,
        label: str,
    ) -> None:
        self.network = network
        self.postprocess = postprocess
        self.amp_dtype = amp_dtype
        self.device = device
        self.batches_total = max(batches_total, 1)
        self.batches_done = 0
        self.progress = progress
        self.cancel = cancel
        self.label = label

    def __call__(self, tiles: torch.Tensor) -> torch.Tensor:
        check_cancel(self.cancel)
        if self.amp_dtype is not None:
            with torch.autocast(self.device.type, dtype=self.amp_dtype):
                output = self.network(tiles)
            output = output.float()
        else:
            output = self.network(tiles)
        if self.postprocess is not None:
            output = self.postprocess(output)
        self.batches_done += 1
        self.progress(
            min(self.batches_done / self.batches_total, 1.0),
            f"{self.label}: tile batch {self.batches_done} of {self.batches_total}",
        )
        return output


def _is_out_of_memory(error: BaseException | None) -> bool:
    """True for out-of-memory errors, also when a library re-raised one (`raise ... from`).

    Besides `torch.OutOfMemoryError`, MPS and older CUDA builds raise a RuntimeError saying
    "out of memory", the CPU allocator says "can't allocate memory", and MONAI re-raises a failed
    Gaussian weight map as "Seems to be OOM" from the original error.
    """
    while error is not None:
        if isinstance(error, torch.OutOfMemoryError) or (
            isinstance(error, RuntimeError)
            and any(text in str(error).lower() for text in OUT_OF_MEMORY_MESSAGES)
        ):
            return True
        error = error.__cause__
    return False


def _output_device(device: torch.device, inputs: torch.Tensor) -> torch.device:
    """Keep the blended output on the device only where it fits comfortably."""
    if device.type != "cuda":
        return device
    free_bytes, _ = torch.cuda.mem_get_info(device)
    # Output and weight map: assume up to 8 output channels of float32, twice over.
    needed = inputs[:, :1].numel() * 4 * 8 * 2
    return device if needed < free_bytes * DEVICE_OUTPUT_SHARE else torch.device("cpu")


def _flip_passes(flips: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
    return [()] + [tuple(int(dim) for dim in flip) for flip in flips]


def infer(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    *,
    overlap: float = 0.5,
    device: str | torch.device | None = None,
    precision: str = "auto",
    sw_batch_size: int | None = None,
    flips: Sequence[Sequence[int]] = (),
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelLike | None = None,
) -> InferenceResult:
    """Tiled inference with Gaussian blending on the best device, recovering from out-of-memory.

    `flips` lists extra passes on mirrored inputs, each a tuple of dims of the (B, C, *spatial)
    tensor (e.g. `[(2,), (3,), (4,)]`); the prediction is the mean of all passes and
    `uncertainty` their per-voxel standard deviation (dividing by the number of passes).
    `postprocess` (e.g. softmax) is applied to each tile batch before blending. On out-of-memory
    the tile batch is halved, then the CPU is used, and the progress message says so.

    Examples:
        >>> from monai.networks.nets import UNet
        >>> net = UNet(3, 1, 2, channels=(4, 8), strides=(2,))
        >>> result = infer(net, torch.rand(1, 1, 40, 40, 40), roi_size=(32, 32, 32), device="cpu")
        >>> tuple(result.prediction.shape)
        (1, 2, 40, 40, 40)

        Mirrored left-right pass, softmax per tile, and a progress callback:

        >>> result = infer(
        ...     net,
        ...     torch.rand(1, 1, 40, 40, 40),
        ...     (32, 32, 32),
        ...     device="cpu",
        ...     flips=[(4,)],
        ...     postprocess=lambda logits: torch.softmax(logits, dim=1),
        ...     progress=lambda fraction, message: None,
        ... )
        >>> result.uncertainty.shape == result.prediction.shape
        True
    """
    progress = progress or no_progress
    torch_device = select_device(device)
    tile_batch = sw_batch_size or default_tile_batch(torch_device, roi_size)
    while True:
        try:
            return _infer_on(
                network,
                inputs,
                roi_size,
                overlap,
                torch_device,
                precision,
                tile_batch,
                flips,
                postprocess,
                progress,
                cancel,
            )
        except Exception as error:
            if not _is_out_of_memory(error):
                raise
            if torch_device.type == "cuda":
                torch.cuda.empty_cache()
            if tile_batch > 1:
                tile_batch //= 2
                progress(0.0, f"Out of memory: retrying with {tile_batch} tile(s) per batch")
            elif torch_device.type != "cpu":
                torch_device = torch.device("cpu")
                tile_batch = CPU_TILE_BATCH
                progress(0.0, "Out of GPU memory even with 1 tile: continuing on the CPU (slower)")
            else:
                raise OutOfMemoryError(
                    "Not enough memory even for one tile. Close other programs, crop the volume to "
                    "a region of interest, or use a computer with more memory."
                ) from error


def _infer_on(
    network: torch.nn.Module,
    inputs: torch.Tensor,
    roi_size: Sequence[int],
    overlap: float,
    device: torch.device,
    precision: str,
    tile_batch: int,
    flips: Sequence[Sequence[int]],
    postprocess: Callable[[torch.Tensor], torch.Tensor] | None,
    progress: ProgressCallback,
    cancel: CancelLike | None,
) -> InferenceResult:
    network = network.to(device).eval()
    amp_dtype = autocast_dtype(device, precision)
    passes = _flip_passes(flips)
    windows = count_windows(inputs.shape[2:], roi_size, overlap)
    # MONAI groups the windows of all batch items together into tile batches.
    batches_per_pass = math.ceil(windows * inputs.shape[0] / tile_batch)
    output_device = _output_device(device, inputs)
    mean = spread = None
    for index, flip in enumerate(passes):
        label = "Inference" if not flip else f"Flipped pass {index} of {len(passes) - 1}"
        share = 1.0 / len(passes)
        predictor = _Predictor(
            network,
            postprocess,
            amp_dtype,
            device,
            batches_per_pass,
            lambda f, m, i=index, s=share: progress((i + f) * s, m),
            cancel,
            label,
        )
        source = inputs.flip(flip) if flip else inputs
        with torch.no_grad():
            output = sliding_window_inference(
                source,
                roi_size,
                tile_batch,
                predictor,
                overlap=overlap,
                mode="gaussian",
                sw_device=device,
                device=output_device,
            )
        output = output.flip(flip) if flip else output
        output = output.float().cpu()
        if mean is None:
            mean = output
            spread = torch.zeros_like(output) if len(passes) > 1 else None
        else:
            _add_to_running_spread(mean, spread, output, count=index + 1)
        del output
    check_cancel(cancel)
    uncertainty = spread.div_(len(passes)).sqrt_() if spread is not None else None
    return InferenceResult(mean, uncertainty, device=str(device), tile_batch=tile_batch)


def _add_to_running_spread(
    mean: torch.Tensor, spread: torch.Tensor, output: torch.Tensor, count: int
) -> None:
    """Welford's update, in place: `mean` of the `count` passes so far and `spread`, their summed
    squared deviations. Unlike mean(x^2) - mean(x)^2 it does not cancel catastrophically in
    float32, so passes that agree give an uncertainty of ~1e-7, not ~1e-4."""
    delta = output - mean
    mean.add_(delta, alpha=1.0 / count)
    spread.addcmul_(delta, output.sub_(mean))

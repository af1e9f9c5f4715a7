"""The engine: tiled inference equals whole-volume inference, flips, progress, cancel, OOM recovery."""

from __future__ import annotations

import pytest
import torch
from deepmri import engine
from deepmri.errors import Cancelled, DeepMRIError, OutOfMemoryError
from deepmri.progress import CancelToken
from monai.networks.nets import UNet


def small_fully_convolutional_net(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv3d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 2, 3, padding=1)
    ).eval()


def test_device_choice_follows_the_argument_and_ignores_the_environment(monkeypatch):
    # The environment is read once, by Settings in the front doors, never by the engine.
    monkeypatch.setenv("DEEPMRI_DEVICE", "cuda:7")
    assert engine.select_device() == engine.select_device("auto")
    assert engine.select_device("cpu") == torch.device("cpu")
    assert engine.select_device("CPU") == torch.device("cpu")
    if not torch.cuda.is_available():
        for name in ("cuda", "gpu", "CUDA", "cuda:1"):
            with pytest.raises(DeepMRIError, match="no CUDA GPU"):
                engine.select_device(name)
    assert engine.describe_device("cpu").startswith("CPU")


def tile_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Tile positions along one axis, by MONAI's scan rule (regular steps, last tile flush)."""
    interval = max(int(roi * (1 - overlap)), 1)
    starts = list(range(0, max(size - roi, 0) + 1, interval))
    if starts[-1] + roi < size:
        starts.append(size - roi)
    return starts


def voxels_with_full_context(shape, roi, overlap: float, radius: int) -> torch.Tensor:
    """True where every tile covering a voxel holds its whole receptive field (radius voxels)."""
    good = torch.ones(shape, dtype=torch.bool)
    for z in tile_starts(shape[0], roi[0], overlap):
        for y in tile_starts(shape[1], roi[1], overlap):
            for x in tile_starts(shape[2], roi[2], overlap):
                tile = torch.zeros(shape, dtype=torch.bool)
                inner = torch.zeros(shape, dtype=torch.bool)
                box, inner_box = [], []
                for start, r, size in zip((z, y, x), roi, shape, strict=True):
                    low = start + radius if start > 0 else 0
                    high = start + r - radius if start + r < size else size
                    box.append(slice(start, start + r))
                    inner_box.append(slice(low, high))
                tile[tuple(box)] = True
                inner[tuple(inner_box)] = True
                good &= ~(tile & ~inner)
    return good


def test_tiled_inference_matches_whole_volume_where_tiles_hold_the_receptive_field():
    net = small_fully_convolutional_net()
    volume = torch.rand(1, 1, 50, 44, 38)
    roi = (24, 24, 24)
    with torch.no_grad():
        whole = net(volume)
    tiled = engine.infer(net, volume, roi_size=roi, overlap=0.5, device="cpu").prediction
    assert tiled.shape == whole.shape
    good = voxels_with_full_context(tuple(volume.shape[2:]), roi, 0.5, radius=2)
    assert good.float().mean() > 0.3  # the comparison covers a real part of the volume
    difference = (tiled - whole).abs()[:, :, good]
    assert difference.max() < 1e-5
    # Elsewhere tile-edge voxels leak in through MONAI's Gaussian weights (floored at 1e-3),
    # which is why the comparison above is restricted: the test can tell the two apart.
    assert (tiled - whole).abs()[:, :, ~good].max() > 1e-3


def test_tiled_inference_of_a_pointwise_net_is_exact_everywhere():
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 3, 1), torch.nn.ReLU(), torch.nn.Conv3d(3, 2, 1))
    volume = torch.rand(1, 1, 37, 29, 41)
    with torch.no_grad():
        whole = net(volume)
    tiled = engine.infer(net, volume, roi_size=(16, 16, 16), device="cpu").prediction
    torch.testing.assert_close(tiled, whole, atol=1e-5, rtol=1e-5)


def test_progress_rises_to_one_and_counts_tile_batches():
    reports: list[tuple[float, str]] = []
    net = small_fully_convolutional_net()
    engine.infer(
        net,
        torch.rand(1, 1, 48, 48, 48),
        roi_size=(24, 24, 24),
        sw_batch_size=2,
        device="cpu",
        progress=lambda fraction, message: reports.append((fraction, message)),
    )
    fractions = [fraction for fraction, _ in reports]
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    windows = engine.count_windows((48, 48, 48), (24, 24, 24), 0.5)
    assert windows == 27
    assert len(reports) == 14  # ceil(27 / 2) tile batches
    assert "tile batch 14 of 14" in reports[-1][1]


def test_cancel_stops_between_tile_batches():
    token = CancelToken()
    calls = []

    def stop_after_two(fraction: float, message: str) -> None:
        calls.append(fraction)
        if len(calls) == 2:
            token.cancel()

    with pytest.raises(Cancelled):
        engine.infer(
            small_fully_convolutional_net(),
            torch.rand(1, 1, 48, 48, 48),
            roi_size=(24, 24, 24),
            sw_batch_size=1,
            device="cpu",
            progress=stop_after_two,
            cancel=token,
        )
    assert len(calls) == 2  # the third tile batch never ran


def test_flips_give_zero_uncertainty_for_a_mirror_symmetric_net_and_nonzero_otherwise():
    symmetric = torch.nn.Conv3d(1, 1, 3, padding=1, bias=False)
    with torch.no_grad():
        symmetric.weight.fill_(1.0 / 27)  # a box filter is its own mirror image
    volume = torch.rand(1, 1, 24, 24, 24)
    flips = [(2,), (3,), (4,)]
    even = engine.infer(symmetric, volume, (32, 32, 32), device="cpu", flips=flips)
    # Mirrored passes sum in another order, so they agree to float32 rounding: measured 1.1e-7
    # (the spread is accumulated with Welford's update; mean(x^2) - mean(x)^2 gave ~1e-4 here).
    assert even.uncertainty is not None and even.uncertainty.max() < 1e-6
    skewed = engine.infer(
        small_fully_convolutional_net(), volume, (32, 32, 32), device="cpu", flips=flips
    )
    assert skewed.uncertainty.mean() > 1e-3
    assert skewed.uncertainty.shape == skewed.prediction.shape


class RaisesOutOfMemoryAboveBatch(torch.nn.Module):
    """A real network that raises the out-of-memory error whenever it gets more tiles than allowed."""

    def __init__(self, allowed: int) -> None:
        super().__init__()
        self.allowed = allowed
        self.seen_batches: list[int] = []
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        self.seen_batches.append(tiles.shape[0])
        if tiles.shape[0] > self.allowed:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.conv(tiles)


def test_out_of_memory_halves_the_tile_batch_and_says_so():
    net = RaisesOutOfMemoryAboveBatch(allowed=2)
    messages = []
    result = engine.infer(
        net,
        torch.rand(1, 1, 48, 48, 48),
        (24, 24, 24),
        sw_batch_size=8,
        device="cpu",
        progress=lambda f, m: messages.append(m),
    )
    assert result.tile_batch == 2
    assert net.seen_batches[:2] == [8, 4]
    assert sum("Out of memory" in m for m in messages) == 2
    expected = net.conv(torch.rand(1, 1, 2, 2, 2)).shape
    assert result.prediction.shape[1] == expected[1]


def test_out_of_memory_with_one_tile_on_the_cpu_is_a_clear_error():
    with pytest.raises(OutOfMemoryError, match="crop the volume"):
        engine.infer(
            RaisesOutOfMemoryAboveBatch(allowed=0),
            torch.rand(1, 1, 30, 30, 30),
            (24, 24, 24),
            sw_batch_size=2,
            device="cpu",
        )


def test_engine_output_equals_monai_at_equal_settings():
    from monai.inferers import sliding_window_inference

    torch.manual_seed(0)
    net = UNet(3, 1, 3, channels=(4, 8, 16), strides=(2, 2)).eval()
    volume = torch.rand(1, 1, 40, 36, 30)
    with torch.no_grad():
        reference = sliding_window_inference(volume, (32, 32, 32), 2, net, 0.5, mode="gaussian")
    ours = engine.infer(net, volume, (32, 32, 32), sw_batch_size=2, device="cpu").prediction
    assert (ours - reference).abs().max() < 1e-5


def test_unknown_precision_is_refused():
    with pytest.raises(DeepMRIError, match="Precision"):
        engine.infer(
            small_fully_convolutional_net(), torch.rand(1, 1, 8, 8, 8), (8, 8, 8), precision="fp8"
        )


def out_of_memory_as_torch_raises_it() -> BaseException:
    return torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def out_of_memory_as_runtime_error() -> BaseException:
    # What MPS and older CUDA builds raise: a plain RuntimeError naming the condition.
    return RuntimeError(
        "MPS backend out of memory (MPS allocated: 17.00 GB, max allowed: 18.13 GB)"
    )


def out_of_memory_from_the_cpu_allocator() -> BaseException:
    return RuntimeError(
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 7247757312 bytes. Error code 12 (Cannot allocate memory)"
    )


def out_of_memory_wrapped_by_a_library() -> BaseException:
    # MONAI re-raises a failed Gaussian weight map as "Seems to be OOM" from the original error.
    try:
        raise out_of_memory_as_torch_raises_it()
    except torch.OutOfMemoryError as original:
        try:
            raise RuntimeError(
                "patch size (96, 96, 96), mode=gaussian: Seems to be OOM."
            ) from original
        except RuntimeError as wrapped:
            return wrapped


class RaisesAboveBatch(torch.nn.Module):
    """A real 1x1x1 convolution that raises `error()` whenever it gets more tiles than allowed."""

    def __init__(self, allowed: int, error) -> None:
        super().__init__()
        self.allowed = allowed
        self.error = error
        self.seen_batches: list[int] = []
        self.conv = torch.nn.Conv3d(1, 1, 1)

    def forward(self, tiles: torch.Tensor) -> torch.Tensor:
        self.seen_batches.append(tiles.shape[0])
        if tiles.shape[0] > self.allowed:
            raise self.error()
        return self.conv(tiles)


@pytest.mark.parametrize(
    "error",
    [
        out_of_memory_as_torch_raises_it,
        out_of_memory_as_runtime_error,
        out_of_memory_from_the_cpu_allocator,
        out_of_memory_wrapped_by_a_library,
    ],
)
def test_every_form_of_out_of_memory_halves_the_tile_batch_and_the_result_is_unchanged(error):
    torch.manual_seed(2)
    volume = torch.rand(1, 1, 40, 40, 40)
    net = RaisesAboveBatch(allowed=1, error=error)
    messages: list[str] = []
    result = engine.infer(
        net,
        volume,
        (24, 24, 24),
        sw_batch_size=4,
        device="cpu",
        progress=lambda f, m: messages.append(m),
    )
    assert result.tile_batch == 1
    assert net.seen_batches[:3] == [4, 2, 1]
    assert [m for m in messages if "Out of memory" in m] == [
        "Out of memory: retrying with 2 tile(s) per batch",
        "Out of memory: retrying with 1 tile(s) per batch",
    ]
    with torch.no_grad():
        whole = net.conv(volume)  # a pointwise net: tiling changes nothing
    torch.testing.assert_close(result.prediction, whole, atol=1e-5, rtol=1e-5)


def test_other_runtime_errors_are_not_mistaken_for_out_of_memory():
    def shape_error() -> BaseException:
        return RuntimeError(
            "expected input[4, 1, 24, 24, 24] to have 2 channels, but got 1 channels"
        )

    net = RaisesAboveBatch(allowed=0, error=shape_error)
    with pytest.raises(RuntimeError, match="2 channels"):
        engine.infer(net, torch.rand(1, 1, 30, 30, 30), (24, 24, 24), sw_batch_size=4, device="cpu")
    assert net.seen_batches == [4]  # no retry with fewer tiles


@pytest.mark.skipif(not torch.cuda.is_available(), reason="falling back to the CPU needs a GPU")
def test_out_of_gpu_memory_with_one_tile_continues_on_the_cpu():
    class OutOfMemoryOnTheGpu(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 1, 1)

        def forward(self, tiles: torch.Tensor) -> torch.Tensor:
            if tiles.is_cuda:
                raise out_of_memory_as_torch_raises_it()
            return self.conv(tiles)

    messages: list[str] = []
    result = engine.infer(
        OutOfMemoryOnTheGpu(),
        torch.rand(1, 1, 40, 40, 40),
        (24, 24, 24),
        sw_batch_size=2,
        device="cuda",
        progress=lambda f, m: messages.append(m),
    )
    assert result.device == "cpu"
    assert result.prediction.shape == (1, 1, 40, 40, 40)
    assert any("continuing on the CPU" in m for m in messages)


def test_progress_with_flips_rises_to_one_across_all_passes():
    fractions: list[float] = []
    result = engine.infer(
        small_fully_convolutional_net(),
        torch.rand(1, 1, 32, 32, 32),
        (24, 24, 24),
        sw_batch_size=4,
        device="cpu",
        flips=[(2,), (4,)],
        progress=lambda fraction, message: fractions.append(fraction),
    )
    assert result.uncertainty is not None
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
    assert len(fractions) == 3 * 2  # 3 passes of ceil(8 tiles / 4) tile batches


def test_device_description_names_the_cpu_thread_count():
    assert engine.describe_device("cpu") == f"CPU ({torch.get_num_threads()} threads)"


def test_progress_counts_the_tile_batches_of_a_multi_volume_batch():
    # MONAI fills tile batches across the volumes of a batch: 2 x 27 windows in 2-tile batches
    # is 27 forward passes, not 2 x ceil(27 / 2) = 28.
    reports: list[tuple[float, str]] = []
    result = engine.infer(
        small_fully_convolutional_net(),
        torch.rand(2, 1, 48, 48, 48),
        roi_size=(24, 24, 24),
        sw_batch_size=2,
        device="cpu",
        progress=lambda fraction, message: reports.append((fraction, message)),
    )
    assert result.prediction.shape == (2, 2, 48, 48, 48)
    assert len(reports) == 27
    assert reports[-1] == (pytest.approx(1.0), "Inference: tile batch 27 of 27")


def test_flip_mean_and_uncertainty_equal_those_of_explicit_mirrored_passes():
    net = small_fully_convolutional_net(seed=3)
    volume = torch.rand(1, 1, 24, 24, 24)
    flips = [(2,), (3,), (4,), (2, 3, 4)]
    result = engine.infer(net, volume, (24, 24, 24), device="cpu", flips=flips)  # one window
    with torch.no_grad():
        passes = torch.stack([net(volume)] + [net(volume.flip(f)).flip(f) for f in flips])
    torch.testing.assert_close(result.prediction, passes.mean(0), atol=1e-6, rtol=0)
    torch.testing.assert_close(result.uncertainty, passes.std(0, correction=0), atol=1e-6, rtol=0)
    assert result.uncertainty.mean() > 1e-2  # the passes really differ

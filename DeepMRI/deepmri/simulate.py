"""An MR physics simulator: paired T1w / T2w / FLAIR / PD images of one anatomy from tissue maps.

Real paired multi-contrast scans cannot be had offline, so synthesis is trained and evaluated on
images computed here from tissue probability maps (MNI152 2009a GM/WM, CSF = the rest of the
brain), literature relaxation times and the textbook signal equations. Every random choice is
drawn by `sample_subject` into a `SubjectParameters`; `simulate_subject` applies them
deterministically (TorchIO's sampler / deterministic-twin split), so any subject is re-made
from its logged parameters.

Signal model, per voxel: signal = sum over classes of (class probability x class signal),
i.e. partial volume mixes signals, not relaxation times; then a smooth multiplicative bias
field and Rician (magnitude) noise.

Examples:
    >>> sequence = PROTOCOLS["T2w"]
    >>> values = signal(sequence, TISSUES[3.0])
    >>> bool(values["csf"] > values["gm"] > values["wm"])
    True
    >>> params = sample_subject(3, inputs=("T1w",))  # doctest: +SKIP
    >>> images = simulate_subject(params, ("T1w", "T2w"))  # doctest: +SKIP
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
import SimpleITK as sitk

from deepmri.errors import DeepMRIError

TISSUE_CLASSES = ("csf", "gm", "wm")
LESION = "lesion"


class SimulationError(DeepMRIError):
    """Sequence timings or simulation parameters that cannot be played out."""


@dataclass(frozen=True)
class Tissue:
    """Relaxation times in ms and proton density relative to pure water (CSF = 1)."""

    t1: float
    t2: float
    t2star: float
    pd: float


# One table for all of DeepMRI. Values are means of healthy adults as commonly quoted from:
#   T1, T2 of GM/WM at 3 T: Wansapura et al., J Magn Reson Imaging 9:531 (1999)
#     (WM T1 832 ms, GM T1 1331 ms; WM T2 80 ms, GM T2 110 ms);
#   T1, T2 of GM/WM at 1.5 T: Stanisz et al., Magn Reson Med 54:507 (2005)
#     (WM 884 / 72 ms, GM 1124 / 95 ms);
#   T1 of CSF (about 4.3 s, nearly field independent): Rooney et al., Magn Reson Med 57:308 (2007);
#   T2 of CSF (long, 1.5-2 s; the T2w / FLAIR contrast barely depends on the exact value);
#   T2* of GM/WM at 3 T: Peters et al., Magn Reson Imaging 25:748 (2007) (about 66 / 53 ms),
#     and proportionally longer at 1.5 T;
#   proton density (water content) WM 0.69, GM 0.80, CSF 1.0: Tofts (ed.), Quantitative MRI of
#     the Brain, Wiley 2003, ch. 4 (Whittall et al. 1997 values).
# The lesion is a demyelinating (MS-like) white-matter lesion: longer T1 and T2, more water.
TISSUES: dict[float, dict[str, Tissue]] = {
    1.5: {
        "csf": Tissue(t1=4300.0, t2=2000.0, t2star=1000.0, pd=1.00),
        "gm": Tissue(t1=1124.0, t2=95.0, t2star=84.0, pd=0.80),
        "wm": Tissue(t1=884.0, t2=72.0, t2star=66.0, pd=0.69),
        LESION: Tissue(t1=1300.0, t2=160.0, t2star=120.0, pd=0.85),
    },
    3.0: {
        "csf": Tissue(t1=4300.0, t2=2000.0, t2star=1000.0, pd=1.00),
        "gm": Tissue(t1=1331.0, t2=110.0, t2star=66.0, pd=0.80),
        "wm": Tissue(t1=832.0, t2=80.0, t2star=53.0, pd=0.69),
        LESION: Tissue(t1=1400.0, t2=160.0, t2star=100.0, pd=0.85),
    },
}


@dataclass(frozen=True)
class Sequence:
    """A pulse sequence and its timings (ms, degrees).

    kind: "spin-echo" (incl. turbo spin echo, k-space centre at TE), "spoiled-gre" (FLASH),
    "inversion-recovery" (180 deg inversion, spin-echo readout; FLAIR when TI nulls CSF) or
    "mprage" (inversion, then a train of `readout_pulses` small-flip spoiled GRE pulses every
    `echo_spacing` ms, the k-space centre TI after the inversion; TR is inversion to inversion).
    """

    kind: str
    tr: float
    te: float
    ti: float = 0.0
    flip: float = 90.0
    echo_spacing: float = 7.0
    readout_pulses: int = 160

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SEQUENCE_KINDS = ("spin-echo", "spoiled-gre", "inversion-recovery", "mprage")

# The reference protocols, 3 T. The targets of synthesis are these (fixed) protocols; inputs in
# training vary around the T1w ones.
PROTOCOLS: dict[str, Sequence] = {
    "T1w": Sequence("mprage", tr=2300.0, te=3.0, ti=900.0, flip=9.0, echo_spacing=7.0),
    "T1w-spgr": Sequence("spoiled-gre", tr=20.0, te=4.0, flip=25.0),
    "T2w": Sequence("spin-echo", tr=5000.0, te=100.0),
    "PDw": Sequence("spin-echo", tr=5000.0, te=12.0),
    "FLAIR": Sequence("inversion-recovery", tr=9000.0, te=100.0, ti=2480.0),
}


def flair_null_ti(t1: float, tr: float = math.inf) -> float:
    """The inversion time that nulls a tissue of longitudinal relaxation `t1` (ms).

    From Mz(TI) = M0 (1 - 2 exp(-TI/T1) + exp(-TR/T1)) = 0: TI = T1 ln(2 / (1 + exp(-TR/T1))),
    which tends to T1 ln 2 for TR >> T1.

    Examples:
        >>> round(flair_null_ti(4300.0))
        2981
    """
    return t1 * math.log(2.0 / (1.0 + math.exp(-tr / t1)))


def signal(sequence: Sequence, tissues: dict[str, Tissue]) -> dict[str, float]:
    """The noise-free magnitude signal of each pure tissue (same units as proton density).

    Equations (ideal pulses, perfect spoiling, signal at the k-space centre):
      spin echo:          S = PD (1 - e^{-TR/T1}) e^{-TE/T2}
      spoiled GRE:        S = PD sin(a) (1 - E1) / (1 - cos(a) E1) e^{-TE/T2*},  E1 = e^{-TR/T1}
                          (Ernst equation; e.g. Bernstein, King & Zhou, Handbook of MRI Pulse
                          Sequences, 2004, ch. 14)
      inversion recovery: S = PD |1 - 2 e^{-TI/T1} + e^{-TR/T1}| e^{-TE/T2}
      MPRAGE:             steady state of inversion -> free recovery -> readout train of
                          spoiled pulses -> recovery, solved in closed form per period
                          (Deichmann et al., NeuroImage 12:112, 2000; the same model as the
                          MP2RAGE equations of Marques et al., NeuroImage 49:1271, 2010);
                          S = sin(a) Mz(before the centre pulse) e^{-TE/T2*}, magnitude.
    """
    return {name: float(_tissue_signal(sequence, tissue)) for name, tissue in tissues.items()}


def _tissue_signal(sequence: Sequence, tissue: Tissue) -> float:
    if sequence.kind not in SEQUENCE_KINDS:
        raise SimulationError(
            f"Unknown sequence '{sequence.kind}'; known: {', '.join(SEQUENCE_KINDS)}."
        )
    e1 = _decay(sequence.tr, tissue.t1)
    if sequence.kind == "spin-echo":
        return tissue.pd * (1.0 - e1) * _decay(sequence.te, tissue.t2)
    if sequence.kind == "spoiled-gre":
        alpha = math.radians(sequence.flip)
        ernst = math.sin(alpha) * (1.0 - e1) / (1.0 - math.cos(alpha) * e1)
        return tissue.pd * ernst * _decay(sequence.te, tissue.t2star)
    if sequence.kind == "inversion-recovery":
        recovery = 1.0 - 2.0 * _decay(sequence.ti, tissue.t1) + e1
        return tissue.pd * abs(recovery) * _decay(sequence.te, tissue.t2)
    return tissue.pd * _mprage_signal(sequence, tissue.t1) * _decay(sequence.te, tissue.t2star)


def _decay(time: float, constant: float) -> float:
    return 0.0 if math.isinf(time) else math.exp(-time / constant)


def _mprage_signal(sequence: Sequence, t1: float) -> float:
    """sin(a) Mz / M0 just before the centre pulse of the MPRAGE train, in the steady state.

    Each stage maps Mz affinely (Mz -> a Mz + b, M0 = 1): inversion (a=-1), free recovery for t
    (a=e^{-t/T1}, b=1-a), a pulse (a=cos), so one TR is an affine map whose fixed point is the
    steady state.
    """
    n = sequence.readout_pulses
    centre = n // 2
    tau = sequence.echo_spacing
    before = sequence.ti - centre * tau  # inversion to first readout pulse
    after = sequence.tr - sequence.ti - (n - centre) * tau  # last pulse to the next inversion
    if before < 0 or after < 0:
        raise SimulationError(
            f"MPRAGE timings do not fit: TI {sequence.ti} ms and TR {sequence.tr} ms cannot hold "
            f"{n} readout pulses every {tau} ms around the k-space centre."
        )
    cos_a = math.cos(math.radians(sequence.flip))

    def relax(map_, time):
        e = _decay(time, t1)
        return (map_[0] * e, map_[1] * e + 1.0 - e)

    def pulse_then_relax(map_, time):
        return relax((map_[0] * cos_a, map_[1] * cos_a), time)

    # Start just before the centre pulse (pulse `centre` of 0..n-1), go round one TR and come
    # back to the same point: its fixed point is the steady state.
    stage = (1.0, 0.0)
    for _ in range(n - centre):
        stage = pulse_then_relax(stage, tau)
    stage = relax(stage, after)
    stage = (-stage[0], -stage[1])  # ideal inversion
    stage = relax(stage, before)
    for _ in range(centre):
        stage = pulse_then_relax(stage, tau)
    slope, offset = stage
    mz = offset / (1.0 - slope)
    return math.sin(math.radians(sequence.flip)) * abs(mz)


# ----------------------------------------------------------------------------------------------
# Images from tissue maps


def mni_tissue_maps() -> dict[str, sitk.Image]:
    """CSF, GM and WM probability maps (0-1, float32) of the MNI152 2009a on its own grid.

    GM and WM are the template's maps; CSF is the remainder inside the non-zero (skull-stripped)
    T1, so the three sum to 1 inside the brain and 0 outside.
    """
    from deepmri.data import load_mni152

    t1 = load_mni152("t1")
    inside = sitk.GetArrayFromImage(t1) > 0
    grey = sitk.GetArrayFromImage(load_mni152("gm")).astype(np.float32) / 255.0 * inside
    white = sitk.GetArrayFromImage(load_mni152("wm")).astype(np.float32) / 255.0 * inside
    csf = np.clip(1.0 - grey - white, 0.0, 1.0) * inside
    maps = {}
    for name, array in zip(TISSUE_CLASSES, (csf, grey, white), strict=True):
        image = sitk.GetImageFromArray(array.astype(np.float32))
        image.CopyInformation(t1)
        maps[name] = image
    return maps


def render(
    probabilities: dict[str, np.ndarray],
    sequence: Sequence,
    tissues: dict[str, Tissue],
) -> np.ndarray:
    """Partial-volume image: sum over classes of probability x that class's signal."""
    values = signal(sequence, {name: tissues[name] for name in probabilities})
    first = next(iter(probabilities.values()))
    image = np.zeros(first.shape, dtype=np.float32)
    for name, probability in probabilities.items():
        image += np.float32(values[name]) * probability
    return image


def simulate(
    probabilities: dict[str, sitk.Image],
    sequence: Sequence | str,
    field_strength: float = 3.0,
    *,
    bias_strength: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
) -> sitk.Image:
    """One image on the maps' grid (geometry copied): partial volume, bias field, Rician noise.

    `noise` is the standard deviation of each Gaussian channel as a fraction of the pure-WM
    signal; `bias_strength` the standard deviation of the log bias field.

    Examples:
        >>> image = simulate(mni_tissue_maps(), "T2w")  # doctest: +SKIP
    """
    sequence = PROTOCOLS[sequence] if isinstance(sequence, str) else sequence
    reference = next(iter(probabilities.values()))
    arrays = {name: sitk.GetArrayFromImage(image) for name, image in probabilities.items()}
    tissues = TISSUES[float(field_strength)]
    image = render(arrays, sequence, tissues)
    rng = np.random.default_rng(seed)
    white = signal(sequence, {"wm": tissues["wm"]})["wm"]
    image = corrupt(image, bias_strength, noise * white, rng)
    output = sitk.GetImageFromArray(image)
    output.CopyInformation(reference)
    return output


def inverted_contrast(image: sitk.Image, region: np.ndarray | None = None) -> sitk.Image:
    """A T2-like image from a T1 one: intensities inverted inside `region` (CSF bright, WM dark).

    The evaluations' cross-contrast recipe: inside the region (default: the non-zero voxels)
    `high - value + 0.05 high`, `high` the region's 99.5th percentile, so the darkest tissue stays
    above the background; outside it 0. A monotone map of the T1, not a physical T2.
    """
    values = sitk.GetArrayFromImage(image).astype(np.float32)
    region = values > 0 if region is None else region
    high = np.percentile(values[region], 99.5)
    inverted = np.where(region, np.clip(high - values, 0, None) + 0.05 * high, 0.0)
    output = sitk.GetImageFromArray(inverted.astype(np.float32))
    output.CopyInformation(image)
    return output


def corrupt(image: np.ndarray, bias_strength: float, sigma: float, rng) -> np.ndarray:
    """Multiply by a smooth log-normal bias field, then add Rician noise of std `sigma`."""
    image = image.astype(np.float32)
    if bias_strength > 0:
        image = image * bias_field(image.shape, bias_strength, rng)
    if sigma > 0:
        noise = rng.normal(0.0, sigma, (2, *image.shape)).astype(np.float32)
        image = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    return image.astype(np.float32)


def bias_field(shape, strength: float, rng, control_points: int = 4) -> np.ndarray:
    """exp of a smooth field: a 4^3 grid of N(0, strength) values, trilinearly interpolated."""
    import torch
    import torch.nn.functional as F

    coarse = rng.normal(0.0, strength, (1, 1, *(control_points,) * 3)).astype(np.float32)
    smooth = F.interpolate(
        torch.from_numpy(coarse), size=tuple(shape), mode="trilinear", align_corners=True
    )
    return np.exp(smooth[0, 0].numpy())


def thick_slices(image: np.ndarray, axis: int, factor: int, offset: int = 0) -> np.ndarray:
    """An image acquired in slices `factor` voxels thick along `axis`, back on its own grid.

    Each slice is the mean of its `factor` voxels (a box slice profile), starting at voxel
    `offset`; the slices are then interpolated linearly back onto every voxel (as the tasks
    resample a thick-slice scan), constant beyond the first and last slice centres.

    Examples:
        >>> ramp = np.arange(8, dtype=np.float32)[:, None, None] * np.ones((1, 2, 2))
        >>> thick_slices(ramp, axis=0, factor=2)[:, 0, 0].tolist()
        [0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 6.5]
    """
    moved = np.moveaxis(np.asarray(image, dtype=np.float32), axis, 0)
    count = (moved.shape[0] - offset) // factor
    if factor <= 1 or count < 1:
        return np.asarray(image, dtype=np.float32)
    stack = moved[offset : offset + count * factor].reshape(count, factor, *moved.shape[1:])
    slices = stack.mean(axis=1)
    centres = offset + np.arange(count) * factor + (factor - 1) / 2.0
    position = np.interp(np.arange(moved.shape[0]), centres, np.arange(count, dtype=float))
    below = np.floor(position).astype(int)
    above = np.minimum(below + 1, count - 1)
    weight = (position - below).astype(np.float32).reshape(-1, *([1] * (moved.ndim - 1)))
    resampled = slices[below] * (1.0 - weight) + slices[above] * weight
    return np.ascontiguousarray(np.moveaxis(resampled, 0, axis), dtype=np.float32)


# ----------------------------------------------------------------------------------------------
# Random subjects: the sampler and its deterministic twin


@dataclass
class Grid:
    """The simulation grid: array shape (z, y, x) at `spacing` mm, RAS-oriented, on the brain."""

    shape: tuple[int, int, int] = (80, 96, 80)
    spacing: float = 2.0


@dataclass
class SubjectParameters:
    """Every random choice behind one simulated subject (JSON-serialisable with `to_dict`)."""

    seed: int
    field_strength: float
    tissue_scale: dict[str, list[float]]  # class -> [T1, T2, PD] multiplicative jitter
    rotation_deg: list[float]
    scaling: list[float]
    translation_mm: list[float]
    deformation_mm: float
    sequences: dict[str, dict[str, Any]]  # contrast name -> Sequence.to_dict()
    bias_strength: float
    noise: float  # Gaussian std per channel, fraction of the pure-WM signal, inputs only
    lesion: dict[str, Any] | None = None  # {"centre_mm": [z, y, x], "radius_mm": r}
    grid: dict[str, Any] = field(default_factory=lambda: asdict(Grid()))
    # Inputs acquired in thick slices: {"axis": 0-2, "factor": voxels per slice, "offset": voxels}
    # (`thick_slices`); None: acquired at the grid's resolution.
    resolution: dict[str, int] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SubjectParameters:
        return cls(**data)


# "any": the input of a contrast-agnostic model (the SynthSR idea): each subject draws one of
# these families, then that family's protocol.
ANY = "any"
ANY_FAMILIES = ("T1w", "T2w", "PDw", "FLAIR", "GRE", "IR")


def sample_input_sequence(name: str, rng: np.random.Generator) -> Sequence:
    """An input protocol drawn around the reference one: the variation a site's scans show.

    `name` is a weighting (T1w, T2w, PDw, FLAIR), "GRE" (spoiled gradient echo of any
    weighting: flip 5-70 deg, TR 10-700 ms, TE 3-25 ms), "IR" (inversion recovery, any TI) or
    "any" (one of `ANY_FAMILIES`, uniformly).

    Examples:
        >>> sample_input_sequence("PDw", np.random.default_rng(0)).kind
        'spin-echo'
    """
    if name == ANY:
        name = ANY_FAMILIES[int(rng.integers(len(ANY_FAMILIES)))]
    if name == "PDw":
        return Sequence(
            "spin-echo",
            tr=float(rng.uniform(3000.0, 7000.0)),
            te=float(rng.uniform(8.0, 25.0)),
        )
    if name == "GRE":
        return Sequence(
            "spoiled-gre",
            tr=float(np.exp(rng.uniform(np.log(10.0), np.log(700.0)))),
            te=float(rng.uniform(3.0, 25.0)),
            flip=float(rng.uniform(5.0, 70.0)),
        )
    if name == "IR":
        return Sequence(
            "inversion-recovery",
            tr=float(rng.uniform(2000.0, 10000.0)),
            te=float(rng.uniform(8.0, 100.0)),
            ti=float(rng.uniform(100.0, 1500.0)),
        )
    if name == "T1w":
        if rng.random() < 0.7:
            return Sequence(
                "mprage",
                tr=float(rng.uniform(1900.0, 2500.0)),
                te=float(rng.uniform(2.5, 4.0)),
                ti=float(rng.uniform(800.0, 1100.0)),
                flip=float(rng.uniform(7.0, 12.0)),
                echo_spacing=float(rng.uniform(6.0, 8.0)),
            )
        return Sequence(
            "spoiled-gre",
            tr=float(rng.uniform(15.0, 30.0)),
            te=float(rng.uniform(3.0, 6.0)),
            flip=float(rng.uniform(20.0, 35.0)),
        )
    if name == "T2w":
        return Sequence(
            "spin-echo",
            tr=float(rng.uniform(3500.0, 7000.0)),
            te=float(rng.uniform(80.0, 120.0)),
        )
    if name == "FLAIR":
        tr = float(rng.uniform(8000.0, 11000.0))
        null = flair_null_ti(TISSUES[3.0]["csf"].t1, tr)
        return Sequence(
            "inversion-recovery",
            tr=tr,
            te=float(rng.uniform(80.0, 130.0)),
            ti=float(null * rng.uniform(0.95, 1.05)),
        )
    raise SimulationError(
        f"No input protocol for '{name}'; known: {', '.join(ANY_FAMILIES)}, {ANY}."
    )


def sample_subject(
    seed: int,
    inputs: tuple[str, ...] = ("T1w",),
    *,
    grid: Grid | None = None,
    lesion: bool = False,
    deformation_mm: tuple[float, float] = (0.0, 4.0),
    thick_probability: float = 0.0,
    thick_factors: tuple[int, ...] = (2, 3, 4),
) -> SubjectParameters:
    """Draw one subject: field strength, tissue jitter, pose, warp, input protocols, bias, noise.

    The only place with randomness besides the seeded noise fields of `simulate_subject`.
    Inputs get sampled protocols (their names as keys); targets use `PROTOCOLS` unchanged.
    With `thick_probability` the inputs are, that often, acquired in slices of one of
    `thick_factors` grid voxels along a random axis (drawn last, so the rest of a seed's subject
    does not depend on it).
    """
    rng = np.random.default_rng(seed)
    grid = grid or Grid()
    field_strength = 3.0 if rng.random() < 0.6 else 1.5
    for _ in range(20):  # a subject whose jitter leaves no protocol its weighting is redrawn
        scale = {
            name: np.exp(rng.normal(0.0, [0.05, 0.05, 0.02])).tolist()
            for name in (*TISSUE_CLASSES, LESION)
        }
        tissues = _jittered(TISSUES[field_strength], scale)
        try:
            sequences = {name: _weighted_sequence(name, tissues, rng).to_dict() for name in inputs}
            break
        except SimulationError:
            continue
    else:
        raise SimulationError(f"Subject {seed}: no protocol gives the asked weighting.")
    lesion_spec = None
    if lesion:
        lesion_spec = {"centre_fraction": rng.uniform(0.0, 1.0), "radius_mm": 5.0}
    params = SubjectParameters(
        seed=seed,
        field_strength=field_strength,
        tissue_scale=scale,
        rotation_deg=rng.uniform(-10.0, 10.0, 3).tolist(),
        scaling=np.exp(rng.normal(0.0, 0.05, 3)).tolist(),
        translation_mm=rng.uniform(-4.0, 4.0, 3).tolist(),
        deformation_mm=float(rng.uniform(*deformation_mm)),
        sequences=sequences,
        bias_strength=float(rng.uniform(0.0, 0.25)),
        noise=float(rng.uniform(0.0, 0.05)),
        lesion=lesion_spec,
        grid=asdict(grid),
    )
    if thick_probability > 0 and rng.random() < thick_probability:
        factor = int(thick_factors[int(rng.integers(len(thick_factors)))])
        params.resolution = {
            "axis": int(rng.integers(3)),
            "factor": factor,
            "offset": int(rng.integers(factor)),
        }
    return params


# What makes a protocol "T1-weighted" etc.: the pure-tissue order it must give, with a margin.
WEIGHTING_ORDER = {"T1w": ("wm", "gm", "csf"), "T2w": ("csf", "gm", "wm")}
WEIGHTING_MARGIN = 1.05


def _weighted_sequence(name: str, tissues: dict[str, Tissue], rng) -> Sequence:
    """A sampled protocol that gives its weighting's tissue order for this subject.

    With the 1.5 T table (GM/WM T1 ratio 1.27) a long-TI MPRAGE can make GM as bright as WM
    (proton density wins); sites tune such protocols away, so the sampler redraws them.
    """
    order = WEIGHTING_ORDER.get(name)
    for _ in range(200):
        sequence = sample_input_sequence(name, rng)
        if order is None:
            return sequence
        values = signal(sequence, {key: tissues[key] for key in order})
        ranked = [values[key] for key in order]
        if all(a > WEIGHTING_MARGIN * b for a, b in zip(ranked[:-1], ranked[1:], strict=True)):
            return sequence
    raise SimulationError(f"No sampled {name} protocol gives {' > '.join(order)} here.")


def subject_tissues(params: SubjectParameters) -> dict[str, Tissue]:
    """The subject's relaxation times: the literature table times its jitter."""
    return _jittered(TISSUES[params.field_strength], params.tissue_scale)


def _jittered(table: dict[str, Tissue], scale: dict[str, list[float]]) -> dict[str, Tissue]:
    tissues = {}
    for name, tissue in table.items():
        t1, t2, pd = scale[name]
        tissues[name] = replace(
            tissue,
            t1=tissue.t1 * t1,
            t2=tissue.t2 * t2,
            t2star=tissue.t2star * t2,
            pd=tissue.pd * pd,
        )
    return tissues


@dataclass
class SimulatedSubject:
    """The images of one subject on its grid, plus what is needed to check and reuse them."""

    images: dict[str, np.ndarray]  # contrast -> (z, y, x) float32
    probabilities: dict[str, np.ndarray]  # class -> (z, y, x), summing to 1 inside the brain
    brain: np.ndarray  # bool (z, y, x)
    reference: sitk.Image  # the grid's geometry (RAS), values unused
    parameters: SubjectParameters

    def image(self, contrast: str) -> sitk.Image:
        output = sitk.GetImageFromArray(self.images[contrast])
        output.CopyInformation(self.reference)
        return output


def simulate_subject(
    params: SubjectParameters,
    contrasts: tuple[str, ...] = ("T1w", "T2w"),
    source: Any = None,
) -> SimulatedSubject:
    """The deterministic twin of `sample_subject`: the same parameters give the same images.

    `contrasts` named in `params.sequences` are inputs: simulated with their sampled protocol,
    bias field and noise. Others are targets: the reference protocol of `PROTOCOLS`, no bias,
    no noise (what a synthesis network is asked to produce).
    """
    source = source if source is not None else _mni_source()
    grid = Grid(**{**params.grid, "shape": tuple(params.grid["shape"])})
    probabilities = _subject_probabilities(params, source, grid)
    tissues = subject_tissues(params)
    rng = np.random.default_rng([params.seed, 1])
    images = {}
    for index, contrast in enumerate(contrasts):
        if contrast in params.sequences:
            sequence = Sequence(**params.sequences[contrast])
            clean = render(probabilities, sequence, tissues)
            white = signal(sequence, {"wm": tissues["wm"]})["wm"]
            channel_rng = np.random.default_rng([params.seed, 2, index])
            images[contrast] = corrupt(
                clean, params.bias_strength, params.noise * white, channel_rng
            )
            if params.resolution:
                images[contrast] = thick_slices(images[contrast], **params.resolution)
        else:
            if contrast not in PROTOCOLS:
                raise SimulationError(
                    f"Unknown contrast '{contrast}'; known: {', '.join(PROTOCOLS)}."
                )
            images[contrast] = render(probabilities, PROTOCOLS[contrast], tissues)
    del rng
    brain = sum(probabilities.values()) > 0.5
    return SimulatedSubject(images, probabilities, brain, _grid_reference(grid, source), params)


_SOURCE_CACHE: dict[str, Any] = {}


def _mni_source() -> Any:
    """The MNI brain (RAS, 1 mm, padded) of the training code, built once per process."""
    if "mni" not in _SOURCE_CACHE:
        from deepmri.train.labels import mni_source

        _SOURCE_CACHE["mni"] = mni_source()
    return _SOURCE_CACHE["mni"]


def _brain_centre_index(source: Any) -> np.ndarray:
    index = np.argwhere(source.labels > 0)
    return (index.min(0) + index.max(0)) / 2.0


def _grid_reference(grid: Grid, source: Any) -> sitk.Image:
    """An image carrying the grid's geometry: RAS axes, centred where the source brain is."""
    reference = sitk.Image([int(n) for n in grid.shape[::-1]], sitk.sitkUInt8)
    reference.SetSpacing([grid.spacing] * 3)
    reference.SetDirection(source.grid.GetDirection())
    centre = source.grid.TransformContinuousIndexToPhysicalPoint(
        [float(v) for v in _brain_centre_index(source)[::-1]]
    )
    direction = np.asarray(source.grid.GetDirection()).reshape(3, 3)
    half = (np.asarray(grid.shape[::-1], dtype=float) - 1) / 2 * grid.spacing
    reference.SetOrigin(tuple(np.asarray(centre) - direction @ half))
    return reference


def _subject_probabilities(
    params: SubjectParameters, source: Any, grid: Grid
) -> dict[str, np.ndarray]:
    """Class probabilities warped onto the grid (affine + smooth deformation), lesion inserted."""
    import torch
    import torch.nn.functional as F

    channels = [source.tissue[i] for i in range(len(TISSUE_CLASSES))]
    names = list(TISSUE_CLASSES)
    if params.lesion is not None:
        lesion = _lesion_probability(params.lesion, source)
        channels = [channel * (1.0 - lesion) for channel in channels] + [lesion]
        names.append(LESION)
    volume = torch.from_numpy(np.stack(channels).astype(np.float32))[None]
    sampling = _sampling_grid(params, source, grid)
    warped = F.grid_sample(
        volume, sampling, mode="bilinear", padding_mode="zeros", align_corners=True
    )
    warped = warped[0].numpy()
    return {name: np.ascontiguousarray(warped[i]) for i, name in enumerate(names)}


def _lesion_probability(spec: dict[str, Any], source: Any) -> np.ndarray:
    """A sphere of `radius_mm` in deep white matter with a one-voxel soft edge, on the source."""
    spacing = np.asarray(source.grid.GetSpacing())[::-1]
    if "centre_index" in spec:
        centre = np.asarray(spec["centre_index"], dtype=float)
    else:
        # Deep WM: pure-WM voxels at least radius + 3 mm from any non-WM voxel.
        depth = _white_matter_depth(source)
        candidates = np.argwhere(depth > spec["radius_mm"] + 3.0)
        if not len(candidates):
            raise SimulationError("No white matter deep enough for the lesion.")
        pick = int(spec["centre_fraction"] * (len(candidates) - 1))
        centre = candidates[pick].astype(float)
        spec["centre_index"] = centre.tolist()
    axes = [np.arange(n) for n in source.tissue.shape[1:]]
    zz, yy, xx = np.meshgrid(*axes, indexing="ij", sparse=True)
    distance = np.sqrt(
        ((zz - centre[0]) * spacing[0]) ** 2
        + ((yy - centre[1]) * spacing[1]) ** 2
        + ((xx - centre[2]) * spacing[2]) ** 2
    )
    return np.clip(spec["radius_mm"] + 0.5 - distance, 0.0, 1.0).astype(np.float32)


def _white_matter_depth(source: Any) -> np.ndarray:
    """Distance (mm) of each pure-WM voxel to the nearest voxel that is not, cached per source."""
    key = f"depth-{id(source)}"
    if key not in _SOURCE_CACHE:
        from scipy import ndimage

        spacing = np.asarray(source.grid.GetSpacing())[::-1]
        white = source.tissue[2] > 0.95
        _SOURCE_CACHE[key] = ndimage.distance_transform_edt(white, sampling=spacing)
    return _SOURCE_CACHE[key]


def _sampling_grid(params: SubjectParameters, source: Any, grid: Grid):
    """grid_sample coordinates: each grid voxel's place in the source (RAS voxel frame, mm)."""
    import torch
    import torch.nn.functional as F

    from deepmri.train.synth import euler_matrix

    shape = np.asarray(grid.shape)
    source_spacing = np.asarray(source.grid.GetSpacing())[::-1]
    source_shape = np.asarray(source.tissue.shape[1:])
    centre = _brain_centre_index(source) * source_spacing
    axes = [(np.arange(n) - (n - 1) / 2) * grid.spacing for n in shape]
    points = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    matrix = euler_matrix(*np.deg2rad(params.rotation_deg)) @ np.diag(params.scaling)
    moved = points @ matrix.T + centre + np.asarray(params.translation_mm)
    if params.deformation_mm > 0:
        warp_rng = np.random.default_rng([params.seed, 3])
        coarse = warp_rng.normal(0.0, params.deformation_mm, (1, 3, 5, 5, 5)).astype(np.float32)
        smooth = F.interpolate(
            torch.from_numpy(coarse),
            size=tuple(int(n) for n in shape),
            mode="trilinear",
            align_corners=True,
        )
        moved = moved + smooth[0].reshape(3, -1).T.numpy()
    normalised = 2.0 * (moved / source_spacing) / np.maximum(source_shape - 1, 1) - 1.0
    sampling = torch.from_numpy(normalised[:, ::-1].astype(np.float32).copy())
    return sampling.reshape(1, *(int(n) for n in shape), 3)

"""Bringing outside networks in: TorchScript, ONNX, MONAI bundles, state dicts and model folders.

Each import writes a normal model folder (card.json + weights, checksummed) into the user's cache,
so imported models are listed, verified and run through the same engine as the shipped ones.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any

from deepmri.errors import CardError, ModelError
from deepmri.models.card import CARD_FILE, ModelCard, example_card, sha256_of
from deepmri.models.fetch import extract_archive, install_model_folder
from deepmri.models.loaders import load_state_dict
from deepmri.models.model import Model, save_model

FORMATS = ("deepmri", "monai-bundle", "torchscript", "onnx", "state-dict")
TODO = "TODO"
BUNDLE_CONFIGS = ("inference.json", "inference.yaml", "inference.yml", "train.json", "train.yaml")
# Distinct colours for labels a bundle names but does not colour (r, g, b in 0..1).
_PALETTE = [
    [0.90, 0.30, 0.24],
    [0.18, 0.55, 0.86],
    [0.95, 0.77, 0.06],
    [0.15, 0.68, 0.38],
    [0.61, 0.35, 0.71],
    [0.90, 0.49, 0.13],
    [0.10, 0.74, 0.61],
    [0.93, 0.44, 0.67],
]


class CardNeeded(ModelError):
    """The file holds only a network; the user must complete `draft` (labels, spacing...)."""

    def __init__(self, message: str, draft: dict[str, Any]) -> None:
        super().__init__(message)
        self.draft = draft


def detect_format(source: str | os.PathLike) -> str:
    """What `source` is: a DeepMRI folder, a MONAI bundle, TorchScript, ONNX or a state dict."""
    path = Path(source)
    if path.is_dir():
        if (path / CARD_FILE).is_file():
            return "deepmri"
        if _bundle_config(path) is not None and (path / "models" / "model.pt").is_file():
            return "monai-bundle"
        raise ModelError(
            f"{path} is neither a DeepMRI model folder ({CARD_FILE} + weights) nor a MONAI bundle "
            "(configs/inference.json and models/model.pt)."
        )
    if not path.is_file():
        raise ModelError(f"Nothing to import at {path}.")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".zip" and _zip_holds_bundle(path):
        return "monai-bundle"
    if suffix in (".pt", ".pth", ".ts", ".zip"):
        return "torchscript" if _is_torchscript(path) else "state-dict"
    raise ModelError(
        f"Cannot import {path.name}: DeepMRI imports model folders, MONAI bundles (folder or "
        ".zip), TorchScript (.pt, .ts), ONNX (.onnx) and state dicts (.pt, .pth, with a card)."
    )


def import_model(
    source: str | os.PathLike,
    cache: str | os.PathLike,
    *,
    card: str | os.PathLike | dict[str, Any] | ModelCard | None = None,
    model_id: str | None = None,
    overrides: dict[str, Any] | None = None,
    force: bool = False,
) -> Model:
    """Copy the network at `source` into `cache/<id>` with a completed card, and check it loads.

    TorchScript, ONNX and state dicts need `card` (labels, spacing, patch size: what the network
    was trained with) or `overrides` that complete the draft card; without them, `CardNeeded`
    carries a draft to complete. MONAI bundles give a draft from their metadata and inference
    config; it is used as is when nothing is missing. `overrides` (e.g. from the command line's
    --labels/--spacing/--patch) are merged into the card, nested objects key by key.

    Examples:
        >>> import_model("unet.onnx", "~/.deepmri/models", card="unet.card.json")  # doctest: +SKIP
    """
    source = Path(source).expanduser()
    cache = Path(cache).expanduser()
    cache.mkdir(parents=True, exist_ok=True)
    fmt = detect_format(source)
    staging = Path(tempfile.mkdtemp(prefix=".import-", dir=cache))
    try:
        if fmt == "monai-bundle" and source.is_file():
            source = _unzip_bundle(source, staging / "bundle-source")
        folder = staging / "model"
        folder.mkdir()
        if fmt == "deepmri":
            _stage_model_folder(source, folder, card, model_id, overrides)
        elif fmt == "state-dict":
            _stage_state_dict(source, folder, _card_data(source, fmt, card, model_id, overrides))
        else:
            data = _card_data(source, fmt, card, model_id, overrides)
            _stage_network_file(source, folder, fmt, data)
        model = Model(folder)
        model.load_network()  # refuse now what would fail at the first run
        return install_model_folder(folder, cache, force)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def draft_card(source: str | os.PathLike, fmt: str | None = None) -> dict[str, Any]:
    """A card for `source` with what can be read from it filled in and 'TODO' everywhere else."""
    source = Path(source)
    fmt = fmt or detect_format(source)
    card = example_card(id=_id_from_name(source))
    card["description"] = f"Imported from {source.name} ({fmt})."
    card["preprocessing"]["spacing"] = f"{TODO}: voxel size in mm the network was trained at"
    card["inference"]["patch_size"] = f"{TODO}: input size in voxels (z, y, x)"
    card["inference"]["flips"] = []
    card["labels"] = [
        {"value": 1, "name": f"{TODO}: name of output channel 1", "color": _PALETTE[0]}
    ]
    card["license"] = f"{TODO}: licence of the weights"
    card["input"] = {"contrasts": [f"{TODO}: e.g. T1w"], "channels": 1, "axis_order": "zyx"}
    card.pop("weights")
    card["architecture"] = {"name": fmt, "config": {}}
    if fmt == "state-dict":
        card["architecture"] = {
            "name": f"{TODO}: network, e.g. monai.UNet",
            "config": {"arguments": f"{TODO}: its constructor arguments"},
        }
    if fmt == "monai-bundle":
        _fill_from_bundle(card, source)
    return card


def missing_fields(data: Any, prefix: str = "") -> list[str]:
    """The fields of a card dict still holding 'TODO' (as 'labels[0].name' etc.)."""
    if isinstance(data, str):
        return [prefix] if data.startswith(TODO) else []
    if isinstance(data, dict):
        items = [(f"{prefix}.{key}" if prefix else str(key), value) for key, value in data.items()]
    elif isinstance(data, list):
        items = [(f"{prefix}[{index}]", value) for index, value in enumerate(data)]
    else:
        return []
    return [field for name, value in items for field in missing_fields(value, name)]


def _card_data(
    source: Path,
    fmt: str,
    card: str | os.PathLike | dict[str, Any] | ModelCard | None,
    model_id: str | None,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The user's card (or the draft when it is complete), checked for leftover TODOs."""
    if card is None:
        data = merge_card(draft_card(source, fmt), overrides or {})
        if model_id:
            data["id"] = model_id
        missing = missing_fields(data)
        if missing or (fmt in ("torchscript", "onnx", "state-dict") and not overrides):
            raise CardNeeded(
                f"{source.name} holds a network but not what it expects or outputs; complete "
                f"the card ({', '.join(missing) or 'check every field'}) and import again with it.",
                data,
            )
        return data
    data = merge_card(_read_card_argument(card), overrides or {})
    if model_id:
        data["id"] = model_id
    missing = missing_fields(data)
    if missing:
        others = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise CardError(f"card.json field '{missing[0]}' still says TODO; fill it in{others}.")
    return data


def merge_card(card: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """`card` with `overrides` applied: objects merged key by key, anything else replaced."""
    merged = copy.deepcopy(card)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_card(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_card_argument(card: str | os.PathLike | dict[str, Any] | ModelCard) -> dict[str, Any]:
    if isinstance(card, ModelCard):
        return card.to_dict()
    if isinstance(card, dict):
        return copy.deepcopy(card)
    path = Path(card)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CardError(f"No card at {path}.") from None
    except json.JSONDecodeError as error:
        raise CardError(f"{path} is not valid JSON (line {error.lineno}: {error.msg}).") from None


def _stage_model_folder(
    source: Path,
    folder: Path,
    card: Any,
    model_id: str | None,
    overrides: dict[str, Any] | None = None,
) -> None:
    """A DeepMRI folder: checked against its own card, then copied (card overrides allowed)."""
    Model(source).verify()
    for item in source.iterdir():
        if item.is_file():
            shutil.copy2(item, folder / item.name)
        elif item.is_dir():
            shutil.copytree(item, folder / item.name)
    if card is not None or model_id or overrides:
        data = (
            _read_card_argument(card)
            if card is not None
            else json.loads((folder / CARD_FILE).read_text(encoding="utf-8"))
        )
        data = merge_card(data, overrides or {})
        own = json.loads((source / CARD_FILE).read_text(encoding="utf-8"))
        data["weights"] = own["weights"]
        if model_id:
            data["id"] = model_id
        ModelCard.from_dict(data).save(folder / CARD_FILE)


def _stage_network_file(source: Path, folder: Path, fmt: str, data: dict[str, Any]) -> None:
    """TorchScript, ONNX or a MONAI bundle: the file(s) copied as they are, the card completed."""
    if fmt == "monai-bundle":
        config = _bundle_config(source)
        shutil.copytree(source / "configs", folder / "configs")
        weights = folder / "model.pt"
        shutil.copy2(source / "models" / "model.pt", weights)
        architecture = data.get("architecture") or {}
        given = (architecture.get("config") or {}) if architecture.get("name") == fmt else {}
        config_args = {
            "config_file": given.get("config_file", f"configs/{config.name}"),
            "network_def": given.get("network_def", "network_def"),
        }
        config_args["config_sha256"] = sha256_of(folder / config_args["config_file"])
        data["architecture"] = {"name": "monai-bundle", "config": config_args}
        data.setdefault("input", {}).setdefault("axis_order", "xyz")
    else:
        weights = folder / ("model.onnx" if fmt == "onnx" else "model.pt")
        shutil.copy2(source, weights)
        data["architecture"] = {"name": fmt, "config": {}}
    data["weights"] = {
        "file": weights.name,
        "sha256": sha256_of(weights),
        "size": weights.stat().st_size,
        "format": fmt,
        "source": source.name,
    }
    ModelCard.from_dict(data).save(folder / CARD_FILE)


def _stage_state_dict(source: Path, folder: Path, data: dict[str, Any]) -> None:
    """A plain state dict: loaded as tensors only, then stored as safetensors for the card's net."""
    from deepmri.nets import build_network

    architecture = data.get("architecture") or {}
    if architecture.get("name") in (None, "state-dict", TODO):
        raise CardError(
            "card.json field 'architecture.name' must name the network the state dict belongs to "
            "(e.g. 'monai.UNet', with its arguments in 'architecture.config')."
        )
    network = build_network(architecture["name"], architecture.get("config") or {})
    state = load_state_dict(source, data.get("id", source.name))
    try:
        network.load_state_dict(state)
    except RuntimeError as error:
        raise ModelError(
            f"{source.name} does not fit the card's architecture ({str(error).splitlines()[0]})."
        ) from error
    data.setdefault("weights", {"file": "weights.safetensors", "sha256": "0" * 64, "size": 1})
    save_model(network, data, folder, dtype="float32")


def _fill_from_bundle(card: dict[str, Any], source: Path) -> None:
    """Read labels, channels, spacing, orientation, normalisation and patch from a bundle."""
    meta_path = source / "configs" / "metadata.json"
    meta = _read_config(meta_path) if meta_path.is_file() else {}
    card["id"] = _id_from_name(Path(str(meta.get("name") or source.name)))
    card["version"] = str(meta.get("version", card["version"]))
    card["description"] = str(meta.get("description") or card["description"])
    licence = meta.get("license") or _first_line(source / "LICENSE")
    if licence:
        card["license"] = str(licence)
    if meta.get("references"):
        card["citation"] = "; ".join(str(r) for r in meta["references"])
    card["input"]["axis_order"] = "xyz"
    data_format = meta.get("network_data_format", {})
    image = next(iter(data_format.get("inputs", {}).values()), {})
    if isinstance(image.get("num_channels"), int):
        card["input"]["channels"] = image["num_channels"]
        card["input"]["contrasts"] = [
            f"{TODO}: contrast of channel {i}" for i in range(image["num_channels"])
        ]
    if image.get("modality"):
        card["input"]["contrasts"] = [str(image["modality"])] * card["input"]["channels"]
    output = next(iter(data_format.get("outputs", {}).values()), {})
    channels = output.get("channel_def") or {}
    labels = [
        {
            "value": int(value),
            "name": str(name),
            "color": _PALETTE[(int(value) - 1) % len(_PALETTE)],
        }
        for value, name in sorted(channels.items(), key=lambda item: int(item[0]))
        if str(value).isdigit() and int(value) > 0
    ]
    if labels:
        card["labels"] = labels
    config_path = _bundle_config(source)
    settings = _scan_transforms(_read_config(config_path)) if config_path is not None else {}
    if "pixdim" in settings:
        card["preprocessing"]["spacing"] = settings["pixdim"]
    if "axcodes" in settings:
        card["preprocessing"]["orientation"] = settings["axcodes"]
    card["preprocessing"]["normalization"] = settings.get(
        "normalization", {"method": f"{TODO}: percentile, zscore or none"}
    )
    if "roi_size" in settings:
        card["inference"]["patch_size"] = list(reversed(settings["roi_size"]))  # to (z, y, x)
    if "overlap" in settings:
        card["inference"]["overlap"] = settings["overlap"]


def _read_config(path: Path) -> dict[str, Any]:
    """A bundle's JSON/YAML file as MONAI reads it, or {} when it cannot be read (draft only)."""
    from monai.bundle import ConfigParser

    try:
        content = ConfigParser.load_config_file(str(path))
    except Exception:  # bad JSON, YAML without PyYAML...: the card then asks for the fields
        return {}
    return content if isinstance(content, dict) else {}


def _first_line(path: Path) -> str:
    """The licence name a bundle's LICENSE file starts with (e.g. 'Apache License')."""
    if not path.is_file():
        return ""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    return next((line.strip() for line in lines if line.strip()), "")


def _scan_transforms(config: Any) -> dict[str, Any]:
    """Find the usual MONAI preprocessing and inferer settings anywhere in a bundle config."""
    found: dict[str, Any] = {}

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            target = str(node.get("_target_", "")).rsplit(".", 1)[-1]
            if target.startswith("Spacing") and _numbers(node.get("pixdim"), 3):
                found.setdefault("pixdim", [float(v) for v in node["pixdim"]])
            elif target.startswith("Orientation") and isinstance(node.get("axcodes"), str):
                found.setdefault("axcodes", node["axcodes"])
            elif target.startswith("NormalizeIntensity"):
                found.setdefault("normalization", {"method": "zscore"})
            elif target.startswith("ScaleIntensityRangePercentiles"):
                found.setdefault(
                    "normalization",
                    {
                        "method": "percentile",
                        "lower": node.get("lower"),
                        "upper": node.get("upper"),
                    },
                )
            elif target.startswith("SlidingWindowInferer"):
                if _numbers(node.get("roi_size"), 3):
                    found.setdefault("roi_size", [int(v) for v in node["roi_size"]])
                if isinstance(node.get("overlap"), int | float):
                    found.setdefault("overlap", float(node["overlap"]))
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for value in node:
                visit(value)

    visit(config)
    return found


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list)
        and len(value) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    )


def _bundle_config(folder: Path) -> Path | None:
    for name in BUNDLE_CONFIGS:
        if (folder / "configs" / name).is_file():
            return folder / "configs" / name
    return None


def _is_torchscript(path: Path) -> bool:
    """TorchScript archives hold compiled code (`*/code/`); torch.save'd state dicts do not."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any("/code/" in name for name in archive.namelist())


def _zip_holds_bundle(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(name.endswith("models/model.pt") for name in names) and any(
        "configs/" in name for name in names
    )


def _unzip_bundle(archive: Path, destination: Path) -> Path:
    extract_archive(archive, destination)
    for config in sorted(destination.rglob("configs"), key=lambda p: len(p.parts)):
        if (config.parent / "models" / "model.pt").is_file():
            return config.parent
    raise ModelError(f"{archive.name} holds no MONAI bundle (configs/ and models/model.pt).")


def _id_from_name(path: Path) -> str:
    stem = path.name
    for suffix in (".onnx", ".pt", ".pth", ".ts", ".zip"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
    cleaned = re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")
    return cleaned or "imported-model"

"""`deepmri models list|info|fetch|import|verify`: the model store from the command line.

Every failure is a ModelError (card, checksum, download), printed on one line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from deepmri.cli.progress_bar import TextProgress
from deepmri.errors import CardError

# Which command-line option fills which card field, for the message when a field is missing.
_OPTION_FOR_FIELD = {
    "id": "--id",
    "license": "--license",
    "labels": "--labels",
    "input.contrasts": "--contrasts",
    "preprocessing.spacing": "--spacing",
    "preprocessing.normalization": "--normalization",
    "inference.patch_size": "--patch",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list, inspect, download, import and verify models",
        description="The models DeepMRI can run: bundled, in your cache ($DEEPMRI_HOME/models) "
        "and in $DEEPMRI_MODEL_PATH folders.",
    )
    parser.set_defaults(handler=lambda _arguments: parser.print_help() or 1)
    commands = parser.add_subparsers(dest="models_command", metavar="ACTION")

    listing = commands.add_parser("list", help="every model with its task, version and licence")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=run_list)

    info = commands.add_parser("info", help="print a model's card (incl. its metrics)")
    info.add_argument("model", help="model id or model folder")
    info.add_argument("--json", action="store_true", help="print the card as JSON")
    info.set_defaults(handler=run_info)

    fetch = commands.add_parser(
        "fetch", help="download a model archive (.zip/.tar.gz) into the cache, checksum-verified"
    )
    fetch.add_argument("url", help="address of the model archive (or of its card.json)")
    fetch.add_argument("--sha256", required=True, help="published sha256 of the file at URL")
    fetch.add_argument("--id", dest="model_id", default=None, help="install under this id")
    fetch.add_argument("--force", action="store_true", help="replace a different cached model")
    fetch.add_argument("--retries", type=int, default=2, help="retries on a cut transfer")
    fetch.set_defaults(handler=run_fetch)

    imported = commands.add_parser(
        "import",
        help="import a TorchScript, ONNX, MONAI bundle or DeepMRI model folder into the cache",
    )
    imported.add_argument("source", type=Path, help=".pt/.ts, .onnx, bundle folder/.zip, folder")
    imported.add_argument("--card", type=Path, default=None, help="a completed card.json to use")
    imported.add_argument("--id", dest="model_id", default=None, help="model id (a-z 0-9 . _ -)")
    imported.add_argument(
        "--labels",
        nargs="+",
        default=None,
        metavar="VALUE:NAME:R,G,B",
        help='output labels, e.g. "1:Tumour:1,0,0" (colour 0..1, optional)',
    )
    imported.add_argument("--spacing", nargs=3, type=float, default=None, metavar=("X", "Y", "Z"))
    imported.add_argument(
        "--patch", nargs=3, type=int, default=None, metavar=("Z", "Y", "X"), help="patch size"
    )
    imported.add_argument("--overlap", type=float, default=None, help="tile overlap (0..1)")
    imported.add_argument("--contrasts", nargs="+", default=None, help="input contrasts, e.g. T1w")
    imported.add_argument("--normalization", choices=("percentile", "zscore", "none"), default=None)
    imported.add_argument("--orientation", default=None, help="axis letters, e.g. RAS")
    imported.add_argument("--task", default=None, help="segmentation (default), denoising, ...")
    imported.add_argument("--version", dest="model_version", default=None)
    imported.add_argument("--license", default=None, help="licence of the weights")
    imported.add_argument("--force", action="store_true", help="replace a cached model")
    imported.set_defaults(handler=run_import)

    verify = commands.add_parser("verify", help="check a model's weights size and sha256")
    verify.add_argument("model", help="model id or model folder")
    verify.set_defaults(handler=run_verify)


def _store():
    from deepmri.models import ModelStore

    return ModelStore()


def run_list(arguments: argparse.Namespace) -> int:
    rows = _store().list()
    if arguments.json:
        print(
            json.dumps(
                [
                    {
                        "id": r.id,
                        "task": r.task,
                        "part_of": r.card.part_of if r.card is not None else "",
                        "version": r.version,
                        "license": r.license,
                        "source": r.source,
                        "status": r.status,
                        "path": str(r.path),
                    }
                    for r in rows
                ],
                indent=2,
            )
        )
        return 0
    if not rows:
        print("No models found. Add one with 'deepmri models fetch' or 'deepmri models import'.")
        return 0
    table = [("ID", "TASK", "VERSION", "LICENCE", "SOURCE", "STATUS")]
    table += [(r.id, r.task_text, r.version, r.license, r.source, r.status) for r in rows]
    print(format_table(table))
    return 0


def format_table(rows: list[tuple[str, ...]]) -> str:
    """Left-aligned columns two spaces apart; the last column is never padded."""
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [str(cell).ljust(width) for cell, width in zip(row, widths, strict=False)]
        lines.append("  ".join([*cells, str(row[-1])]).rstrip())
    return "\n".join(lines)


def run_info(arguments: argparse.Namespace) -> int:
    from deepmri.models import measuring_commands, metric_comparison

    model = _store().get(arguments.model)
    card = model.card
    if arguments.json:
        print(json.dumps(card.to_dict(), indent=2))
        return 0
    weights = card.weights
    lines = [
        f"{card.id} {card.version} ({card.task})",
        f"  folder:         {model.path}",
    ]
    if card.description:
        lines.append(f"  description:    {card.description}")
    lines += [
        f"  architecture:   {card.architecture['name']}",
        f"  input:          {', '.join(map(str, card.input['contrasts']))} "
        f"({card.input['channels']} channel(s))",
        f"  spacing (mm):   {' x '.join(f'{v:g}' for v in card.spacing)}, "
        f"orientation {card.preprocessing.get('orientation', 'RAS')}, "
        f"normalization {card.preprocessing['normalization'].get('method')}",
        f"  patch size:     {' x '.join(map(str, card.patch_size))}, "
        f"overlap {card.inference.get('overlap')}, flips {card.inference.get('flips')}",
        f"  postprocessing: {', '.join(card.postprocessing) or 'none'}",
        "  labels:",
    ]
    lines += [
        f"    {label.value:>3}  {label.name}  rgb({', '.join(f'{c:g}' for c in label.color)})"
        for label in card.labels
    ]
    lines.append("  metrics:" if card.metrics else "  metrics:        none reported")
    for metric in card.metrics:
        line = f"    {metric['name']} = {metric['value']:g} on {metric['dataset']}"
        if comparison := metric_comparison(metric):
            line += f"  (beside: {comparison})"
        lines.append(line)
    lines += [f"    measured by: {command}" for command in measuring_commands(card.metrics)]
    if card.training:
        lines.append(f"  training:       {json.dumps(card.training)}")
    lines += [
        f"  licence:        {card.license}",
        f"  citation:       {card.citation or 'none'}",
        f"  weights:        {weights['file']} ({weights.get('format', 'safetensors')}, "
        f"{weights['size']} bytes, sha256 {weights['sha256']})",
    ]
    print("\n".join(lines))
    return 0


def run_fetch(arguments: argparse.Namespace) -> int:
    from deepmri.models.fetch import fetch_model

    model = fetch_model(
        arguments.url,
        _store().cache,
        sha256=arguments.sha256,
        model_id=arguments.model_id,
        force=arguments.force,
        retries=arguments.retries,
        progress=TextProgress(),
    )
    print(f"Installed '{model.card.id}' {model.card.version} in {model.path} (sha256 verified).")
    return 0


def run_import(arguments: argparse.Namespace) -> int:
    from deepmri.models.importers import CardNeeded, import_model

    overrides = card_overrides(arguments)
    try:
        model = import_model(
            arguments.source,
            _store().cache,
            card=arguments.card,
            model_id=arguments.model_id,
            overrides=overrides,
            force=arguments.force,
        )
    except CardNeeded as error:
        from deepmri.models.importers import missing_fields

        missing = missing_fields(error.draft) or ["labels", "preprocessing.spacing"]
        options = sorted({_option_for(name) for name in missing})
        raise CardError(
            f"{arguments.source.name} needs a card: give {', '.join(options)} (or --card "
            f"card.json); still missing: {', '.join(missing)}."
        ) from None
    print(f"Imported '{model.card.id}' into {model.path} (sha256 {model.card.weights['sha256']}).")
    return 0


def _option_for(field_name: str) -> str:
    for prefix, option in _OPTION_FOR_FIELD.items():
        if field_name == prefix or field_name.startswith((prefix + ".", prefix + "[")):
            return option
    return "--card"


def card_overrides(arguments: argparse.Namespace) -> dict[str, Any]:
    """The card fields given as options, nested as in card.json."""
    overrides: dict[str, Any] = {}
    if arguments.labels:
        overrides["labels"] = [parse_label(text) for text in arguments.labels]
    if arguments.spacing:
        overrides.setdefault("preprocessing", {})["spacing"] = list(arguments.spacing)
    if arguments.orientation:
        overrides.setdefault("preprocessing", {})["orientation"] = arguments.orientation.upper()
    if arguments.normalization:
        overrides.setdefault("preprocessing", {})["normalization"] = {
            "method": arguments.normalization
        }
    if arguments.patch:
        overrides.setdefault("inference", {})["patch_size"] = list(arguments.patch)
    if arguments.overlap is not None:
        overrides.setdefault("inference", {})["overlap"] = arguments.overlap
    if arguments.contrasts:
        overrides["input"] = {
            "contrasts": list(arguments.contrasts),
            "channels": len(arguments.contrasts),
        }
    for key, value in (
        ("task", arguments.task),
        ("version", arguments.model_version),
        ("license", arguments.license),
    ):
        if value:
            overrides[key] = value
    return overrides


_DEFAULT_COLOURS = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]


def parse_label(text: str) -> dict[str, Any]:
    """'1:Tumour:1,0,0' -> {"value": 1, "name": "Tumour", "color": [1, 0, 0]} (colour optional)."""
    parts = text.split(":")
    if len(parts) not in (2, 3) or not parts[0].strip().isdigit() or not parts[1].strip():
        raise CardError(
            f"--labels '{text}' must be VALUE:NAME or VALUE:NAME:R,G,B, e.g. '1:Tumour:1,0,0'."
        )
    value = int(parts[0])
    color = _DEFAULT_COLOURS[(value - 1) % len(_DEFAULT_COLOURS)]
    if len(parts) == 3:
        try:
            color = [float(c) for c in parts[2].split(",")]
        except ValueError:
            raise CardError(
                f"--labels '{text}': the colour must be three numbers 0..1, e.g. 1,0,0."
            ) from None
    return {"value": value, "name": parts[1].strip(), "color": color}


def run_verify(arguments: argparse.Namespace) -> int:
    model = _store().get(arguments.model)
    model.verify()
    weights = model.card.weights
    print(
        f"{model.card.id}: OK, {weights['file']} is {weights['size']} bytes with sha256 "
        f"{weights['sha256']} as its card says."
    )
    return 0

"""`deepmri segment INPUT -o OUTPUT`: brain extraction or tissue classes for one scan."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from deepmri.cli.progress_bar import TextProgress
from deepmri.io import read_image, write_image


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "segment",
        help="segment a brain MRI (brain mask or CSF/GM/WM)",
        description="Segment a 3D brain MRI of any contrast; the labels are written on the exact input grid.",
    )
    parser.add_argument("input", type=Path, help="NIfTI/NRRD/MHA file or DICOM folder")
    parser.add_argument("-o", "--output", type=Path, required=True, help="label map to write")
    parser.add_argument("--model", default="brain-tissue", help="model id (default: brain-tissue)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 or mps (default: best)")
    parser.add_argument(
        "--probabilities", type=Path, default=None, help="folder for per-label probability maps"
    )
    parser.add_argument(
        "--uncertainty", type=Path, default=None, help="file for the test-time-flip uncertainty map"
    )
    parser.set_defaults(handler=run)


def run(arguments: argparse.Namespace) -> int:
    from deepmri.tasks.segment import segment

    image = read_image(arguments.input)
    result = segment(
        image,
        arguments.model,
        device=arguments.device,
        probabilities=arguments.probabilities is not None,
        uncertainty=arguments.uncertainty is not None,
        progress=TextProgress(),
    )
    write_image(result.labels, arguments.output)
    if result.probabilities:
        for name, probability in result.probabilities.items():
            file_name = name.lower().replace(" ", "-") + ".nii.gz"
            write_image(probability, arguments.probabilities / file_name)
    if result.uncertainty is not None:
        write_image(result.uncertainty, arguments.uncertainty)
    summary = {
        "output": str(arguments.output),
        "model": result.model_id,
        "volumes_ml": {k: round(v, 1) for k, v in result.volumes_ml().items()},
    }
    print(json.dumps(summary))
    return 0

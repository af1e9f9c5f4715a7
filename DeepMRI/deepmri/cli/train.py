"""`deepmri train segment`: train the shipped segmentation models from synthetic data.

Runs the recipe in deepmri.train.segment under a wall-clock budget, resumable, and exports the best
weights with their model card.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model from synthetic data (needs the 'train' extra)"
    )
    tasks = parser.add_subparsers(dest="train_task", metavar="TASK")
    segment = tasks.add_parser("segment", help="brain-extraction or brain-tissue segmentation")
    segment.add_argument("--model", required=True, choices=["brain-extraction", "brain-tissue"])
    segment.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, log)")
    segment.add_argument("--minutes", type=float, default=30.0, help="wall-clock training budget")
    segment.add_argument("--seed", type=int, default=0)
    segment.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    segment.add_argument("--iterations", type=int, default=None, help="stop after N iterations")
    segment.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    segment.add_argument("--workers", type=int, default=1, help="data generation processes")
    segment.add_argument("--cache", type=Path, default=None, help="label-map cache (OUT/cache)")
    segment.add_argument(
        "--export", type=Path, default=None, help="write card.json + weights here when done"
    )
    segment.add_argument(
        "--export-only", action="store_true", help="only export OUT's best weights to --export"
    )
    segment.set_defaults(handler=_segment)
    parser.set_defaults(handler=lambda arguments: parser.print_help() or 1)


def _segment(arguments: argparse.Namespace) -> int:
    from deepmri.train.segment import export, train

    if not arguments.export_only:
        command = shlex.join(["deepmri", *sys.argv[1:]])
        state = train(
            arguments.model,
            arguments.out,
            arguments.minutes,
            arguments.seed,
            resume=arguments.resume,
            cache_dir=arguments.cache,
            max_iterations=arguments.iterations,
            threads=arguments.threads,
            workers=arguments.workers,
            command=command,
        )
        print(f"trained {state['iteration']} iterations; best validation Dice {state['best']:.4f}")
    if arguments.export:
        card = export(arguments.out, arguments.export)
        print(f"exported {card['id']} to {arguments.export} ({card['weights']['size']} bytes)")
    return 0

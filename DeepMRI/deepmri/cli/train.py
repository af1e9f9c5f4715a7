"""`deepmri train segment|sources|synthesize|superresolve`: train the shipped models.

`segment` runs the recipe in deepmri.train.segment (`sources` writes its label maps to one file
for a machine that cannot build them, such as a lent GPU machine), `synthesize` the pix2pix recipe in
deepmri.train.synthesize (simulated pairs, or a site's own with --source-dir/--target-dir;
--unpaired: CycleGAN in deepmri.train.synthesize_unpaired),
`superresolve` the thick-to-thin recipe in deepmri.train.superresolve (MNI152 and the pydeface
head made thick); all are resumable and export the best weights with their model card.
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
    segment.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="run length: the learning-rate schedule and validation points follow it (reproducible)",
    )
    segment.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="wall-clock limit (stops early; schedule follows it only without --iterations)",
    )
    segment.add_argument("--seed", type=int, default=0)
    segment.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    segment.add_argument(
        "--init-from",
        type=Path,
        default=None,
        metavar="MODEL_DIR_OR_CHECKPOINT",
        help="warm start: a model folder (card.json + weights) or a checkpoint.pt / best.pt",
    )
    segment.add_argument("--lr", type=float, default=None, help="peak learning rate")
    segment.add_argument("--warmup", type=int, default=0, help="linear warm-up iterations")
    segment.add_argument(
        "--validation-size", type=int, default=24, help="fixed synthetic validation images"
    )
    segment.add_argument("--validate-every", type=int, default=250, help="iterations")
    segment.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (faster only with AMX/AVX-512)"
    )
    segment.add_argument(
        "--bias-max",
        type=float,
        default=None,
        help="widest bias field of the synthetic images (log-amplitude; recipe default 0.5)",
    )
    segment.add_argument(
        "--csf-variation",
        type=float,
        default=None,
        metavar="MM",
        help="how much the synthetic CSF rim's thickness may vary around the brain (mm; "
        "recipe default 0: a rim of one width per image)",
    )
    segment.add_argument(
        "--mni152-head-share",
        type=float,
        default=None,
        metavar="P",
        help="share of whole-head images drawn from FSL's MNI152 head instead of pydeface's "
        "(recipe default 0)",
    )
    segment.add_argument(
        "--spacing",
        type=float,
        default=None,
        metavar="MM",
        help="train on a grid of this voxel size, same field of view (recipe default: "
        "brain-extraction 2 mm, brain-tissue 1 mm); the card's spacing and patch follow it",
    )
    segment.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="validate, keep and export a moving average of the weights with this decay per step "
        "(e.g. 0.998; 0: off, the trained weights themselves)",
    )
    segment.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    segment.add_argument("--workers", type=int, default=1, help="data generation processes")
    segment.add_argument(
        "--device", default="cpu", help="where the network steps: cpu (default) or cuda"
    )
    segment.add_argument("--cache", type=Path, default=None, help="label-map cache (OUT/cache)")
    segment.add_argument(
        "--sources",
        type=Path,
        default=None,
        metavar="FILE",
        help="train from a `deepmri train sources` file instead of building the label maps "
        "(no SimpleITK, nilearn or download needed: a GPU machine)",
    )
    segment.add_argument(
        "--export", type=Path, default=None, help="write card.json + weights here when done"
    )
    segment.add_argument(
        "--export-only", action="store_true", help="only export OUT's best weights to --export"
    )
    segment.set_defaults(handler=_segment)
    sources = tasks.add_parser(
        "sources", help="write a segmentation recipe's label maps to one file (for another machine)"
    )
    sources.add_argument("--model", required=True, choices=["brain-extraction", "brain-tissue"])
    sources.add_argument("--out", required=True, type=Path, help="the .npz file to write")
    sources.add_argument("--cache", type=Path, default=Path("runs/cache"), help="label-map cache")
    sources.set_defaults(handler=_sources)
    _add_synthesize(tasks)
    _add_superresolve(tasks)
    parser.set_defaults(handler=lambda arguments: parser.print_help() or 1)


def _command_line() -> str:
    """The command as typed, for the card's record of how its weights were made."""
    return shlex.join(["deepmri", *sys.argv[1:]])


def _segment(arguments: argparse.Namespace) -> int:
    from deepmri.train.segment import export, train

    if not arguments.export_only:
        if arguments.iterations is None and arguments.minutes is None:
            arguments.minutes = 30.0
        command = _command_line()
        state = train(
            arguments.model,
            arguments.out,
            arguments.minutes,
            arguments.seed,
            resume=arguments.resume,
            cache_dir=arguments.cache,
            sources_file=arguments.sources,
            max_iterations=arguments.iterations,
            init_from=arguments.init_from,
            learning_rate=arguments.lr,
            warmup=arguments.warmup,
            validation_size=arguments.validation_size,
            validation_every=arguments.validate_every,
            bf16=arguments.bf16,
            threads=arguments.threads,
            workers=arguments.workers,
            command=command,
            device=arguments.device,
            ema=arguments.ema,
            recipe_overrides=_recipe_overrides(arguments),
        )
        print(f"trained {state['iteration']} iterations; best validation Dice {state['best']:.4f}")
    if arguments.export:
        card = export(arguments.out, arguments.export)
        print(f"exported {card['id']} to {arguments.export} ({card['weights']['size']} bytes)")
    return 0


def _sources(arguments: argparse.Namespace) -> int:
    from deepmri.train.labels import build_sources, save_sources

    path = save_sources(build_sources(arguments.cache, arguments.model), arguments.out)
    print(f"wrote the {arguments.model} label maps to {path} ({path.stat().st_size >> 20} MB)")
    return 0


def _recipe_overrides(arguments: argparse.Namespace) -> dict[str, object] | None:
    """The generator settings and grid given on the command line (None: the recipe's own)."""
    overrides = {
        name: value
        for name, value in (
            ("bias_max", arguments.bias_max),
            ("csf_variation_max", arguments.csf_variation),
            ("mni152_head_share", arguments.mni152_head_share),
        )
        if value is not None
    }
    if arguments.spacing is not None:
        from deepmri.train.segment import RECIPES, grid_at

        overrides |= grid_at(RECIPES[arguments.model], arguments.spacing)
    return overrides or None


def _add_synthesize(tasks: argparse._SubParsersAction) -> None:
    synthesize = tasks.add_parser(
        "synthesize", help="contrast synthesis (pix2pix on simulated pairs)"
    )
    synthesize.add_argument(
        "--source",
        default="T1w",
        choices=["T1w", "T2w", "FLAIR", "any"],
        help="input contrast; 'any': random contrast and resolution per subject (SynthSR idea)",
    )
    synthesize.add_argument("--target", default="T2w", choices=["T1w", "T2w", "FLAIR", "PDw"])
    synthesize.add_argument("--out", type=Path, required=True, help="run folder")
    synthesize.add_argument("--minutes", type=float, default=60.0, help="wall-clock budget")
    synthesize.add_argument("--seed", type=int, default=0)
    synthesize.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    synthesize.add_argument("--resume", action="store_true", help="continue from OUT's checkpoint")
    synthesize.add_argument(
        "--adversarial-weight",
        type=float,
        default=None,
        help="paired: 0 trains with L1 only (default 0.01); unpaired: default 1",
    )
    synthesize.add_argument(
        "--cosine-after", type=float, default=0.5, help="share of the budget before the LR decays"
    )
    synthesize.add_argument("--lr", type=float, default=1e-3, help="peak learning rate")
    synthesize.add_argument(
        "--mse-weight", type=float, default=0.0, help="loss = L1 + this x MSE (0: L1 only)"
    )
    synthesize.add_argument(
        "--select",
        choices=["mae", "psnr"],
        default="mae",
        help="validation figure that picks the kept weights",
    )
    synthesize.add_argument(
        "--init-from",
        type=Path,
        help="start the generator from these weights (a run's .pt or a model folder)",
    )
    synthesize.add_argument(
        "--loss-inside-brain",
        action="store_true",
        help="compute the loss on brain voxels only (the task sets the outside to 0)",
    )
    synthesize.add_argument(
        "--tissue-prior",
        action="store_true",
        help="give the network the per-tissue prior as a second channel and learn a correction",
    )
    synthesize.add_argument(
        "--prior-subjects",
        type=int,
        default=3,
        help="training subjects the prior's tissue table is fitted on (least squares)",
    )
    synthesize.add_argument(
        "--iterations",
        type=int,
        default=None,
        help="run length in iterations (the schedule follows it; --minutes still stops early)",
    )
    synthesize.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (faster only with AMX/AVX-512)"
    )
    synthesize.add_argument("--validation-subjects", type=int, default=4)
    synthesize.add_argument("--validate-every", type=int, default=50, help="iterations")
    synthesize.add_argument(
        "--channels", type=int, nargs="+", help="generator UNet channels per level (8 16 32 64)"
    )
    synthesize.add_argument("--export", type=Path, help="write the best weights as a model folder")
    synthesize.add_argument("--model-version", default="0.1.0", help="the exported card's version")
    synthesize.add_argument("--source-dir", type=Path, help="a site's own inputs (brain-only)")
    synthesize.add_argument(
        "--target-dir", type=Path, help="their co-registered targets, same file names"
    )
    synthesize.add_argument(
        "--register",
        nargs="?",
        const="affine",
        choices=["rigid", "affine", "deformable"],
        help="align each source onto its target with the registration task first (affine)",
    )
    synthesize.add_argument(
        "--unpaired",
        action="store_true",
        help="CycleGAN on --source-dir / --target-dir volumes that are not pairs",
    )
    synthesize.add_argument(
        "--cycle-weight", type=float, default=10.0, help="unpaired: weight of the cycle L1"
    )
    synthesize.add_argument(
        "--identity-weight", type=float, default=0.0, help="unpaired: identity L1 (0: none)"
    )
    synthesize.set_defaults(handler=_synthesize)


def _synthesize(arguments: argparse.Namespace) -> int:
    from deepmri.train.synthesize_recipe import run_recipe

    run_recipe(
        arguments.source,
        arguments.target,
        arguments.out,
        minutes=arguments.minutes,
        seed=arguments.seed,
        threads=arguments.threads,
        resume=arguments.resume,
        adversarial_weight=arguments.adversarial_weight,
        cosine_after=arguments.cosine_after,
        learning_rate=arguments.lr,
        mse_weight=arguments.mse_weight,
        select=arguments.select,
        init_from=arguments.init_from,
        loss_inside_brain=arguments.loss_inside_brain,
        tissue_prior=arguments.tissue_prior,
        prior_subjects=arguments.prior_subjects,
        iterations=arguments.iterations,
        bf16=arguments.bf16,
        validation_subjects=arguments.validation_subjects,
        validate_every=arguments.validate_every,
        channels=arguments.channels,
        export=arguments.export,
        version=arguments.model_version,
        source_dir=arguments.source_dir,
        target_dir=arguments.target_dir,
        register=arguments.register,
        unpaired=arguments.unpaired,
        cycle_weight=arguments.cycle_weight,
        identity_weight=arguments.identity_weight,
        command=_command_line(),
    )
    return 0


def _add_superresolve(tasks: argparse._SubParsersAction) -> None:
    superresolve = tasks.add_parser(
        "superresolve", help="thick-to-thin super-resolution (MNI152 and the pydeface head)"
    )
    superresolve.add_argument("--out", type=Path, required=True, help="run folder")
    superresolve.add_argument(
        "--iterations", type=int, default=1500, help="run length (the schedule follows it)"
    )
    superresolve.add_argument(
        "--minutes", type=float, default=None, help="wall-clock limit (stops early)"
    )
    superresolve.add_argument("--seed", type=int, default=0)
    superresolve.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    superresolve.add_argument(
        "--resume", action="store_true", help="continue from OUT's checkpoint"
    )
    superresolve.add_argument("--width", type=int, default=16, help="network channels")
    superresolve.add_argument("--depth", type=int, default=7, help="network layers")
    superresolve.add_argument("--batch", type=int, default=4, help="patches per step")
    superresolve.add_argument("--lr", type=float, default=3e-4, help="peak learning rate")
    superresolve.add_argument(
        "--warmup", type=int, default=50, help="iterations of linear learning-rate warm-up"
    )
    superresolve.add_argument("--loss", default="mse", choices=["mse", "l1"])
    superresolve.add_argument(
        "--bf16", action="store_true", help="bfloat16 autocast (faster only with AMX/AVX-512)"
    )
    superresolve.add_argument(
        "--ema",
        type=float,
        default=0.0,
        help="keep and export a moving average of the weights with this decay per step (0: off)",
    )
    superresolve.add_argument(
        "--profile-channel",
        action="store_true",
        help="give the network the slice profile's shape (Gaussian or rect) as an input",
    )
    superresolve.add_argument(
        "--rect-share", type=float, default=0.5, help="share of patches with a rect profile"
    )
    superresolve.add_argument(
        "--elastic",
        type=float,
        default=0.0,
        help="bend each patch by a smooth random field of up to this many voxels (0: off)",
    )
    superresolve.add_argument(
        "--shelled-heads",
        type=int,
        default=0,
        help="also train on this many whole heads made of MNI152's brain in synthetic layers",
    )
    superresolve.add_argument(
        "--init-from",
        type=Path,
        default=None,
        help="start from this model folder's weights (new input channels start at zero)",
    )
    superresolve.add_argument("--validation-patches", type=int, default=32)
    superresolve.add_argument("--validate-every", type=int, default=100, help="iterations")
    superresolve.add_argument(
        "--cache", type=Path, default=None, help="where the pydeface head is cached (OUT/cache)"
    )
    superresolve.add_argument(
        "--export", type=Path, help="write the best weights as a model folder"
    )
    superresolve.add_argument(
        "--export-only", action="store_true", help="only export OUT's best weights to --export"
    )
    superresolve.add_argument(
        "--model-version", default="0.1.0", help="the exported card's version"
    )
    superresolve.set_defaults(handler=_superresolve)


def _superresolve(arguments: argparse.Namespace) -> int:
    from deepmri.train.superresolve import run_recipe

    state = run_recipe(
        arguments.out,
        iterations=arguments.iterations,
        minutes=arguments.minutes,
        seed=arguments.seed,
        threads=arguments.threads,
        resume=arguments.resume,
        width=arguments.width,
        depth=arguments.depth,
        batch_size=arguments.batch,
        learning_rate=arguments.lr,
        warmup=arguments.warmup,
        loss=arguments.loss,
        bf16=arguments.bf16,
        ema=arguments.ema,
        profile_channel=arguments.profile_channel,
        rect_share=arguments.rect_share,
        elastic=arguments.elastic,
        shelled_heads=arguments.shelled_heads,
        init_from=arguments.init_from,
        validation_patches=arguments.validation_patches,
        validate_every=arguments.validate_every,
        cache_dir=arguments.cache,
        export_to=arguments.export,
        export_only=arguments.export_only,
        command=_command_line(),
        version=arguments.model_version,
    )
    if state:
        print(f"trained {state['iteration']} iterations; best validation gain {state['best']}")
    return 0

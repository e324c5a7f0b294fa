"""``medfusion evaluate --task segment|register``: the command-line options and the dispatch.

The protocols and their Python functions live in :mod:`medfusion.apps.evaluate_segment`
(:func:`~medfusion.apps.evaluate_segment.evaluate_segment`) and :mod:`medfusion.apps.evaluate_register`
(:func:`~medfusion.apps.evaluate_register.evaluate_register`); the shared engine and outputs in
:mod:`medfusion.apps.downstream`. Both write ``OUT/cases.csv``, ``OUT/summary.json``, ``OUT/report.md`` (and
figures) on global rank 0 and, for ``--split test``, one line to ``OUT/test_log.jsonl`` and ``--test-log``. Training
reads only the manifest's ``training`` split; choices (augmentation strength, steps) belong on
``--split validation``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def run_downstream(args) -> int:
    """``medfusion evaluate --task segment|register`` (exit codes: :mod:`medfusion.exit_codes`)."""
    import shlex
    import sys

    from medfusion.apps.downstream import Launch, is_writer  # torch: imported only when the command runs
    from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK

    launch = Launch(args.accelerator, args.devices, args.num_nodes, args.strategy)
    deformer = {"elastic_magnitude": tuple(args.elastic_magnitude), "elastic_spacing": args.elastic_spacing,
                "bspline_sigma": args.bspline_sigma, "drdm_t_range": tuple(args.drdm_t_range),
                "drdm_steps": args.drdm_steps}  # fmt: skip
    common = dict(split=args.split, seeds=args.seeds, copies=args.copies, train_steps=args.train_steps,
                  train_batch=args.train_batch, roi_size=args.roi_size, hu_window=args.hu_window, deformer=deformer,
                  launch=launch, seed=args.seed, n_boot=args.n_boot, test_logs=[args.test_log] if args.test_log else [],
                  command=shlex.join(["medfusion", *sys.argv[1:]]) if sys.argv[1:2] == ["evaluate"] else None,
                  overwrite=args.overwrite, log=None if args.quiet else print)  # fmt: skip
    if args.channels:
        common["channels"] = args.channels
    if args.task == "segment" and args.roi_size is None:
        common.pop("roi_size")
    try:
        if args.task == "segment":
            from medfusion.apps.evaluate_segment import evaluate_segment

            summary = evaluate_segment(args.manifest, args.output, augmentations=args.augment or ["none"],
                                       fractions=args.fractions, lr=args.lr or 2e-3, **common)  # fmt: skip
        else:
            from medfusion.apps.evaluate_register import evaluate_register

            summary = evaluate_register(args.manifest, args.output, pairs=args.augment or ["real"],
                                        lr=args.lr or 1e-3, smooth_weight=args.smooth_weight,
                                        supervised_weight=args.supervised_weight, **common)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medfusion evaluate: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if is_writer():
        print(f"wrote {Path(args.output) / 'report.md'} (summary.json, cases.csv, figures/); "
              f"{len(summary['results'])} results")  # fmt: skip
    return EXIT_OK


def add_downstream_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the downstream tasks (``segment``, ``register``)."""
    g = parser.add_argument_group("downstream tasks (--task segment / register)")
    g.add_argument("--augment", action="append", default=[], metavar="NAME",
                   help="segment: none, elastic, drdm-random, drdm:DIR (repeatable; default none); "
                        "register: training pairs real, bspline, drdm-random, drdm:DIR, or A+B")  # fmt: skip
    g.add_argument("--fractions", type=float, nargs="+", default=[0.05, 0.2, 1.0],
                   help="labelled fractions of the training cases (segment; default 0.05 0.2 1.0)")  # fmt: skip
    g.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    g.add_argument("--copies", type=int, default=8, help="deformed copies per training case (default 8)")
    g.add_argument("--train-steps", type=int, default=1000, help="optimiser steps per run (default 1000)")
    g.add_argument("--train-batch", type=int, default=8, help="global training batch (default 8)")
    g.add_argument("--lr", type=float, default=None, help="learning rate (segment 2e-3, register 1e-3)")
    g.add_argument("--channels", type=int, nargs="+", default=None, help="network widths per level")
    g.add_argument("--roi-size", type=int, nargs="+", default=None, help="3D training patch (default: whole)")
    g.add_argument(
        "--hu-window", type=float, nargs=2, default=[-1000.0, 1000.0], help="HU window of the images"
    )
    g.add_argument("--elastic-magnitude", type=float, nargs=2, default=[2.0, 4.0],
                   help="MONAI elastic magnitude range: 2D voxels (2 4); 3D a factor on smoothed noise (at 64³ with sigma 20, 200 400 gave a mean |u| of 0.34 voxels); "
        "choose on --split validation")  # fmt: skip
    g.add_argument(
        "--elastic-spacing",
        type=float,
        default=20.0,
        help="elastic control spacing (2D) / smoothing sigma (3D), voxels",
    )
    g.add_argument("--bspline-sigma", type=float, default=4.0, help="B-spline coefficient SD, voxels")
    g.add_argument("--drdm-t-range", type=int, nargs=2, default=[40, 48], help="DRDM level range T'")
    g.add_argument("--drdm-steps", type=int, default=8, help="DRDM recovery steps")
    g.add_argument("--smooth-weight", type=float, default=1.0, help="register: smoothness weight (default 1)")
    g.add_argument("--supervised-weight", type=float, default=1.0,
                   help="register: weight of the known-field error on synthetic pairs (default 1)")  # fmt: skip
    g.add_argument(
        "--accelerator", default="cpu", choices=("cpu", "gpu", "auto"), help="training accelerator"
    )
    g.add_argument("--devices", type=int, default=1, help="devices per node (DDP when > 1)")
    g.add_argument("--num-nodes", type=int, default=1, help="nodes (DDP)")
    g.add_argument(
        "--strategy", default="auto", choices=("auto", "ddp", "ddp_spawn"), help="Lightning strategy"
    )

"""``medfusion make-data``: write the built-in phantom dataset (CT protocols, labels, manifests).

The command line of :func:`medfusion.data.builtin.make_dataset`. Exit status (:mod:`medfusion.exit_codes`):
0 written (or already there: a rerun with the same parameters resumes); 2 on bad arguments or a folder that holds
a dataset made with other parameters (use ``--overwrite`` or another folder).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``medfusion make-data``."""
    if parser.epilog is None:
        parser.epilog = EXIT_CODES_HELP
    parser.add_argument("--output", "-o", required=True, help="dataset folder")
    parser.add_argument("--patients", type=int, default=24, help="number of phantom patients (default 24)")
    parser.add_argument(
        "--dim", type=int, choices=(2, 3), default=2, help="2D slices or 3D volumes (default 2)"
    )
    parser.add_argument(
        "--size", type=int, default=128, help="in-plane matrix size (default 128; FOV 400 mm)"
    )
    parser.add_argument("--depth", type=int, default=None, help="slices per 3D volume (default: --size)")
    parser.add_argument("--protocols", default=None, help="comma-separated protocol names (default: all)")
    parser.add_argument(
        "--dicom", action="store_true", help="also write DICOM series (dicom/<case>/<protocol>/)"
    )
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    parser.add_argument("--split", default="0.7,0.15,0.15", help="train,val,test fractions by patient")
    parser.add_argument("--overwrite", action="store_true", help="regenerate existing files")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Write the dataset and print one manifest path per task. Returns an exit status."""
    from medfusion.apps.volume_args import one_line
    from medfusion.data.builtin import make_dataset

    try:
        if Path(args.output).exists() and not Path(args.output).is_dir():
            raise ValueError(f"--output {args.output} is a file, not a folder")
        split = tuple(float(v) for v in str(args.split).split(","))
        protocols = [p.strip() for p in args.protocols.split(",") if p.strip()] if args.protocols else None
        manifests = make_dataset(
            args.output,
            n_patients=args.patients,
            dim=args.dim,
            size=args.size,
            depth=args.depth,
            protocols=protocols,
            dicom=args.dicom,
            seed=args.seed,
            split=split,
            overwrite=args.overwrite,
            progress=not args.no_progress,
        )
    except (OSError, ValueError) as err:  # OSError: FileExistsError, PermissionError
        print(f"medfusion make-data: {one_line(err)}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    for task, path in manifests.items():
        print(f"{task:12s} {path}")
    return EXIT_OK

"""``medfusion manifest DIR``: a Decathlon-style datalist from the output of ``medfusion convert``.

The command line of :func:`medfusion.data.manifest.build_manifest_from_converted` (series paired by a sidecar
field, split by patient) and :func:`medfusion.data.manifest.write_manifest`. Exit status
(:mod:`medfusion.exit_codes`): 0 written; 2 when the manifest cannot be built or written (bad input, an
existing manifest without ``--overwrite``): nothing is written then.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from medfusion.data.manifest import TASK_KEYS

    if parser.epilog is None:
        parser.epilog = EXIT_CODES_HELP
    parser.add_argument("directory", help="folder written by `medfusion convert` (NIfTI + JSON sidecars)")
    parser.add_argument("--task", required=True, choices=sorted(TASK_KEYS), help="task whose keys to write")
    parser.add_argument(
        "--group-by", default="ConvolutionKernel", help="sidecar field that defines protocols"
    )
    parser.add_argument("--standard", default=None, help="the standard protocol value (default: most common)")
    parser.add_argument(
        "--split", nargs=3, type=float, default=(0.7, 0.15, 0.15), metavar=("TRAIN", "VAL", "TEST")
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the patient-level split")
    parser.add_argument(
        "--output", default=None, help="manifest path (.json or .csv; default DIR/manifest.json)"
    )
    parser.add_argument("--overwrite", action="store_true", help="replace an existing manifest")
    parser.add_argument(
        "--allow-outside",
        action="store_true",
        help="allow --output outside DIR (writes ../ paths; load with allow_outside=True)",
    )


def run(args: argparse.Namespace) -> int:
    """Build and write the manifest; print its path and split sizes. Returns an exit status."""
    from medfusion.data.manifest import ManifestError, build_manifest_from_converted, write_manifest

    try:
        manifest = build_manifest_from_converted(
            args.directory,
            task=args.task,
            group_by=args.group_by,
            standard=args.standard,
            split=tuple(args.split),
            seed=args.seed,
        )
        output = Path(args.output) if args.output else Path(args.directory) / "manifest.json"
        write_manifest(
            output,
            manifest.splits,
            task=args.task,
            name=manifest.name,
            description=manifest.description,
            overwrite=args.overwrite,
            allow_outside=args.allow_outside,
        )
    except (ManifestError, FileExistsError) as e:
        print(f"medfusion manifest: {e}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    sizes = ", ".join(f"{s}: {len(v)}" for s, v in manifest.splits.items())
    print(f"wrote {output} ({sizes})")
    return EXIT_OK

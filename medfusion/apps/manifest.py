"""``medfusion manifest DIR``: a Decathlon-style datalist from the output of ``medfusion convert``.

The command line of :func:`medfusion.data.from_converted.build_manifest_from_converted` (protocols told apart by
their acquisition, series paired within each study, split by patient) and
:func:`medfusion.data.manifest.write_manifest`. It prints the standard protocol, the target taken for each study
and every series left out of the pairs with the reason; a JSON manifest also records them (``targets``,
``excluded``; MONAI ignores these keys). Exit status
(:mod:`medfusion.exit_codes`): 0 written; 2 when the manifest cannot be built or written (bad input, an
existing manifest without ``--overwrite``): nothing is written then.
"""

from __future__ import annotations

import argparse
import os
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
        "--group-by",
        default="acquisition",
        help="what defines a protocol: 'acquisition' (kernel, slice thickness, kV, exposure, tube current, "
        "series description; the default) or comma-separated sidecar fields, e.g. ConvolutionKernel",
    )
    parser.add_argument(
        "--standard",
        default=None,
        help="the standard protocol: its label or text found in one label, e.g. B30f (default: most common)",
    )
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


def _relative_extra(extra: dict, folder: Path) -> dict:
    """The build record with paths relative to the manifest's folder (as the entries are written)."""

    def rel(path: str) -> str:
        return Path(os.path.relpath(path, folder)).as_posix()

    return {
        "standard": extra.get("standard"),
        "group_by": extra.get("group_by"),
        "targets": [{**t, "target": rel(t["target"])} for t in extra.get("targets", [])],
        "excluded": [{**e, "series": rel(e["series"])} for e in extra.get("excluded", [])],
    }


def run(args: argparse.Namespace) -> int:
    """Build and write the manifest; print its path, split sizes, targets and excluded series. Returns an exit
    status."""
    from medfusion.apps.volume_args import one_line
    from medfusion.data.manifest import ManifestError, build_manifest_from_converted, write_manifest

    try:
        if not Path(args.directory).is_dir():
            what = "is a file, not a folder" if Path(args.directory).exists() else "not found"
            raise ValueError(f"{args.directory}: {what} (give the OUTPUT folder of `medfusion convert`)")
        manifest = build_manifest_from_converted(
            args.directory,
            task=args.task,
            group_by=args.group_by,
            standard=args.standard,
            split=tuple(args.split),
            seed=args.seed,
        )
        output = Path(args.output) if args.output else Path(args.directory) / "manifest.json"
        record = _relative_extra(manifest.extra, output.parent.absolute())
        write_manifest(
            output,
            manifest.splits,
            task=args.task,
            name=manifest.name,
            description=manifest.description,
            overwrite=args.overwrite,
            allow_outside=args.allow_outside,
            extra=record if output.suffix.lower() == ".json" else None,
        )
    except (ManifestError, OSError, ValueError) as e:  # OSError: FileExistsError, PermissionError
        print(f"medfusion manifest: {one_line(e)}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if record["standard"] is not None:
        print(f"standard protocol: {record['standard']}")
    for t in record["targets"]:
        print(f"target    {t['case_id']}: {t['target']}")
    for e in record["excluded"]:
        print(f"excluded  {e['series']} ({e['protocol']}): {e['reason']}")
    sizes = ", ".join(f"{s}: {len(v)}" for s, v in manifest.splits.items())
    print(f"wrote {output} ({sizes}; {len(record['excluded'])} series in no pair)")
    return EXIT_OK

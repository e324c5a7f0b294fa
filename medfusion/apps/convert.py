"""``medfusion convert INPUT OUTPUT``: a DICOM tree -> one NIfTI + JSON sidecar per series.

The command line of :func:`medfusion.io.convert.convert_tree` (discovery, per-series failures, resume, atomic
writes); it prints one line per series, keeps ``OUTPUT/convert_report.csv`` (one row per input file: status,
reason, series UID, output, seconds; brought up to date by a rerun) and ends with an exit status of
:mod:`medfusion.exit_codes`. An OUTPUT that cannot be written is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.epilog is None:
        parser.epilog = EXIT_CODES_HELP
    parser.add_argument("input", type=Path, help="DICOM folder tree (read only)")
    parser.add_argument("output", type=Path, help="output folder (must not be inside INPUT)")
    parser.add_argument("--workers", type=int, default=1, help="parallel worker processes (default 1)")
    parser.add_argument("--overwrite", action="store_true", help="reconvert series whose outputs exist")
    parser.add_argument(
        "--include-derived", action="store_true", help="also convert ImageType DERIVED series"
    )
    parser.add_argument("--include-localizers", action="store_true", help="also convert localizer series")
    parser.add_argument(
        "--merge-acquisitions",
        action="store_true",
        help="keep repeated acquisitions (same positions, different AcquisitionNumber) as one 4D volume",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    """Convert, print one line per series and the counts; return the exit status (``EXIT_CODES_HELP``)."""
    from medfusion.io.convert import convert_tree, print_summary

    try:
        report = convert_tree(
            args.input,
            args.output,
            workers=args.workers,
            overwrite=args.overwrite,
            progress=not args.no_progress,
            include_derived=args.include_derived,
            include_localizers=args.include_localizers,
            merge_acquisitions=args.merge_acquisitions,
        )
    except (ValueError, OSError) as exc:  # bad arguments, missing INPUT, OUTPUT not writable
        print(f"medfusion convert: {exc}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    print_summary(report)
    if not report.outcomes:
        print(f"medfusion convert: no DICOM files found under {args.input}", file=sys.stderr)
    return report.exit_code

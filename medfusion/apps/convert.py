"""``medfusion convert INPUT OUTPUT``: a DICOM tree -> one NIfTI + JSON sidecar per series.

The command line of :func:`medfusion.io.convert.convert_tree` (discovery, per-series failures, resume, atomic
writes); it prints one line per series, keeps ``OUTPUT/convert_report.csv`` (one row per input file: status,
reason, series UID, output, seconds; brought up to date by a rerun) and ends with an exit status of
:mod:`medfusion.exit_codes`. On stderr: one line per series that failed (its folder and the reason), one line when
INPUT holds nothing to convert, one line (and exit status 2) for a missing INPUT or an OUTPUT that cannot be written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE

if TYPE_CHECKING:
    from medfusion.io.convert import ConvertReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    if parser.epilog is None:
        parser.epilog = EXIT_CODES_HELP
    parser.add_argument("input", type=Path, help="DICOM folder tree (read only)")
    parser.add_argument("output", type=Path, help="output folder (must not be inside INPUT)")
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes converting series in parallel (default 1); the headers of a large folder are parsed by one process per available core (at most 8) either way",
    )
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
    print_errors(report)
    return report.exit_code


def print_errors(report: ConvertReport) -> None:
    """One line on stderr per failed series (its folder and the reason), or one saying that INPUT holds nothing to
    convert (naming a file that was left out, and why); the full record is on stdout and in the report."""
    from medfusion.io.convert import source_folder

    for outcome in report.failed:
        where = source_folder(outcome, report.input_dir)
        print(f"medfusion convert: failed {report.input_dir / where}: {outcome.reason}", file=sys.stderr)
    if report.failed or any(o.output is not None for o in report.outcomes):
        return
    left_out = [(p, o.reason) for o in report.outcomes for p in o.sources]
    detail = (
        f"; {len(left_out)} file(s) left out, e.g. {left_out[0][0]}: {left_out[0][1]}" if left_out else ""
    )
    print(f"medfusion convert: nothing to convert under {report.input_dir}{detail}", file=sys.stderr)

"""Command-line options and the closing report shared by the volume commands (``standardize``, ``restore``).

Kept apart from :mod:`medfusion.apps.volume_job` so that ``medfusion standardize --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any


def add_io_arguments(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    """The options every volume command shares (``standardize``, ``restore``): model, input, output, device, ..."""
    parser.add_argument("--ckpt", required=True, help=f"{model_help}: exported folder or Lightning .ckpt")
    parser.add_argument(
        "--input", required=True, help="DICOM folder, NIfTI file, folder of NIfTIs or manifest .json"
    )
    parser.add_argument("--output", required=True, help="output .nii.gz (one scan) or folder")
    parser.add_argument(
        "--format", default="nifti", choices=["nifti", "dicom"], help="output format (default nifti)"
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="slices (2D) or windows (3D) per batch")
    parser.add_argument("--roi-size", type=int, nargs="+", default=None, help="3D model: sliding-window size")
    parser.add_argument(
        "--hu-window", type=float, nargs=2, default=None, help="HU window (default: the model's)"
    )
    parser.add_argument("--manifest-key", default="source", help="manifest entry key holding the scan")
    parser.add_argument("--split", default=None, help="manifest split to process (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (per scan, reproducible)")
    parser.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def report(results: Sequence[Any], verb: str) -> int:
    """Print one line per scan and a total; exit status 0 when all were written, 1 when some failed."""
    failed = [r for r in results if r.status != "ok"]
    for r in results:
        line = f"{r.status:6} {r.name} -> {r.output}" + (f"  ({r.message})" if r.message else "")
        print(line, file=sys.stderr if r.status != "ok" else sys.stdout)
    print(f"{len(results) - len(failed)}/{len(results)} scans {verb}")
    return 1 if failed else 0

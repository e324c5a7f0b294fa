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
    parser.add_argument(
        "--resume",
        action="store_true",
        help="skip scans whose output exists (outputs are written atomically, so an existing one is complete)",
    )
    parser.add_argument(
        "--include-derived",
        action="store_true",
        help="also process DICOM series marked DERIVED (e.g. medfusion's own DICOM output); skipped by default",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")


def check_roi_size(roi_size: Sequence[int] | None, spatial_dims: int, divisible_by: int) -> None:
    """``--roi-size`` fits the model: 3D models only, three values, multiples of ``divisible_by`` (ValueError)."""
    if roi_size is None:
        return
    if spatial_dims != 3:
        raise ValueError("--roi-size applies to 3D models only (a 2D model runs slice by slice)")
    if len(roi_size) != 3 or any(r % divisible_by for r in roi_size):
        raise ValueError(f"--roi-size needs 3 values, multiples of {divisible_by}; got {list(roi_size)}")


def report(results: Sequence[Any], verb: str) -> int:
    """Print one line per scan and a total; return the exit status.

    0: every scan written (or already done, with ``--resume``); 1: some failed; 2: all failed (nothing written).
    DICOM objects skipped by discovery are listed but change nothing (a warning must not abort a pipeline).
    """
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "done", "skipped", "failed")}
    for r in results:
        line = f"{r.status:7} {r.name} -> {r.output}" + (f"  ({r.message})" if r.message else "")
        print(line, file=sys.stderr if r.status == "failed" else sys.stdout)
    scans = counts["ok"] + counts["done"] + counts["failed"]
    extra = [
        f"{counts[s]} {label}"
        for s, label in (("done", "already done"), ("failed", "failed"), ("skipped", "DICOM objects skipped"))
        if counts[s]
    ]
    print(f"{counts['ok']}/{scans} scans {verb}" + (f" ({', '.join(extra)})" if extra else ""))
    if not counts["failed"]:
        return 0
    return 2 if counts["ok"] + counts["done"] == 0 else 1

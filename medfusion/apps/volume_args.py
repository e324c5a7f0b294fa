"""Command-line options, the run and the closing report shared by the volume commands (``standardize``,
``restore``; the launch options and :func:`report` also ``augment``): one volume job
(:func:`medfusion.apps.volume_job.restore_scans`), a per-command option set.

Kept apart from :mod:`medfusion.apps.volume_job` so that ``medfusion standardize --help`` imports no torch.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, batch_exit_code


def add_io_arguments(parser: argparse.ArgumentParser, *, model_help: str) -> None:
    """The options every volume command shares (``standardize``, ``restore``): model, input, output, device, ..."""
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument("--ckpt", required=True, help=f"{model_help}: exported folder or Lightning .ckpt")
    parser.add_argument(
        "--input", required=True, help="DICOM folder, NIfTI file, folder of NIfTIs or manifest .json"
    )
    parser.add_argument("--output", required=True, help="output .nii.gz (one scan) or folder")
    parser.add_argument(
        "--format", default="nifti", choices=["nifti", "dicom"], help="output format (default nifti)"
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="2D model: slices per batch (default 8); 3D model: sliding windows per batch (default: the model's)",
    )
    parser.add_argument(
        "--roi-size", type=int, nargs="+", default=None, help="3D model: sliding-window size in voxels"
    )
    parser.add_argument(
        "--overlap",
        type=float,
        default=None,
        help="3D model: overlap of neighbouring sliding windows, a fraction of the window (default: the model's)",
    )
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
    add_launch_arguments(parser)


def add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    """``--devices``, ``--num-nodes``, ``--accelerator``, ``--strategy``: run through Lightning's ``Trainer.predict``
    on several devices / nodes (:mod:`medfusion.apps.predict`; launch recipes in docs/cluster.md)."""
    parser.add_argument(
        "--devices",
        type=int,
        default=None,
        help="devices per node for a Lightning run (each case on exactly one rank); default: one process, --device",
    )
    parser.add_argument("--num-nodes", type=int, default=1, help="nodes of a Lightning run (default 1)")
    parser.add_argument(
        "--accelerator", default="cpu", choices=["cpu", "gpu", "auto"], help="accelerator of a Lightning run"
    )
    parser.add_argument(
        "--strategy",
        default="ddp",
        choices=["ddp", "ddp_spawn", "auto"],
        help="Lightning strategy (ddp: torchrun / SLURM ranks, or started by re-running this command)",
    )


def launch_options(args: argparse.Namespace) -> dict[str, Any]:
    """The Lightning launch options given on the command line (empty: one process)."""
    if args.devices is None:
        if args.num_nodes != 1:
            raise ValueError("--num-nodes needs --devices (devices per node)")
        return {}
    return {
        "devices": args.devices, "num_nodes": args.num_nodes, "accelerator": args.accelerator,
        "strategy": args.strategy,
    }  # fmt: skip


def _window_options(args: argparse.Namespace, spatial_dims: int) -> dict[str, Any]:
    """``--batch-size`` / ``--overlap`` as the model's sliding-window options (3D models)."""
    if spatial_dims != 3:
        if args.overlap is not None:
            raise ValueError("--overlap applies to 3D models only (a 2D model runs slice by slice)")
        return {}
    given = {"sw_batch_size": args.batch_size, "overlap": args.overlap}
    return {k: v for k, v in given.items() if v is not None}


COMMAND_OF_MODEL = {"DiffusionCT": "standardize", "RDDM": "restore", "DiffIRStage2": "restore"}
"""The command each of medfusion's Restorer models belongs to (other Restorer classes are taken by both)."""


def check_task(model: Any, path: str, command: str) -> None:
    """``ValueError`` when ``model`` is one of medfusion's models of the other volume command (a DiffusionCT
    standardizes, it does not restore; an RDDM or DiffIR restores, it does not standardize)."""
    name = type(model).__name__
    home = COMMAND_OF_MODEL.get(name)
    if home is not None and home != command:
        takes = " or ".join(sorted(n for n, c in COMMAND_OF_MODEL.items() if c == command))
        raise ValueError(
            f"{path} holds a {name}, a model for `medfusion {home}`; `medfusion {command}` takes {takes}"
        )


def one_line(err: BaseException | str) -> str:
    """An error message on one line (a message of several lines, e.g. from a library, is joined with ' | ')."""
    text = str(err)
    if isinstance(err, KeyError) and err.args:  # str(KeyError) quotes its key
        text = str(err.args[0])
    return " | ".join(line.strip() for line in text.splitlines() if line.strip()) or type(err).__name__


def run_restorer(args: argparse.Namespace, *, command: str, options: dict[str, Any], verb: str) -> int:
    """Run ``medfusion <command>``: load the model, check ``options`` (the command's flags that were given, as
    the model's option names) and the shared ones, then :func:`~medfusion.apps.volume_job.restore_scans`.

    Bad arguments, input or model print one line and return ``EXIT_NOTHING_DONE`` before any scan is read.
    """
    from medfusion.apps.volume_job import load_restorer, resolve_device, restore_scans

    options = {k: v for k, v in options.items() if v is not None}
    try:
        if args.batch_size is not None and args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        launch = launch_options(args)
        device = resolve_device(args.device) if not launch else "cpu"
        model = load_restorer(args.ckpt, device)
        check_task(model, args.ckpt, command)
        options |= _window_options(args, model.spatial_dims)
        rows = restore_scans(
            model, args.input, args.output, options=options, roi_size=args.roi_size, seed=args.seed,
            hu_window=tuple(args.hu_window) if args.hu_window else None,
            batch_size=8 if model.spatial_dims == 3 or args.batch_size is None else args.batch_size,
            device=device, series_description=f"{verb} (medfusion {type(model).__name__})", fmt=args.format,
            overwrite=args.overwrite, resume=args.resume, include_derived=args.include_derived,
            manifest_key=args.manifest_key, split=args.split, show_progress=not args.quiet, launch=launch,
            command=command,
        )  # fmt: skip
    except (OSError, ValueError) as err:  # FileNotFoundError, FileExistsError, PermissionError are OSErrors
        print(f"medfusion {command}: error: {one_line(err)}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if rows is None:  # a rank other than 0: rank 0 reports for every rank
        return 0
    return report(rows, verb)


def report(rows: Sequence[Any], verb: str, unit: str = "scans") -> int:
    """Print one line per input (:class:`medfusion.io.run_report.ReportRow`) and a total; return the exit status
    (:func:`medfusion.exit_codes.batch_exit_code`).

    DICOM objects skipped by discovery are listed but change nothing (a warning must not abort a pipeline).
    """
    counts = {s: sum(r.status == s for r in rows) for s in ("written", "already done", "skipped", "failed")}
    for r in rows:
        line = f"{r.status:12} {r.input} -> {r.output or '-'}" + (
            f"  ({one_line(r.reason)})" if r.reason else ""
        )
        print(line, file=sys.stderr if r.status == "failed" else sys.stdout)
    total = counts["written"] + counts["already done"] + counts["failed"]
    extra = [
        f"{counts[s]} {label}"
        for s, label in (
            ("already done", "already done"),
            ("failed", "failed"),
            ("skipped", "DICOM objects skipped"),
        )
        if counts[s]
    ]
    print(f"{counts['written']}/{total} {unit} {verb}" + (f" ({', '.join(extra)})" if extra else ""))
    return batch_exit_code(counts["written"] + counts["already done"], counts["failed"])

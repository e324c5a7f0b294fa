"""``medfusion restore``: denoise / restore scans with a trained RDDM or DiffIR (stage 2) model.

    medfusion restore --ckpt MODEL --input PATH --output PATH [--format nifti|dicom] [--steps N] [--eta E]
                      [--device auto] [--roi-size X Y Z] [--overwrite]

``MODEL`` is an exported folder (``model.safetensors`` + ``config.yaml``) or a Lightning ``.ckpt`` (loaded without
pickle) of :class:`medfusion.models.rddm.RDDM` or :class:`medfusion.models.diffir.DiffIRStage2`. ``PATH`` is a
DICOM folder, a NIfTI file, a folder of NIfTI files or a manifest JSON (its ``source`` entries). 2D models run over
the slices of each volume in batches. 3D models get the whole volume; sliding windows (``--roi-size`` or the
model's own ``sw_roi_size``) run *inside* the model, i.e. inside every RDDM sampling step, never as independent
samplers per window. Input and output handling (HU window, padding, progress, atomic writes, no overwrite) is
:mod:`medfusion.apps.volume_job`, shared with ``standardize``.
Exit status: 0 all scans written (or already there, with ``--resume``), 1 some failed, 2 all failed or bad
arguments / input (nothing written). ``--resume`` skips scans whose output exists.
"""

from __future__ import annotations

import argparse
import sys

from medfusion.apps.volume_args import add_io_arguments, check_roi_size, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser, model_help="trained RDDM or DiffIRStage2")
    parser.add_argument("--steps", type=int, default=None, help="RDDM sampling steps (default: the model's)")
    parser.add_argument(
        "--eta", type=float, default=None, help="RDDM stochasticity (default: the model's, 0)"
    )


def load_restorer(path: str):
    """Load an RDDM or DiffIRStage2 model in eval mode; ``ValueError`` for any other model."""
    from medfusion.models.diffir import DiffIRStage2
    from medfusion.models.export import load_model
    from medfusion.models.rddm import RDDM

    model = load_model(path)
    if not isinstance(model, (RDDM, DiffIRStage2)):
        raise ValueError(
            f"{path} holds a {type(model).__name__}; medfusion restore needs RDDM or DiffIRStage2 "
            "(a DiffIR stage-1 model needs the clean image and cannot restore)"
        )
    return model


def run(args: argparse.Namespace) -> int:
    import torch

    from medfusion.apps.volume_job import resolve_device, run_volume_job
    from medfusion.models.rddm import RDDM

    try:
        device = resolve_device(args.device)
        model = load_restorer(args.ckpt)
        is_rddm = isinstance(model, RDDM)
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if not is_rddm and (args.steps is not None or args.eta is not None):
            raise ValueError("--steps/--eta apply to RDDM only (DiffIR always runs its 4 prior steps)")
        check_roi_size(args.roi_size, model.spatial_dims, model.divisible_by)
        if args.roi_size is not None:
            model.hparams.sw_roi_size = list(args.roi_size)
        model = model.to(device).eval()
        window = tuple(args.hu_window) if args.hu_window else model.hu_window
        state = {"gen": torch.Generator().manual_seed(args.seed)}

        def reseed(_item) -> None:
            state["gen"] = torch.Generator().manual_seed(args.seed)

        def fn(x: torch.Tensor) -> torch.Tensor:
            if is_rddm:
                return model.sample(x, num_steps=args.steps, eta=args.eta, generator=state["gen"])
            return model.sample(x, generator=state["gen"])

        steps = (args.steps or model.hparams.num_sampling_steps) if is_rddm else model.hparams.prior_timesteps
        name = type(model).__name__
        results = run_volume_job(
            args.input, args.output, fn, fmt=args.format, spatial_dims=model.spatial_dims, hu_window=window,
            batch_size=args.batch_size, divisible_by=model.divisible_by, roi_size=None, device=device,
            overwrite=args.overwrite, resume=args.resume, include_derived=args.include_derived,
            manifest_key=args.manifest_key, split=args.split,
            series_description=f"restored (medfusion {name})",
            derivation_description=f"{name} restoration, {steps} steps",
            show_progress=not args.quiet, before_each=reseed,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medfusion restore: error: {err}", file=sys.stderr)
        return 2
    return report(results, "restored")

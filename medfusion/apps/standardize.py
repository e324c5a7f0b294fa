"""``medfusion standardize``: map CT scans of any protocol to the standard protocol with a trained DiffusionCT model.

    medfusion standardize --ckpt MODEL --input PATH --output PATH [--format nifti|dicom] [--steps N]
                          [--sampler NAME] [--device auto] [--overwrite]

``MODEL`` is an exported folder (``model.safetensors`` + ``config.yaml``) or a Lightning ``.ckpt`` (loaded without
pickle). ``PATH`` is a DICOM folder, a NIfTI file, a folder of NIfTI files or a manifest JSON. 2D models run over
the slices of each volume in batches, 3D models on the whole volume or on ``--roi-size`` sliding windows.
Exit status: 0 all scans written (or already there, with ``--resume``), 1 some failed, 2 all failed or bad
arguments / input (nothing written). ``--resume`` skips scans whose output exists.
"""

from __future__ import annotations

import argparse
import sys

from medfusion.apps.volume_args import add_io_arguments, check_roi_size, report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser, model_help="trained DiffusionCT")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's, 20)")
    parser.add_argument("--sampler", default=None, help="sampler name: ddpm, ddim, dpmpp_2m, dpmpp_3m, unipc")
    parser.add_argument("--strength", type=float, default=None, help="translate mode: noise level in [0, 1]")
    parser.add_argument(
        "--decode",
        choices=("latent", "residual"),
        default=None,
        help="latent: D(z) (the paper); residual: x + D(z) - D(E(x)), keeps what the latent cannot represent "
        "(default: the model's)",
    )
    parser.add_argument(
        "--residual-sigma",
        type=float,
        default=None,
        help="with --decode residual: keep only the Gaussian low-pass (SD in pixels) of the autoencoder's error "
        "(drops source noise the latent cannot represent; default: the model's)",
    )


def model_window(model) -> tuple[float, float]:
    """The HU window a model was trained with (its ``hu_window``), default (-1000, 1000)."""
    w = getattr(model, "hu_window", None)
    return (float(w[0]), float(w[1])) if w else (-1000.0, 1000.0)


def shared_noise(model, state: dict, where, volume_shape):
    """The sampler's initial noise for a batch of 3D windows: crops of ONE latent noise field for the whole
    (padded) volume, drawn once per volume from the scan's seeded generator. Why: windows that draw their own noise
    are independent samples, and the Gaussian blending of their overlaps averages them, lowering the noise SD of the
    standardized texture at every seam; with shared noise overlapping windows start from the same field.
    Window starts are multiples of ``divisible_by`` (``volume_job`` aligns the window step), hence of the latent's
    downsampling factor."""
    import torch

    f = model.autoencoder.downsample_factor
    if state["field"] is None or state["field"][0] != tuple(volume_shape):
        shape = model.latent_shape((1, 1, *volume_shape))
        state["field"] = (tuple(volume_shape), torch.randn(shape, generator=state["gen"]))
    field = state["field"][1]
    crops = []
    for spatial in where:
        if any(sl.start % f or sl.stop % f for sl in spatial):
            raise ValueError(f"window {spatial} is not on the latent grid (factor {f})")
        crops.append(
            field[(slice(None), slice(None), *(slice(sl.start // f, sl.stop // f) for sl in spatial))]
        )
    return torch.cat(crops)


def check_options(args: argparse.Namespace, model) -> None:
    """Refuse options that do not fit the model before any scan is read (``ValueError`` naming the valid ones)."""
    from medfusion.diffusion.samplers import SAMPLERS

    if args.sampler is not None and args.sampler not in SAMPLERS:
        raise ValueError(f"--sampler must be one of {', '.join(SAMPLERS)}, got {args.sampler!r}")
    if args.strength is not None:
        if model.hparams.mode != "translate":
            raise ValueError(
                f"--strength applies to translate-mode models only; {args.ckpt} is a {model.hparams.mode} model"
            )
        if not 0.0 <= args.strength <= 1.0:
            raise ValueError(f"--strength must be in [0, 1], got {args.strength}")
    check_roi_size(args.roi_size, model.spatial_dims, model.divisible_by)


def run(args: argparse.Namespace) -> int:
    import torch

    from medfusion.apps.volume_job import resolve_device, run_volume_job
    from medfusion.models.diffusion_ct import DiffusionCT
    from medfusion.models.export import load_model

    try:
        device = resolve_device(args.device)
        model = load_model(args.ckpt)
        if not isinstance(model, DiffusionCT):
            raise ValueError(f"{args.ckpt} holds a {type(model).__name__}, not a DiffusionCT model")
        if args.steps is not None and args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        if args.residual_sigma is not None and args.residual_sigma < 0:
            raise ValueError(f"--residual-sigma must be >= 0 (pixels), got {args.residual_sigma}")
        check_options(args, model)
        model = model.to(device).eval()
        window = tuple(args.hu_window) if args.hu_window else model_window(model)
        state: dict = {"gen": torch.Generator().manual_seed(args.seed), "field": None}

        def reseed(_item) -> None:
            state["gen"] = torch.Generator().manual_seed(args.seed)
            state["field"] = None

        def fn(x: torch.Tensor, where=None, volume_shape=None) -> torch.Tensor:
            noise = None
            if where is not None:  # 3D sliding windows: crops of one latent noise field per volume
                noise = shared_noise(model, state, where, volume_shape)
            return model.standardize(
                x,
                num_steps=args.steps,
                sampler=args.sampler,
                strength=args.strength,
                generator=state["gen"],
                decode=args.decode,
                residual_sigma=args.residual_sigma,
                noise=noise,
            )

        fn.window_aware = True  # type: ignore[attr-defined]

        results = run_volume_job(
            args.input, args.output, fn, fmt=args.format, spatial_dims=model.spatial_dims, hu_window=window,
            batch_size=args.batch_size, divisible_by=model.divisible_by, roi_size=args.roi_size, device=device,
            overwrite=args.overwrite, resume=args.resume, include_derived=args.include_derived,
            manifest_key=args.manifest_key, split=args.split,
            series_description="standardized (medfusion DiffusionCT)",
            derivation_description=f"DiffusionCT standardization, {args.sampler or model.hparams.sampler} "
            f"{args.steps or model.hparams.num_inference_steps} steps",
            show_progress=not args.quiet, before_each=reseed,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medfusion standardize: error: {err}", file=sys.stderr)
        return 2
    return report(results, "standardized")

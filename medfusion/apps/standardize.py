"""``medfusion standardize``: map CT scans of any protocol to the standard protocol with a trained DiffusionCT model
(Selim et al., "Latent diffusion model for CT image standardization", AMIA 2023).

    medfusion standardize --ckpt MODEL --input PATH --output PATH [--format nifti|dicom] [--steps N]
                          [--sampler NAME] [--strength S] [--decode latent|residual] [--residual-sigma SD]
                          [--mean-only | --sample] [--device auto] [--roi-size X Y Z] [--resume | --overwrite]

``MODEL`` is an exported folder (``model.safetensors`` + ``config.yaml``) or a Lightning ``.ckpt`` (loaded without
pickle) of a model that implements :class:`medfusion.models.base.Restorer` (DiffusionCT stage 2). ``PATH`` is a
DICOM folder, a NIfTI file, a folder of NIfTI files or a manifest JSON. 2D models run over the slices of each
volume in batches, 3D models on the whole volume or on ``--roi-size`` sliding windows that the model runs itself
(overlapping windows start from crops of one latent noise field). The flags below are passed to
``model.restore`` as the method's options; the model refuses those that do not apply to it (``--strength`` on a
conditional model, ``--mean-only`` without the regression head) before any scan is read. The volume job is
:mod:`medfusion.apps.volume_job`, shared with ``restore`` and the Python API
(:func:`medfusion.api.standardize`). ``standardize_report.csv`` in the output root has one row per input
(:mod:`medfusion.io.run_report`). ``--devices N [--num-nodes M] [--accelerator cpu|gpu]`` shares the scans among
ranks through Lightning (:mod:`medfusion.apps.predict`; recipes in docs/cluster.md). Exit status:
:mod:`medfusion.exit_codes`.
"""

from __future__ import annotations

import argparse

from medfusion.apps.volume_args import add_io_arguments, run_restorer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser, model_help="trained DiffusionCT")
    parser.add_argument("--steps", type=int, default=None, help="sampler steps (default: the model's)")
    parser.add_argument(
        "--sampler",
        default=None,
        help="sampler name: ddpm, ddim, dpmpp_2m, dpmpp_3m, unipc, plms, pndm, deis (default: the model's)",
    )
    parser.add_argument(
        "--cache-interval",
        type=int,
        default=None,
        help="DeepCache: full U-Net evaluations every N steps, the shallow branch in between (1 = off; default: "
        "the model's)",
    )
    parser.add_argument(
        "--time-shift",
        type=int,
        default=None,
        help="Time-Shift sampler: window of nearby timesteps searched at each step (0 = off; default: the model's)",
    )
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
    output = parser.add_mutually_exclusive_group()
    output.add_argument(
        "--mean-only",
        action="store_true",
        help="models with a regression head: its conditional mean, without sampling (best PSNR, not a sample)",
    )
    output.add_argument(
        "--sample",
        action="store_true",
        help="draw the DDPM sample even where the model's default output is its posterior mean (the default of "
        "make demo's model when its validation patients chose the mean)",
    )


def run(args: argparse.Namespace) -> int:
    options = {
        "num_steps": args.steps,
        "sampler": args.sampler,
        "strength": args.strength,
        "decode": args.decode,
        "residual_sigma": args.residual_sigma,
        "mean_only": True if args.mean_only else (False if args.sample else None),
        "cache_interval": args.cache_interval,
        "time_shift": args.time_shift,
    }
    return run_restorer(args, command="standardize", options=options, verb="standardized")

"""``medfusion export``: turn a Lightning checkpoint from ``medfusion fit`` into a pickle-free model folder.

    medfusion export --ckpt lightning_logs/version_0/checkpoints/last.ckpt --output models/dct [--raw] [--overwrite]

The folder holds ``model.safetensors`` + ``config.yaml`` (:mod:`medfusion.models.export`): the format that
``standardize``, ``restore``, ``augment`` and DiffusionCT's ``autoencoder=`` argument read, and the one to share
(a ``.ckpt`` also holds optimizer state and is a pickle container). The checkpoint is read with
``torch.load(weights_only=True)``. A module that averages its weights (EMA) keeps the raw and the averaged weights
and infers with the average; ``--raw`` copies the raw weights over the average first, so the export infers with them.
Exit status (:mod:`medfusion.exit_codes`): 0 written, 2 bad arguments or input (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument("--ckpt", required=True, help="Lightning .ckpt (or an exported folder, to copy it)")
    parser.add_argument("--output", required=True, help="folder to write (model.safetensors + config.yaml)")
    parser.add_argument("--raw", action="store_true", help="export the raw weights, not the EMA ones")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def use_raw_weights(model) -> None:
    """Overwrite ``model``'s weight average (``model.ema``) with its raw weights; a model without one is left as is."""
    if getattr(model, "ema", None) is None:
        return
    averaged = getattr(model, "averaged", None)
    if averaged is None:
        raise ValueError(f"--raw: {type(model).__name__} does not expose its raw weights (no averaged())")
    model.ema.module.load_state_dict(averaged(use_ema=False).state_dict())


def run(args: argparse.Namespace) -> int:
    from medfusion.apps.volume_args import one_line
    from medfusion.io.atomic import check_not_overwriting
    from medfusion.models.export import export_model, load_model

    try:
        check_not_overwriting(args.output, args.overwrite)
        model = load_model(args.ckpt)
        if args.raw:
            use_raw_weights(model)
        out = export_model(model, args.output, overwrite=args.overwrite)
    except (OSError, ValueError) as err:  # FileNotFoundError, FileExistsError, PermissionError are OSErrors
        print(f"medfusion export: error: {one_line(err)}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    n = sum(p.numel() for p in model.parameters())
    print(f"exported {type(model).__name__} ({n / 1e6:.2f} M parameters) to {out}")
    return EXIT_OK

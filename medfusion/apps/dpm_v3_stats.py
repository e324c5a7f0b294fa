"""``medfusion dpm-v3-stats``: DPM-Solver-v3's statistics for an exported model, from its training data.

    medfusion dpm-v3-stats --model models/dct --config configs/diffusion_ct/sim2d_stage2_conditional.yaml \
        [--num-batches 8] [--grid-steps 100] [--overwrite]

The training batches come from the ``data`` section of the training config (its manifest's training split, the same
crops and windowing as training); the statistics are written to ``MODEL/dpm_v3_stats.safetensors``
(:mod:`medfusion.models.dpm_v3_stats`), which ``load_model`` loads, so that ``--sampler dpm_v3`` works everywhere.
Exit status (:mod:`medfusion.exit_codes`): 0 written, 2 bad arguments or input (nothing written).
"""

from __future__ import annotations

import argparse
import sys

from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument("--model", required=True, help="exported model folder (medfusion export)")
    parser.add_argument(
        "--config", required=True, help="the training YAML (its data section gives the batches)"
    )
    parser.add_argument("--num-batches", type=int, default=8, help="training batches to use (default 8)")
    parser.add_argument("--grid-steps", type=int, default=100, help="log-SNR grid points (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the noise and the probes")
    parser.add_argument("--overwrite", action="store_true", help="replace existing statistics")


def _datamodule(config_path: str):
    import yaml

    from medfusion.data.datamodule import ManifestDataModule

    with open(config_path) as fh:
        data = (yaml.safe_load(fh) or {}).get("data") or {}
    if data.get("class_path", "").rsplit(".", 1)[-1] != "ManifestDataModule":
        raise ValueError(f"{config_path}: its data section is not a ManifestDataModule")
    dm = ManifestDataModule(**(data.get("init_args") or {}))
    dm.setup("fit")
    return dm


def run(args: argparse.Namespace) -> int:
    import warnings

    from medfusion.apps.volume_args import one_line
    from medfusion.models.dpm_v3_stats import compute_model_ems
    from medfusion.notices import quiet_third_party

    try:
        with warnings.catch_warnings():
            quiet_third_party()
            dm = _datamodule(args.config)
            out = compute_model_ems(
                args.model, dm.train_dataloader(), num_batches=args.num_batches, grid_steps=args.grid_steps,
                seed=args.seed, overwrite=args.overwrite,
            )  # fmt: skip
    except (OSError, ValueError, RuntimeError) as err:
        print(f"medfusion dpm-v3-stats: error: {one_line(err)}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    print(f"wrote {out}")
    return EXIT_OK

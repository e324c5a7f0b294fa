"""``medfusion restore``: denoise / restore scans with a trained RDDM (Liu et al., "Residual Denoising Diffusion
Models", CVPR 2024) or DiffIR stage 2 (Xia et al., "DiffIR: Efficient Diffusion Model for Image Restoration",
ICCV 2023) model.

    medfusion restore --ckpt MODEL --input PATH --output PATH [--format nifti|dicom] [--steps N] [--eta E]
                      [--device auto] [--roi-size X Y Z] [--resume | --overwrite]

``MODEL`` is an exported folder (``model.safetensors`` + ``config.yaml``) or a Lightning ``.ckpt`` (loaded without
pickle) of a model that implements :class:`medfusion.models.base.Restorer`. ``PATH`` is a DICOM folder, a NIfTI
file, a folder of NIfTI files or a manifest JSON (its ``source`` entries). 2D models run over the slices of each
volume in batches. 3D models get the whole volume; sliding windows (``--roi-size`` or the model's own default) run
*inside* the model, i.e. inside every RDDM sampling step, never as independent samplers per window. ``--steps`` and
``--eta`` are passed to ``model.restore``; a model they do not apply to (DiffIR runs its fixed prior steps) refuses
them before any scan is read. The volume job is :mod:`medfusion.apps.volume_job`, shared with ``standardize``
and the Python API (:func:`medfusion.api.restore`). ``restore_report.csv`` in the output root has one row per input
(:mod:`medfusion.io.run_report`). ``--devices N [--num-nodes M] [--accelerator cpu|gpu]`` shares the scans among
ranks through Lightning (:mod:`medfusion.apps.predict`; recipes in docs/cluster.md). Exit status:
:mod:`medfusion.exit_codes`.
"""

from __future__ import annotations

import argparse

from medfusion.apps.volume_args import add_io_arguments, run_restorer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_io_arguments(parser, model_help="trained RDDM or DiffIRStage2")
    parser.add_argument("--steps", type=int, default=None, help="RDDM sampling steps (default: the model's)")
    parser.add_argument("--eta", type=float, default=None, help="RDDM stochasticity (default: the model's)")


def run(args: argparse.Namespace) -> int:
    options = {"num_steps": args.steps, "eta": args.eta}
    return run_restorer(args, command="restore", options=options, verb="restored")

"""The ``medfusion`` command line.

Two families of commands share one entry point:

* ``fit``, ``validate``, ``test``, ``predict``: Lightning's ``LightningCLI`` (torchgeo-style), driven by
  a YAML from ``configs/`` whose ``model.class_path`` / ``data.class_path`` name the classes.
* data and inference commands (``make-data``, ``convert``, ``manifest``, ``standardize``, ``restore``,
  ``augment``, ``export``, ``demo``): each lives in its own module, which exposes ``add_arguments(parser)`` and
  ``run(args) -> int``.

``medfusion --help`` must answer in about a second, so nothing heavy is imported here: a command's module
(and with it torch / MONAI / Lightning) is imported only when that command runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "medfusion.apps.demo",
        "main job: built-in data -> train DiffusionCT -> standardize held-out scans",
    ),
    "make-data": (
        "medfusion.data.builtin",
        "write the built-in phantom dataset (CT protocols, labels, manifests)",
    ),
    "convert": ("medfusion.io.convert", "DICOM tree -> one NIfTI + JSON sidecar per series (resumable)"),
    "manifest": ("medfusion.data.manifest", "build a Decathlon-style datalist JSON from a converted folder"),
    "standardize": ("medfusion.apps.standardize", "standardize CT scans with a trained DiffusionCT model"),
    "restore": ("medfusion.apps.restore", "restore (denoise / super-resolve) scans with RDDM or DiffIR"),
    "augment": ("medfusion.apps.augment", "write DRDM-deformed image/label/field triplets from a manifest"),
    "export": ("medfusion.apps.export", "Lightning .ckpt -> pickle-free model folder (safetensors + YAML)"),
}
LIGHTNING_COMMANDS = {
    "fit": "train a model from a YAML config",
    "validate": "run validation from a YAML config",
    "test": "run the test loop from a YAML config",
    "predict": "run prediction from a YAML config",
}


def _top_help() -> str:
    from medfusion import __version__

    lines = [
        f"medfusion {__version__}: diffusion models for medical imaging",
        "",
        "usage: medfusion COMMAND [options]   (medfusion COMMAND --help for its options)",
        "",
        "training (LightningCLI; e.g. medfusion fit --config configs/diffusion_ct/sim2d_stage1.yaml):",
    ]
    lines += [f"  {name:<12} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines += ["", "data and inference:"]
    lines += [f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items()]
    return "\n".join(lines)


def lightning_main(args: list[str]) -> int:
    """Run LightningCLI with subclass mode for model and data (class_path in the YAML)."""
    from lightning.pytorch.cli import LightningCLI

    LightningCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_kwargs={"overwrite": True},
        args=args,
        auto_configure_optimizers=False,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return 0
    if argv[0] in ("-V", "--version"):
        from medfusion import __version__

        print(__version__)
        return 0
    name, rest = argv[0], argv[1:]
    if name in LIGHTNING_COMMANDS:
        return lightning_main(argv)
    if name not in COMMANDS:
        valid = ", ".join([*LIGHTNING_COMMANDS, *COMMANDS])
        print(f"medfusion: unknown command {name!r}; valid commands: {valid}", file=sys.stderr)
        return 2
    module_name, text = COMMANDS[name]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"medfusion {name}", description=text)
    module.add_arguments(parser)
    args = parser.parse_args(rest)
    return int(module.run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())

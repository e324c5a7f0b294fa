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
import warnings
from typing import Any

from medfusion.notices import quiet_third_party  # noqa: F401  (re-exported: older scripts import it from here)

# name -> (module implementing add_arguments/run, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": (
        "medfusion.apps.demo",
        "main job: built-in data -> train DiffusionCT -> standardize held-out scans",
    ),
    "make-data": (
        "medfusion.apps.make_data",
        "write the built-in phantom dataset (CT protocols, labels, manifests)",
    ),
    "convert": ("medfusion.apps.convert", "DICOM tree -> one NIfTI + JSON sidecar per series (resumable)"),
    "manifest": ("medfusion.apps.manifest", "build a Decathlon-style datalist JSON from a converted folder"),
    "standardize": ("medfusion.apps.standardize", "standardize CT scans with a trained DiffusionCT model"),
    "restore": ("medfusion.apps.restore", "restore (denoise / super-resolve) scans with RDDM or DiffIR"),
    "augment": ("medfusion.apps.augment", "write DRDM-deformed image/label/field triplets from a manifest"),
    "export": ("medfusion.apps.export", "Lightning .ckpt -> pickle-free model folder (safetensors + YAML)"),
    "dpm-v3-stats": (
        "medfusion.apps.dpm_v3_stats",
        "DPM-Solver-v3 statistics of an exported model, from its training config's data",
    ),
    "evaluate": (
        "medfusion.apps.evaluate",
        "score models and baselines on a manifest split: intervals, per-case table, report",
    ),
}
EXIT_CODE_TABLE = (  # medfusion.exit_codes, repeated here so that --help imports nothing
    (0, "every input done (or already done, with --resume)"),
    (1, "some inputs failed (each reported with its reason); the others were written"),
    (2, "nothing written: every input failed, or bad arguments / input"),
    (3, "every input done, but an incomplete acquisition was dropped in part (convert)"),
)
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
    lines += ["", "exit status (every command):"]
    lines += [f"  {code}  {text}" for code, text in EXIT_CODE_TABLE]
    return "\n".join(lines)


def _config_path(args: list[str]) -> str | None:
    """The ``--config`` file of a Lightning command line (the last one given), if any."""
    path = None
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            path = args[i + 1]
        elif arg.startswith("--config="):
            path = arg.split("=", 1)[1]
    return path


def checkpoint_dir(config: str | None) -> str:
    """Where a config's checkpoints go when it names no ``ModelCheckpoint``: ``checkpoints/<method>/<experiment>``
    (relative to the working folder), the same place every config in ``configs/`` writes ``last.ckpt`` to."""
    if config is None:
        return "checkpoints/run"
    from pathlib import Path

    path = Path(config)
    return f"checkpoints/{path.parent.name}/{path.stem}" if path.parent.name else f"checkpoints/{path.stem}"


def lightning_main(args: list[str], *, from_command_line: bool = False) -> int:
    """Run LightningCLI with subclass mode for model and data (class_path in the YAML).

    Every run saves ``last.ckpt``: configs without a ``ModelCheckpoint`` get one in :func:`checkpoint_dir`. A path
    to another stage's checkpoint in ``model.init_args`` that does not exist stops the run with one line naming
    the key and the path, before anything is built.
    """
    import os
    from pathlib import Path

    from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK

    config = _config_path(args)
    if config is not None and not Path(config).is_file():
        what = "is a folder, not a YAML file" if Path(config).is_dir() else "not found"
        print(f"medfusion {args[0]}: error: --config {config}: {what}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    cli_cls = _medfusion_cli_class()
    with warnings.catch_warnings():
        quiet_third_party()
        try:
            cli_cls(
                subclass_mode_model=True,
                subclass_mode_data=True,
                save_config_kwargs={"overwrite": True},
                args=None if from_command_line else args,
                auto_configure_optimizers=False,
                seed_everything_default=0,  # reproducible unless the config sets its own seed
                checkpoint_dir=checkpoint_dir(config),
            )
        # bad config, manifest, data or paths (also wrapped in a RuntimeError by MONAI)
        except (MissingStageError, ValueError, OSError, RuntimeError) as err:
            cause = _input_error(err)
            if cause is None or os.environ.get(TRACEBACK_ENV):
                raise
            print(f"medfusion {args[0]}: error: {_one_line(cause)}", file=sys.stderr)
            return EXIT_NOTHING_DONE
    return EXIT_OK


def _input_error(err: BaseException) -> BaseException | None:
    """The error to report in one line: ``err`` itself when it is a ``ValueError`` / ``OSError`` (bad config, data
    or paths), else the first such error it was raised from (MONAI wraps a transform's error in ``RuntimeError``
    "applying transform ..."); None for anything else (a bug: its traceback is shown)."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, (MissingStageError, ValueError, OSError)):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


TRACEBACK_ENV = "MEDFUSION_TRACEBACK"
"""Set (to anything) to get the full traceback instead of the one-line error of a Lightning command."""


def _one_line(err: BaseException) -> str:
    """``err``'s message on one line (the lines of a library's message joined with ' | ')."""
    return " | ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


class MissingStageError(Exception):
    """A ``model.init_args`` path to an earlier stage's checkpoint or export does not exist."""


STAGE_SUFFIXES = (".ckpt", ".safetensors")


def _stage_paths(init_args: dict, prefix: str = "model.init_args") -> list[tuple[str, str]]:
    """``(key, path)`` of every ``init_args`` string that names a checkpoint (``*.ckpt``, ``*.safetensors``)."""
    found = []
    for key, value in (init_args or {}).items():
        if isinstance(value, str) and value.endswith(STAGE_SUFFIXES):
            found.append((f"{prefix}.{key}", value))
    return found


def check_spatial_dims(model_args: Any, data_args: Any) -> None:
    """``ValueError`` when ``model.init_args.spatial_dims`` and ``data.init_args.spatial_dims`` are both set and
    differ (a 3D network fed 2D slices fails deep inside a convolution, without naming the setting)."""
    model_dims = model_args.get("spatial_dims") if model_args is not None else None
    data_dims = data_args.get("spatial_dims") if data_args is not None else None
    if model_dims is not None and data_dims is not None and int(model_dims) != int(data_dims):
        raise ValueError(
            f"model.init_args.spatial_dims={model_dims} differs from data.init_args.spatial_dims={data_dims}: "
            "a model trains on the data's 2D slices or 3D volumes; set both to 2 or both to 3"
        )


def _medfusion_cli_class():
    """LightningCLI that adds a ``last.ckpt`` checkpoint where a config has none and checks stage paths first."""
    from pathlib import Path

    from lightning.pytorch.callbacks import ModelCheckpoint, RichProgressBar
    from lightning.pytorch.cli import LightningCLI

    from medfusion.models.progress import step_progress_bar_class

    StepProgressBar = step_progress_bar_class()

    class MedfusionCLI(LightningCLI):
        def __init__(self, *args, checkpoint_dir: str, **kwargs) -> None:
            self._checkpoint_dir = checkpoint_dir
            super().__init__(*args, **kwargs)

        def before_instantiate_classes(self) -> None:
            config = self.config.get(self.subcommand) if self.subcommand else self.config
            model = config.get("model") if config is not None else None
            init_args = model.get("init_args") if model is not None else None
            data = config.get("data") if config is not None else None
            check_spatial_dims(init_args, data.get("init_args") if data is not None else None)
            for key, path in _stage_paths(dict(init_args or {})):
                if not Path(path).exists():
                    raise MissingStageError(
                        f"{key}: {path} does not exist (relative paths are read from {Path.cwd()}); "
                        "train that stage first from this folder, or pass the path on the command line, "
                        f"e.g. --{key}=PATH"
                    )

        def instantiate_trainer(self, **kwargs):
            trainer = super().instantiate_trainer(**kwargs)
            for cb in trainer.callbacks:
                # Lightning's own default checkpoint (none configured): one place per config, and a last.ckpt
                if type(cb) is ModelCheckpoint and cb.dirpath is None and not cb.save_last:
                    cb.dirpath = str(Path(trainer.default_root_dir) / self._checkpoint_dir)
                    cb.save_last = True
                if type(cb) is RichProgressBar:  # Lightning's default bar when rich is installed
                    cb.__class__ = StepProgressBar
            return trainer

    return MedfusionCLI


def main(argv: list[str] | None = None) -> int:
    from_command_line = argv is None
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
        return lightning_main(argv, from_command_line=from_command_line)
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

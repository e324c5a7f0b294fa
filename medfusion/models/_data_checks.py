"""Checks a module runs when training starts: the data must be what the module's hyper-parameters say.

The HU window is set twice in a LightningCLI YAML (``model.init_args.hu_window``, stored with the weights for
``medfusion standardize`` / ``restore``, and ``data.init_args.hu_window``, used by the pipeline). If the two
differ the model trains on one intensity scale and is applied on another, silently; so a mismatch stops ``fit``.
"""

from __future__ import annotations

from typing import Any


def check_hu_window(module: Any) -> None:
    """``ValueError`` when the trainer's DataModule maps another HU window to [-1, 1] than ``module.hu_window``.

    Modules or DataModules without a window (e.g. plain DataLoaders in tests) are not checked.
    """
    trainer = getattr(module, "_trainer", None)
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    model_window = getattr(module, "hu_window", None)
    data_window = getattr(data, "hu_window", None)
    if model_window is None or data_window is None:
        return
    m = tuple(float(v) for v in model_window)
    d = tuple(float(v) for v in data_window)
    if m != d:
        raise ValueError(
            f"{type(module).__name__}.hu_window {m} differs from the data's hu_window {d} "
            f"({type(data).__name__}): set the same window in model.init_args and data.init_args "
            "(for DiffusionCT stage 2 the window is the stage-1 autoencoder's)"
        )

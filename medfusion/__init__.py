"""medfusion: diffusion models for medical imaging on MONAI and Lightning.

Importing ``medfusion`` is cheap: torch, MONAI and Lightning are imported by the
sub-modules that need them, never here. The Python API (:mod:`medfusion.api`) is re-exported lazily:
``medfusion.standardize(...)`` imports it on first use.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = (
    "Augmented",
    "Volume",
    "augment",
    "convert",
    "evaluate",
    "load_model",
    "read_series",
    "read_volume",
    "restore",
    "standardize",
    "write_volume",
)


def __getattr__(name: str) -> Any:
    """``medfusion.<name>`` for the names of :mod:`medfusion.api`, imported on first use."""
    if name in _API:
        import importlib

        return getattr(importlib.import_module("medfusion.api"), name)
    raise AttributeError(f"module 'medfusion' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_API])

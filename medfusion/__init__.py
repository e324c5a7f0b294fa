"""medfusion: diffusion models for medical imaging on MONAI and Lightning.

Importing ``medfusion`` is cheap: torch, MONAI and Lightning are imported by the
sub-modules that need them, never here.
"""

from __future__ import annotations

__version__ = "0.1.0"

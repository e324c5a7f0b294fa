"""Displacement-field geometry (voxels, array-axis order, pull warping): see ``warp`` and ``jacobian``."""

from __future__ import annotations

from medfusion.fields.jacobian import (
    DisplacementScale,
    displacement_scale,
    folding_fraction,
    jacobian_determinant,
    jacobian_matrix,
    negative_jacobian_penalty,
    sdlogj,
)
from medfusion.fields.warp import (
    compose,
    identity_grid,
    integrate_velocity,
    inverse_consistency,
    invert_field,
    sample_at,
    self_compose,
    warp,
    warp_labels,
)

__all__ = [
    "DisplacementScale",
    "compose",
    "displacement_scale",
    "folding_fraction",
    "identity_grid",
    "integrate_velocity",
    "inverse_consistency",
    "invert_field",
    "jacobian_determinant",
    "jacobian_matrix",
    "negative_jacobian_penalty",
    "sample_at",
    "sdlogj",
    "self_compose",
    "warp",
    "warp_labels",
]

"""Batch-dictionary key names shared by data pipelines, transforms and models.

``data`` and ``models`` never import each other; they agree on these names only.
"""

from __future__ import annotations

IMAGE = "image"  # (C, *spatial) image, normalised intensities unless stated otherwise
LABEL = "label"  # (1, *spatial) integer label map
SOURCE = "source"  # image to be transformed (e.g. non-standard CT protocol, degraded input)
TARGET = "target"  # reference image (e.g. standard CT protocol, clean image)
MOVING = "moving"  # registration: moving image
FIXED = "fixed"  # registration: fixed image
MOVING_LABEL = "moving_label"
FIXED_LABEL = "fixed_label"
DDF = "ddf"  # dense displacement field (B, D, *spatial) in voxels, axis order = array axes
DDF_WEIGHT = "ddf_weight"  # (B,) weight of each pair's known-field term (0: a pair whose field is unknown)
MASK = "mask"  # (1, *spatial) region of interest (e.g. body)
PROTOCOL = "protocol"  # CT protocol name (str)
CASE_ID = "case_id"  # patient / case identifier (str)
META = "meta"  # free-form metadata dict

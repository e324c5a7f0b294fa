"""Procedural torso phantoms in Hounsfield units with a ground-truth label map.

A "patient" is a set of anatomical parameters drawn from a seed (:func:`draw_anatomy`: body size and shape,
fat and muscle thickness, breathing state, organ sizes and positions, vessel / airway trees, lesions); a
deterministic renderer (:func:`render`) evaluates that anatomy on any grid. Everything is defined in
millimetres in a continuous patient frame, so the same patient can be rendered as a 2D slice or a 3D volume at
any size and spacing, and a 2D slice equals the matching plane of the 3D volume. Structures are painted with
one-pixel partial-volume edges (soft occupancy), later structures over earlier ones.

Coordinate frame (mm): ``x`` to the patient's left (image right), ``y`` anterior (image up), ``z`` along the
torso from its inferior end (0, about L3) to the lung apices (``length_mm``). Array axes: ``(H, W[, D])`` =
(rows anterior -> posterior, columns patient right -> left, slices inferior -> superior); :func:`affine` gives
the matching RAS+ voxel -> world matrix.

Label table (:data:`LABELS`), with the HU the renderer uses (non-contrast CT, typical adult values; e.g.
Hofer, *CT Teaching Manual*; Lamba et al. 2014):

====  ===============  ==========================================================================
  0   background       air outside the body, -1000
  1   fat              subcutaneous, visceral, mediastinal and epicardial fat, -120..-80
  2   muscle           body-wall, paraspinal and psoas muscle, 40..60
  3   soft_tissue      mediastinum, bowel, discs, spinal canal, airway walls, 15..90
  4   lung             lung parenchyma, -900..-780 (breathing dependent) with fine texture
  5   airway           trachea and bronchial lumen (air), -1000
  6   lung_vessel      pulmonary vessel tree, 30..50 (partial volume with lung at small calibre)
  7   heart            myocardium and blood pool, 35..50
  8   aorta            ascending aorta, arch and descending aorta, 35..50
  9   liver            40..70 (fatty to normal), texture SD 2..10 per patient
 10   spleen           40..55
 11   kidney_left      parenchyma 25..40
 12   kidney_right     parenchyma 25..40
 13   spine            vertebrae: cortical shell 1000..1300, trabecular core 150..300
 14   ribs             ribs (cortical shell and marrow) and sternum
 15   lung_nodule      solid 0..60 or ground glass -650..-350
 16   liver_lesion     hypodense 5..40
====  ===============  ==========================================================================

Modules, one per group of body parts, each with its ``draw_*`` (parameters from the generator) and ``paint_*``
(rasterisation) functions: :mod:`~medfusion.data.phantoms.torso` (body wall, back muscles, diaphragm, tissue HU),
:mod:`~medfusion.data.phantoms.thorax` (lungs, airways, vessels, heart, aorta),
:mod:`~medfusion.data.phantoms.abdomen` (liver, spleen, kidneys), :mod:`~medfusion.data.phantoms.skeleton`
(spine, ribs, sternum), :mod:`~medfusion.data.phantoms.lesions`; :mod:`~medfusion.data.phantoms.raster` holds
the primitives, :mod:`~medfusion.data.phantoms.anatomy` the order of the draws and
:mod:`~medfusion.data.phantoms.render` the order of the painting.

Why hand-written: skimage/phantominator give Shepp-Logan-type ellipse phantoms without anatomy, breathing or
vessel trees, and XCAT-style anatomical phantoms (Segars et al., Med Phys 37:4902, 2010) are licensed and need
downloads. The numpy renderer is vectorised (full-grid ellipsoids and bounding-box rasterised tube segments): a
64^3 volume takes well under a second on one core.
"""

from __future__ import annotations

from medfusion.data.phantoms.anatomy import draw_anatomy
from medfusion.data.phantoms.model import FOV_MM, LABEL_IDS, LABELS, Z_EXTENT_MM, Anatomy, Phantom, Segment
from medfusion.data.phantoms.render import affine, default_spacing, render, torso_phantom

__all__ = [
    "FOV_MM",
    "LABELS",
    "LABEL_IDS",
    "Z_EXTENT_MM",
    "Anatomy",
    "Phantom",
    "Segment",
    "affine",
    "default_spacing",
    "draw_anatomy",
    "render",
    "torso_phantom",
]

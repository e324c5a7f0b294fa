"""Drawing a patient: every random parameter of a phantom comes from one seeded generator, in a fixed order."""

from __future__ import annotations

import numpy as np

from medfusion.data.phantoms.abdomen import draw_kidneys, draw_liver, draw_spleen
from medfusion.data.phantoms.lesions import draw_lesions
from medfusion.data.phantoms.model import Anatomy
from medfusion.data.phantoms.skeleton import draw_ribs, draw_spine, draw_spine_position
from medfusion.data.phantoms.thorax import draw_airways_and_vessels, draw_aorta, draw_heart, draw_lungs
from medfusion.data.phantoms.torso import draw_texture, draw_texture_sd, draw_tissue_hu, draw_torso


def draw_anatomy(seed: int) -> Anatomy:
    """Draw one patient's anatomy from ``seed`` (numpy ``default_rng``); all randomness of a phantom is here.

    The draws happen in a fixed order (body, tissue HU, lungs, spine position, heart, aorta, liver, spleen,
    kidneys, spine, ribs, vessel and airway trees, lesions, texture): the same seed gives the same patient.
    """
    rng = np.random.default_rng(seed)
    torso = draw_torso(rng)
    hu = draw_tissue_hu(rng, torso.breath)
    lungs = draw_lungs(rng, torso)
    spine_cy, spine_r = draw_spine_position(rng, torso)
    heart = draw_heart(rng, torso)
    aorta = draw_aorta(rng, torso, heart, spine_cy, spine_r)
    liver = draw_liver(rng, torso)
    spleen = draw_spleen(rng, torso)
    kidneys = draw_kidneys(rng, torso, spine_cy)
    spine = draw_spine(rng, spine_cy, spine_r)
    ribs = draw_ribs(rng)
    vessels, airways_central, airways = draw_airways_and_vessels(rng, torso, lungs, spine_cy, spine_r)
    slice_z, nodules, liver_lesions = draw_lesions(rng, torso, lungs, liver)
    texture = draw_texture(rng)
    hu.update(draw_texture_sd(rng))
    return Anatomy(
        length_mm=torso.length,
        slice_z_mm=slice_z,
        body_center=torso.center,
        body_axes=torso.axes,
        chest_scale=torso.chest_scale,
        body_harmonics=torso.harmonics,
        fat_mm=torso.fat,
        muscle_mm=torso.muscle,
        visceral_fat=torso.visceral,
        breath=torso.breath,
        diaphragm_z=torso.diaphragm_z,
        right_dome_rise=torso.right_dome_rise,
        hu=hu,
        lungs=lungs,
        heart=heart,
        aorta=aorta,
        liver=liver,
        spleen=spleen,
        kidneys=kidneys,
        spine=spine,
        ribs=ribs,
        vessels=vessels,
        airways_central=airways_central,
        airways=airways,
        nodules=tuple(nodules),
        liver_lesions=tuple(liver_lesions),
        texture=tuple(sorted(texture.items())),
    )

"""4D DICOM series: medfusion's read_series against dcm2niix on the synthetic series of tests/io/test_dicom_4d.py
(the table of bench/results/dicom_4d.md). Run from the repository root: .venv/bin/python bench/dicom_4d.py
"""

import pathlib
import subprocess
import sys
import tempfile
import warnings

import nibabel as nib
import numpy as np

sys.path.insert(0, "tests/io")
from test_dicom_4d import write_4d

from medfusion.io.dicom import read_series

warnings.simplefilter("ignore")
for key, drop, seed in [
    ("TemporalPositionIdentifier", (), 0),
    ("ContentTime", (), None),
    ("ContentTime", (), 0),
    ("TemporalPositionIdentifier", ((2, 1), (2, 3)), None),
    ("TemporalPositionIdentifier", ((2, 1), (2, 3)), 0),
]:
    d = pathlib.Path(tempfile.mkdtemp())
    write_4d(d / "in", key=key, drop=drop, seed=seed)
    (d / "out").mkdir()
    r = subprocess.run(
        [".venv/bin/dcm2niix", "-z", "n", "-o", str(d / "out"), str(d / "in")], capture_output=True, text=True
    )
    v = read_series(d / "in")
    outs = sorted((d / "out").glob("*.nii"))
    print(
        key,
        drop,
        seed,
        "dcm2niix rc",
        r.returncode,
        [nib.load(o).shape for o in outs],
        "medfusion",
        v.array.shape,
    )
    if outs and nib.load(outs[0]).shape == v.array.shape:
        a, b = (
            nib.as_closest_canonical(nib.load(outs[0])),
            nib.as_closest_canonical(nib.Nifti1Image(v.array, v.affine)),
        )
        print(
            "  equal voxels",
            np.array_equal(a.get_fdata(), b.get_fdata()),
            "affine",
            np.allclose(a.affine, b.affine, atol=1e-3),
        )

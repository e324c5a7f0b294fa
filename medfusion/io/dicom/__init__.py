"""DICOM series discovery, geometry checks, reading to a :class:`~medfusion.io.volume.Volume`, and writing a
series back.

pydicom parses the files and decodes the pixels (its pixel-data plugins cover JPEG lossless, JPEG-LS,
JPEG 2000 and RLE). What no well-kept library does in one place, and is therefore written here:

* **grouping** a folder tree into acquisition series (SeriesInstanceUID, then split where orientation,
  image size, pixel spacing, echo or a repeated acquisition is mixed) with a reason for every split and
  every skipped object (SimpleITK's ``GetGDCMSeriesIDs`` silently merges or drops; MONAI reads one folder):
  :mod:`~medfusion.io.dicom.discovery`;
* **geometry checks** that raise instead of guessing: missing slices, duplicate positions, varying spacing,
  gantry tilt, mixed orientation or size, non-image objects (SEG, SR, RTSTRUCT). dcm2niix does most of this
  but is a binary that writes files; here the result is an in-memory array + affine:
  :mod:`~medfusion.io.dicom.geometry` (from the header facts of :mod:`~medfusion.io.dicom.header`), read by
  :mod:`~medfusion.io.dicom.read`;
* **writing** a derived series that keeps the reference geometry and patient/study identity (for returning
  standardized scans to a PACS): :mod:`~medfusion.io.dicom.write`.

Geometry (DICOM PS3.3 C.7.6.2.1.1, "Image Position and Image Orientation"): the centre of pixel
(row r, column c) of a slice is ``IPP + c * dc * X + r * dr * Y`` with ``X, Y`` the two unit vectors of
ImageOrientationPatient (along a row, along a column) and ``PixelSpacing = (dr, dc)``, in LPS+ mm. Slices are
sorted by ``IPP . (X x Y)``, never by file name, InstanceNumber or SliceLocation. The :class:`Volume` has
``array[i, j, k]`` = column ``i``, row ``j``, slice ``k`` and a RAS+ affine (``diag(-1, -1, 1, 1) @ LPS``).

4D series (dynamic / perfusion CT, fMRI-like MR: the same positions repeated over time) are read as
``array[i, j, k, t]`` with the 3D affine of every time point, ordered by TemporalPositionIdentifier, else
AcquisitionNumber, else TriggerTime / ContentTime / AcquisitionTime (:func:`series_geometry`). A partial last
time point (a scan stopped early, dcm2niix#357/#742) is dropped and reported, never written with t and z
mixed up (dcm2niix#515); a partial earlier one is refused.

Gantry tilt (slices shifted in-plane from one to the next, a sheared grid) is **refused** with a clear error,
not resampled: the NIfTI qform cannot store a sheared grid and resampling changes the voxel values; convert
tilted CT with dcm2niix (``-y``) or resample explicitly before using medfusion.
"""

from __future__ import annotations

from medfusion.io.dicom.discovery import DicomSeries, DiscoveryResult, SkippedItem, discover_series
from medfusion.io.dicom.geometry import TIME_KEYS, SeriesGeometry, series_geometry
from medfusion.io.dicom.header import (
    EXTRA_KEYS,
    NON_IMAGE_MODALITIES,
    SIDECAR_KEYS,
    DicomSeriesError,
    FrameInfo,
    header_meta,
)
from medfusion.io.dicom.read import read_series
from medfusion.io.dicom.write import REFERENCE_TAGS, WRITABLE_MODALITIES, rescale_for, write_dicom_series

__all__ = [
    "EXTRA_KEYS",
    "NON_IMAGE_MODALITIES",
    "REFERENCE_TAGS",
    "SIDECAR_KEYS",
    "TIME_KEYS",
    "WRITABLE_MODALITIES",
    "DicomSeries",
    "DicomSeriesError",
    "DiscoveryResult",
    "FrameInfo",
    "SeriesGeometry",
    "SkippedItem",
    "discover_series",
    "header_meta",
    "read_series",
    "rescale_for",
    "series_geometry",
    "write_dicom_series",
]

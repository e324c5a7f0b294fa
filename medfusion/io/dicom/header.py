"""DICOM headers -> per-frame geometry facts (:class:`FrameInfo`) and the metadata kept with a volume.

pydicom parses the files; this module reads what the rest of :mod:`medfusion.io.dicom` needs from a header,
for single-frame objects, legacy multi-frame objects (frame positions from GridFrameOffsetVector, as RT dose
grids store them) and enhanced multi-frame objects (per-frame and shared functional groups, DICOM PS3.3
C.7.6.16). It also decides what is not a readable image (non-DICOM files, DICOMDIR, SEG / SR / RTSTRUCT and
other non-image objects), so discovery can skip them with a reason.
"""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.io.dicom.pixels import PixelRef, pixel_ref

# Keys of the JSON sidecar written next to every converted NIfTI (None when absent).
SIDECAR_KEYS: tuple[str, ...] = (
    "Manufacturer",
    "ManufacturerModelName",
    "ConvolutionKernel",
    "KVP",
    "Exposure",
    "XRayTubeCurrent",
    "SliceThickness",
    "PixelSpacing",
    "SeriesDescription",
    "SeriesInstanceUID",
    "StudyInstanceUID",
    "PatientID",
    "Modality",
    "SeriesNumber",
    "ImageType",
    "source_files",
)
# Further header fields kept in ``meta`` (naming of outputs, traceability).
EXTRA_KEYS: tuple[str, ...] = (
    "StudyDate",
    "StudyDescription",
    "StudyID",
    "FrameOfReferenceUID",
    "BodyPartExamined",
    "ProtocolName",
    "AcquisitionNumber",
    "DerivationDescription",
)
# Modalities whose objects are not images even when they carry pixel data.
NON_IMAGE_MODALITIES = frozenset(
    {"SEG", "SR", "RTSTRUCT", "RTPLAN", "RTRECORD", "PR", "KO", "REG", "DOC", "FID", "RWV", "PLAN"}
)


class DicomSeriesError(ValueError):
    """A DICOM series cannot be read as one regular volume; the message names the series and files."""


def _fail(label: str, problem: str, files: Iterable[Path]) -> DicomSeriesError:
    """A :class:`DicomSeriesError` naming the series (``label``), the problem and up to six of the files."""
    names = sorted({str(p) for p in files})
    shown = ", ".join(names[:6]) + (f", ... ({len(names)} files)" if len(names) > 6 else "")
    return DicomSeriesError(f"{label}: {problem} [files: {shown}]")


@dataclass(frozen=True)
class FrameInfo:
    """Header facts about one 2D frame (a single-frame file, or one frame of a multi-frame file)."""

    path: Path
    frame: int | None  # index into a multi-frame file's pixel data, None for single-frame files
    rows: int
    columns: int
    position: tuple[float, float, float] | None  # ImagePositionPatient (LPS mm)
    orientation: tuple[float, ...] | None  # ImageOrientationPatient (6 direction cosines)
    pixel_spacing: tuple[float, float] | None  # (row spacing, column spacing) mm
    slice_thickness: float | None
    slope: float
    intercept: float
    acquisition_number: int | None
    echo_number: int | None
    temporal_index: int | None
    instance_number: int | None
    trigger_time: float | None = None  # TriggerTime (ms) / NominalCardiacTriggerDelayTime
    content_time: float | None = None  # ContentTime (s since midnight) / FrameReferenceDateTime
    acquisition_time: float | None = None  # AcquisitionTime (s since midnight) / FrameAcquisitionDateTime
    # where an uncompressed file keeps its stored values (read without parsing the file again); None: decode
    pixel_ref: PixelRef | None = field(default=None, compare=False, repr=False)


def _jsonable(value: Any) -> Any:
    """pydicom value -> JSON-friendly Python value (None for empty / binary)."""
    from pydicom.multival import MultiValue
    from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName

    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (DSfloat, DSdecimal, float)):
        return float(value)
    if isinstance(value, PersonName):
        return str(value)
    if isinstance(value, bytes):
        return None
    if isinstance(value, (int, str)):
        return value
    return str(value)


def _find(ds: Any, keyword: str) -> Any:
    """Top-level value, else the value inside the shared / first per-frame functional groups (enhanced)."""
    if keyword in ds and ds[keyword].value not in (None, ""):
        return ds[keyword].value
    for group in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        seq = ds.get(group)
        if not seq:
            continue
        for elem in seq[0]:
            if elem.VR == "SQ":
                for item in elem.value:
                    if keyword in item and item[keyword].value not in (None, ""):
                        return item[keyword].value
    return None


def header_meta(ds: Any) -> dict:
    """The sidecar keys (and :data:`EXTRA_KEYS`) from a dataset; ``None`` where absent."""
    meta = {key: _jsonable(_find(ds, key)) for key in SIDECAR_KEYS if key != "source_files"}
    for key in EXTRA_KEYS:
        meta[key] = _jsonable(_find(ds, key))
    if meta["ImageType"] is not None and not isinstance(meta["ImageType"], list):
        meta["ImageType"] = [meta["ImageType"]]
    return meta


def _floats(value: Any, n: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        out = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return out if len(out) == n and all(math.isfinite(v) for v in out) else None


def _field_floats(ds: Any, keyword: str, n: int, *, positive: bool = False) -> tuple[float, ...] | None:
    """``n`` finite numbers from field ``keyword`` (None when it is absent or empty); ``ValueError`` naming the
    field when it is present but holds something else (text, NaN, the wrong count, zero or negative spacing)."""
    try:
        raw = ds.get(keyword)
    except Exception as exc:  # noqa: BLE001 - pydicom fails converting a corrupt raw value
        raise ValueError(f"{keyword} cannot be read ({type(exc).__name__}: {exc})") from exc
    if raw is None or raw == "" or (hasattr(raw, "__len__") and not isinstance(raw, str) and len(raw) == 0):
        return None
    values = _floats([raw] if isinstance(raw, (str, bytes)) or not hasattr(raw, "__iter__") else raw, n)
    if values is None:
        raise ValueError(f"{keyword} {_show(raw)} is not {n} finite numbers")
    if positive and min(values) <= 0:
        raise ValueError(f"{keyword} {_show(raw)} must be positive")
    return values


def _field_float(ds: Any, keyword: str, default: float, *, nonzero: bool = False) -> float:
    """One finite number from field ``keyword`` (``default`` when absent); ``ValueError`` naming the field."""
    values = _field_floats(ds, keyword, 1)
    if values is None:
        return default
    if nonzero and values[0] == 0:
        raise ValueError(f"{keyword} is 0: every pixel would map to the same value")
    return values[0]


def _show(value: Any) -> str:
    text = (
        "\\".join(str(v) for v in value)
        if isinstance(value, (list, tuple)) or hasattr(value, "append")
        else str(value)
    )
    return repr(text[:40])


def _check_orientation(iop: tuple[float, ...] | None) -> None:
    """ImageOrientationPatient must hold two unit-length, orthogonal direction cosines (PS3.3 C.7.6.2.1.1)."""
    if iop is None:
        return
    row, col = np.asarray(iop[:3]), np.asarray(iop[3:])
    norms = (float(np.linalg.norm(row)), float(np.linalg.norm(col)))
    if min(norms) < 0.5 or max(norms) > 1.5 or abs(float(np.dot(row, col))) > 0.01 * norms[0] * norms[1]:
        raise ValueError(
            f"ImageOrientationPatient {list(iop)} is not two orthogonal unit vectors "
            f"(lengths {norms[0]:.3g}, {norms[1]:.3g}, dot product {float(np.dot(row, col)):.3g})"
        )


def _opt_int(value: Any) -> int | None:
    try:
        return None if value in (None, "") else int(value)
    except (TypeError, ValueError):
        return None


def _tm_seconds(value: Any) -> float | None:
    """DICOM TM (``HHMMSS.FFFFFF``, legacy ``HH:MM:SS``) or the time part of a DT -> seconds since midnight."""
    if value in (None, ""):
        return None
    text = str(value).strip().replace(":", "")
    if len(text) >= 14 and text[:8].isdigit():  # DT: YYYYMMDDHHMMSS.FFFFFF[&ZZXX]
        days = int(text[6:8])
        text = text[8:].split("+")[0].split("-")[0]
    else:
        days = 0
    try:
        hours = int(text[0:2])
        minutes = int(text[2:4]) if len(text) >= 4 else 0
        seconds = float(text[4:]) if len(text) > 4 else 0.0
    except ValueError:
        return None
    return days * 86400.0 + hours * 3600.0 + minutes * 60.0 + seconds


def _opt_float(value: Any) -> float | None:
    try:
        out = None if value in (None, "") else float(value)
    except (TypeError, ValueError):
        return None
    return out if out is not None and math.isfinite(out) else None


def _group_value(item: Any, shared: Any, sequence: str, keyword: str) -> Any:
    for source in (item, shared):
        if source is not None and sequence in source and source[sequence].value:
            inner = source[sequence].value[0]
            if keyword in inner and inner[keyword].value not in (None, ""):
                return inner[keyword].value
    return None


def _file_frame(ds: Any, path: Path) -> FrameInfo:
    """The header's file-level values as one frame (``frame=None``); per-frame values refine it."""
    slope = _field_float(ds, "RescaleSlope", 1.0, nonzero=True)
    if ds.get("Modality") == "RTDOSE" and ds.get("DoseGridScaling") is not None:
        slope = _field_float(ds, "DoseGridScaling", 1.0, nonzero=True)
    thick = _opt_float(ds.get("SliceThickness"))
    orientation = _field_floats(ds, "ImageOrientationPatient", 6)
    _check_orientation(orientation)
    spacing_key = "PixelSpacing" if "PixelSpacing" in ds else "ImagerPixelSpacing"
    rows, columns = _opt_int(ds.get("Rows")), _opt_int(ds.get("Columns"))
    if not rows or not columns or rows < 1 or columns < 1:
        raise ValueError(f"Rows {ds.get('Rows')!r} / Columns {ds.get('Columns')!r} must be positive integers")
    return FrameInfo(
        path=path,
        frame=None,
        rows=rows,
        columns=columns,
        position=_field_floats(ds, "ImagePositionPatient", 3),
        orientation=orientation,
        pixel_spacing=_field_floats(ds, spacing_key, 2, positive=True),
        slice_thickness=thick if thick is not None and thick > 0 else None,
        slope=slope,
        intercept=_field_float(ds, "RescaleIntercept", 0.0),
        acquisition_number=_opt_int(ds.get("AcquisitionNumber")),
        echo_number=_opt_int(ds.get("EchoNumbers")),
        temporal_index=_opt_int(ds.get("TemporalPositionIdentifier")),
        instance_number=_opt_int(ds.get("InstanceNumber")),
        trigger_time=_opt_float(ds.get("TriggerTime")),
        content_time=_tm_seconds(ds.get("ContentTime")),
        acquisition_time=_tm_seconds(ds.get("AcquisitionTime")),
    )


def _enhanced_frame(item: Any, shared: Any, index: int, base: FrameInfo) -> FrameInfo:
    """Frame ``index`` of an enhanced multi-frame object: its functional groups (per-frame ``item``, else
    ``shared``) override the file-level values of ``base``; time fields come from the groups only."""

    def group(sequence: str, keyword: str) -> Any:
        return _group_value(item, shared, sequence, keyword)

    slope = group("PixelValueTransformationSequence", "RescaleSlope")
    intercept = group("PixelValueTransformationSequence", "RescaleIntercept")
    thick = group("PixelMeasuresSequence", "SliceThickness")
    return replace(
        base,
        frame=index,
        position=_floats(group("PlanePositionSequence", "ImagePositionPatient"), 3) or base.position,
        orientation=_floats(group("PlaneOrientationSequence", "ImageOrientationPatient"), 6)
        or base.orientation,
        pixel_spacing=_floats(group("PixelMeasuresSequence", "PixelSpacing"), 2) or base.pixel_spacing,
        slice_thickness=float(thick) if thick is not None else base.slice_thickness,
        slope=float(slope) if slope is not None else base.slope,
        intercept=float(intercept) if intercept is not None else base.intercept,
        acquisition_number=_opt_int(group("FrameContentSequence", "FrameAcquisitionNumber"))
        or base.acquisition_number,
        temporal_index=_opt_int(group("FrameContentSequence", "TemporalPositionIndex")),
        trigger_time=_opt_float(group("CardiacSynchronizationSequence", "NominalCardiacTriggerDelayTime")),
        content_time=_tm_seconds(group("FrameContentSequence", "FrameReferenceDateTime")),
        acquisition_time=_tm_seconds(group("FrameContentSequence", "FrameAcquisitionDateTime")),
    )


def _legacy_frames(ds: Any, base: FrameInfo) -> list[FrameInfo]:
    """Frames of a single-frame or legacy multi-frame object. Frame positions of a multi-frame object are
    ``IPP + GridFrameOffsetVector[f] * normal`` (RT dose, PS3.3 C.8.8.3.2); without that vector only the
    object's one ImagePositionPatient is known, kept on frame 0 (the origin), the others None."""
    n_frames = _opt_int(ds.get("NumberOfFrames")) or 1
    if n_frames == 1:
        return [base]
    offsets = ds.get("GridFrameOffsetVector")
    ipp, iop = base.position, base.orientation
    frames = []
    for index in range(n_frames):
        position = None
        if offsets is not None and ipp is not None and iop is not None and len(offsets) == n_frames:
            normal = np.cross(iop[:3], iop[3:])
            position = tuple(float(v) for v in np.asarray(ipp) + float(offsets[index]) * normal)
        elif index == 0:
            position = ipp
        frames.append(replace(base, frame=index, position=position))
    return frames


def _frames_from_header(ds: Any, path: Path) -> list[FrameInfo]:
    """Expand a header to per-frame geometry (single-frame, legacy multi-frame and enhanced objects), each frame
    carrying where the file's uncompressed pixel values are (:func:`~medfusion.io.dicom.pixels.pixel_ref`)."""
    base = replace(_file_frame(ds, path), pixel_ref=pixel_ref(ds))
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not per_frame:
        return _legacy_frames(ds, base)
    shared_seq = ds.get("SharedFunctionalGroupsSequence")
    shared = shared_seq[0] if shared_seq else None
    return [_enhanced_frame(item, shared, index, base) for index, item in enumerate(per_frame)]


# Datasets parsed by discovery, kept for read_series so that each file is parsed once (pixel data deferred,
# PS3.5 values read on first access); bounded, and keyed by path, mtime and size so that a changed file is re-read.
_DEFER_SIZE = 4096
PARSED_CACHE_SIZE = 1024
_PARSED: OrderedDict[tuple[str, int, int], Any] = OrderedDict()


def _file_key(path: Path) -> tuple[str, int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (str(Path(path).absolute()), stat.st_mtime_ns, stat.st_size)


def _remember(path: Path, ds: Any) -> None:
    key = _file_key(path)
    if key is None or PARSED_CACHE_SIZE <= 0:
        return
    _PARSED[key] = ds
    while len(_PARSED) > PARSED_CACHE_SIZE:
        _PARSED.popitem(last=False)


def take_parsed(path: Path) -> Any | None:
    """The dataset discovery parsed from ``path`` (removed from the cache), or None if it is not there or the
    file changed since."""
    key = _file_key(path)
    return _PARSED.pop(key, None) if key is not None else None


def peek_parsed(path: Path) -> Any | None:
    """The dataset discovery parsed from ``path`` (left in the cache), or None."""
    key = _file_key(path)
    return _PARSED.get(key) if key is not None else None


@contextlib.contextmanager
def quiet_reading() -> Iterator[None]:
    """Read headers without pydicom's value validation and its warnings, for batch jobs that report problems
    themselves (:func:`medfusion.io.convert.convert_tree`).

    pydicom checks every value it converts against its VR (``config.settings.reading_validation_mode``); in its
    default mode (WARN) that only warns and leaves the value as it is, so skipping it (IGNORE) gives the same
    values, about a fifth faster on a typical CT header. A stricter mode set by the caller (RAISE) is kept. The
    setting is global to pydicom, so other threads reading DICOM meanwhile are not validated either."""
    from pydicom import config

    settings = config.settings
    previous = settings.reading_validation_mode
    if previous == config.WARN:
        settings.reading_validation_mode = config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        settings.reading_validation_mode = previous


def _read_header(path: Path, remember: bool = True) -> tuple[Any | None, str | None]:
    """``(dataset, None)`` or ``(None, reason)`` for a file that is not a readable DICOM object; ``remember``
    keeps the dataset for :func:`take_parsed` (a worker process that parses for another keeps nothing)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        with open(path, "rb") as handle:
            head = handle.read(132)
    except OSError as exc:
        return None, f"unreadable file: {exc}"
    if head[128:132] != b"DICM" and head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return None, "not DICOM (no DICM preamble, does not start with a group 0002/0008 tag)"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:  # the whole file, large values (pixel data) deferred: read_series can use it as it is
                ds = pydicom.dcmread(path, defer_size=_DEFER_SIZE)
                if remember:
                    _remember(path, ds)
            except InvalidDicomError:
                raise
            except Exception:  # noqa: BLE001 - e.g. truncated after the pixel data: the header may still do
                ds = pydicom.dcmread(path, stop_before_pixels=True)
    except InvalidDicomError:
        # files written without the 128-byte preamble: accept only if they parse to a real header
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ds = pydicom.dcmread(path, stop_before_pixels=True, force=True)
        except Exception as exc:  # noqa: BLE001 - any parse failure means "not DICOM"
            return None, f"not DICOM ({type(exc).__name__})"
        if "SOPClassUID" not in ds or "SeriesInstanceUID" not in ds:
            return None, "not DICOM (no DICM preamble and no SOP Class / Series Instance UID)"
    except Exception as exc:  # noqa: BLE001 - truncated / corrupt headers
        return None, f"unreadable DICOM header: {type(exc).__name__}: {exc}"
    return ds, None


def _non_image_reason(ds: Any) -> str | None:
    """Why a dataset is not an image (None if it is one)."""
    modality = str(ds.get("Modality", "") or "")
    sop = ds.get("SOPClassUID")
    if sop is None and getattr(ds, "file_meta", None) is not None:
        sop = ds.file_meta.get("MediaStorageSOPClassUID")
    sop_name = getattr(sop, "name", str(sop)) if sop is not None else "unknown SOP class"
    if str(sop) == "1.2.840.10008.1.3.10":
        return "DICOMDIR (media directory, not an image)"
    if modality in NON_IMAGE_MODALITIES:
        return f"non-image object (Modality {modality}, {sop_name})"
    if "Rows" not in ds or "Columns" not in ds:
        return f"non-image object (no pixel matrix; Modality {modality or '?'}, {sop_name})"
    if "SeriesInstanceUID" not in ds:
        return "image without SeriesInstanceUID"
    return None


def _unsupported_reason(ds: Any) -> str | None:
    """Why an image cannot become a greyscale volume (None if it can): colour pixels, including palette colour
    whose stored values are indices into a colour table (PS3.3 C.7.6.3.1.2)."""
    samples = _opt_int(ds.get("SamplesPerPixel")) or 1
    photometric = str(ds.get("PhotometricInterpretation", "") or "?").strip()
    if samples != 1 or photometric == "PALETTE COLOR":
        return (
            f"colour image (SamplesPerPixel {samples}, PhotometricInterpretation {photometric}); "
            "medfusion converts greyscale images only"
        )
    return None


def _image_type(ds: Any) -> list[str]:
    value = ds.get("ImageType")
    if value is None:
        return []
    return [str(v).upper() for v in (value if not isinstance(value, str) else value.split("\\"))]

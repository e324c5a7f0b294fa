"""Reading one DICOM series to a :class:`~medfusion.io.volume.Volume`: ``array[i, j, k]`` (or
``array[i, j, k, t]`` for 4D) with its RAS+ affine and the header metadata.

pydicom decodes the pixels (its pixel-data plugins cover JPEG lossless, JPEG-LS, JPEG 2000 and RLE); the
geometry comes from :func:`medfusion.io.dicom.geometry.series_geometry`. RescaleSlope / RescaleIntercept
(PS3.3 C.11.1.1.2) are applied per frame, so CT comes out in Hounsfield units.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from medfusion.io.dicom.discovery import DicomSeries, discover_series
from medfusion.io.dicom.geometry import series_geometry
from medfusion.io.dicom.header import (
    DicomSeriesError,
    FrameInfo,
    _fail,
    _frames_from_header,
    _non_image_reason,
    _read_header,
    header_meta,
    take_parsed,
)
from medfusion.io.volume import Volume


def _frames_from_files(paths: Sequence[Path], label: str) -> tuple[list[FrameInfo], dict]:
    frames: list[FrameInfo] = []
    meta: dict | None = None
    uids = set()
    for path in paths:
        ds, reason = _read_header(path)
        if ds is None:
            raise _fail(label, f"{path.name}: {reason}", [path])
        reason = _non_image_reason(ds)
        if reason is not None:
            raise _fail(label, f"{path.name} is not an image: {reason}", [path])
        uids.add(str(ds.SeriesInstanceUID))
        try:
            frames.extend(_frames_from_header(ds, path))
        except Exception as exc:  # noqa: BLE001
            raise _fail(
                label, f"{path.name}: unreadable image header ({type(exc).__name__}: {exc})", [path]
            ) from exc
        if meta is None:
            meta = header_meta(ds)
    if len(uids) > 1:
        raise _fail(
            label, f"files belong to {len(uids)} different series (SeriesInstanceUID {sorted(uids)})", paths
        )
    return frames, meta or {}


def _resolve(series_or_files: Any) -> tuple[list[FrameInfo], dict, str]:
    if isinstance(series_or_files, DicomSeries):
        return list(series_or_files.frames), dict(series_or_files.meta), series_or_files.label
    if isinstance(series_or_files, (str, os.PathLike)):
        path = Path(series_or_files)
        if path.is_dir():
            found = discover_series(path, include_derived=True, include_localizers=True)
            if len(found.series) != 1:
                listing = "; ".join(s.label for s in found.series) or "none"
                skipped = "; ".join(f"{s.paths[0].name}: {s.reason}" for s in found.skipped[:5])
                raise DicomSeriesError(
                    f"{path}: expected exactly one image series, found {len(found.series)} ({listing})"
                    + (f"; skipped: {skipped}" if skipped else "")
                    + " - use discover_series() and pick one"
                )
            return _resolve(found.series[0])
        series_or_files = [path]
    paths = [Path(p) for p in series_or_files]
    if not paths:
        raise DicomSeriesError("no files given")
    label = f"files in {paths[0].parent}"
    frames, meta = _frames_from_files(paths, label)
    label = f"series {meta.get('SeriesInstanceUID')} ({meta.get('SeriesDescription') or 'no description'})"
    return frames, meta, label


def _decode(path: Path, label: str) -> tuple[np.ndarray, Any]:
    """Full dataset + decoded pixel array (frames first for multi-frame objects)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    ds = take_parsed(path)  # parsed once by discovery, pixel data deferred until now
    try:
        if ds is None:
            try:
                ds = pydicom.dcmread(path)
            except InvalidDicomError:  # no preamble: discovery accepted its header (UIDs present); read it so
                ds = pydicom.dcmread(path, force=True)
    except Exception as exc:  # noqa: BLE001
        raise _fail(
            label, f"{path.name}: unreadable or corrupt file ({type(exc).__name__}: {exc})", [path]
        ) from exc
    syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
    syntax_text = f"{syntax.name} ({syntax})" if syntax is not None else "unknown transfer syntax"
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise _fail(
            label,
            f"{path.name}: colour images (SamplesPerPixel {ds.SamplesPerPixel}) are not supported",
            [path],
        )
    try:
        problem = _pixel_header_problem(ds, syntax)
    except Exception as exc:  # noqa: BLE001 - bad values, or deferred pixel data that cannot be read
        problem = (
            f"unreadable pixel description (Rows, Columns, NumberOfFrames, BitsAllocated, BitsStored): {exc}"
        )
    if problem:
        raise _fail(label, f"{path.name}: {problem}", [path])
    try:
        pixels = _native_pixels(ds, syntax)
        if pixels is None:
            pixels = ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - missing plugin, corrupt stream, truncated data
        raise _fail(
            label,
            f"cannot decode pixel data of {path.name}, transfer syntax {syntax_text}: {type(exc).__name__}: {exc} "
            f"(header: {_pixel_fields(ds)})",
            [path],
        ) from exc
    return np.asarray(pixels), ds


# Implicit VR Little Endian, Explicit VR Little Endian
_NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


def _native_pixels(ds: Any, syntax: Any) -> np.ndarray | None:
    """The stored values of uncompressed little-endian greyscale pixel data, straight from the bytes (PS3.5 8.1.1:
    frames of Rows x Columns values, row by row); None where pydicom's decoder is needed (compressed, big endian,
    colour, 1-bit or float data). Bits above BitsStored are ignored as pydicom does (shifted out, sign-extended
    for signed data), so the result equals ``ds.pixel_array``, without its per-file set-up cost."""
    allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    representation = ds.get("PixelRepresentation")
    if (
        str(syntax) not in _NATIVE_SYNTAXES
        or allocated not in (8, 16, 32)
        or stored is None
        or representation not in (0, 1)
        or str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2")
        or "PixelData" not in ds
    ):
        return None
    rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<{'iu'[representation == 0]}{allocated // 8}")
    count = rows * columns * frames
    raw = _deferred_pixel_data(ds)  # deferred by discovery: read the bytes at their offset
    if raw is not None:
        with open(ds.filename, "rb") as handle:
            handle.seek(raw.value_tell)
            data = handle.read(count * dtype.itemsize)
    else:
        data = ds.PixelData
    pixels = np.frombuffer(data, dtype=dtype, count=count)
    pixels = pixels.reshape((frames, rows, columns) if frames > 1 else (rows, columns))
    shift = int(allocated) - int(stored)
    if shift:
        pixels = np.right_shift(np.left_shift(pixels, shift), shift)
    return pixels


def _deferred_pixel_data(ds: Any) -> Any | None:
    """The PixelData element still on disk (deferred by discovery's parse), with its offset; None if read."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None or raw.value is not None or not getattr(raw, "value_tell", None):
        return None
    return raw if isinstance(getattr(ds, "filename", None), str) else None


def _pixel_data_length(ds: Any) -> int:
    """Bytes of PixelData there are: for a deferred value, its stated length, cut where the file ends."""
    raw = _deferred_pixel_data(ds)
    if raw is None:
        return len(ds.PixelData)
    return max(min(int(raw.length), os.path.getsize(ds.filename) - int(raw.value_tell)), 0)


def _pixel_fields(ds: Any) -> str:
    """The header fields that describe the pixel data, for error messages."""
    keys = ("Rows", "Columns", "NumberOfFrames", "BitsAllocated", "BitsStored", "PixelRepresentation")
    return ", ".join(f"{k} {ds.get(k)}" for k in keys if k in ds)


def _pixel_header_problem(ds: Any, syntax: Any) -> str | None:
    """What in the pixel description (PS3.3 C.7.6.3) contradicts itself or the stored bytes, naming the fields;
    None if nothing. Encapsulated (compressed) pixel data is left to the decoder."""
    allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    if allocated not in (8, 16, 32, 64) and not (allocated == 1 and ds.get("Modality") == "SEG"):
        return f"BitsAllocated {allocated!r} is not 8, 16, 32 or 64"
    if stored is not None and not 1 <= int(stored) <= int(allocated):
        return f"BitsStored {stored!r} is not between 1 and BitsAllocated {allocated}"
    if "PixelData" not in ds:
        return "no PixelData element"
    if syntax is None or not getattr(syntax, "is_encapsulated", False):
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        rows, columns = int(ds.Rows), int(ds.Columns)
        expected = rows * columns * frames * int(ds.get("SamplesPerPixel", 1) or 1) * int(allocated) // 8
        have = _pixel_data_length(ds)
        if have < expected:
            return (
                f"PixelData holds {have} bytes, but Rows x Columns x NumberOfFrames x BitsAllocated/8 = "
                f"{rows} x {columns} x {frames} x {int(allocated) // 8} = {expected} bytes: the pixel data is "
                f"truncated, one of these fields is wrong, or the data is compressed although TransferSyntaxUID "
                f"{syntax or '(absent)'} says it is not"
            )
    return None


def _frame_pixels(frames: Sequence[FrameInfo], label: str) -> list[np.ndarray]:
    """The stored 2D pixels of each frame, in order (each file decoded once; frames of a multi-frame file are
    views into its array), checked against the frame's Rows x Columns."""
    decoded: dict[Path, np.ndarray] = {}
    out = []
    for frame in frames:
        if frame.path not in decoded:
            decoded[frame.path], _ = _decode(frame.path, label)
        pixels = decoded[frame.path]
        if frame.frame is not None:
            if pixels.ndim < 3 or frame.frame >= pixels.shape[0]:
                raise _fail(
                    label, f"{frame.path.name}: frame {frame.frame} missing from the pixel data", [frame.path]
                )
            pixels = pixels[frame.frame]
        if pixels.shape != (frame.rows, frame.columns):
            raise _fail(
                label,
                f"{frame.path.name}: pixel data shape {pixels.shape} != (Rows, Columns) {(frame.rows, frame.columns)}",
                [frame.path],
            )
        out.append(pixels)
    return out


def _fits_int16(frames: Sequence[FrameInfo], pixels: Sequence[np.ndarray]) -> bool:
    """Whether every rescaled value ``stored * slope + intercept`` is an integer in int16's range, computed exactly
    in integers and equal to the float32 result: integer stored values of at most 16 bits, integer slopes and
    intercepts with ``|intercept| <= 2**15`` (so every intermediate value stays below float32's 2**24)."""
    for frame, values in zip(frames, pixels):
        slope, intercept = float(frame.slope), float(frame.intercept)
        if not (
            np.issubdtype(values.dtype, np.integer)
            and values.dtype.itemsize <= 2
            and slope.is_integer()
            and intercept.is_integer()
            and abs(intercept) <= 2**15
        ):
            return False
        if values.size:
            ends = (float(values.min()) * slope + intercept, float(values.max()) * slope + intercept)
            if min(ends) < -32768 or max(ends) > 32767:
                return False
    return True


def read_series(
    series_or_files: DicomSeries | str | os.PathLike | Iterable[str | os.PathLike],
    *,
    keep_int16: bool = False,
) -> Volume:
    """Read one DICOM series to a :class:`Volume` (``array[i, j, k]`` or ``array[i, j, k, t]``, RAS+ affine).

    Args:
        series_or_files: a :class:`DicomSeries` from :func:`discover_series`, a folder holding exactly one
            series, a single (multi-frame) file, or a list of files of one series.
        keep_int16: when every rescaled value is an integer in int16's range (CT in HU from integer pixels,
            slopes and intercepts), return int16 instead of float32: the same values, half the memory, no
            float pass (how :func:`medfusion.io.convert.convert_tree` and dcm2niix store CT).

    Slices are sorted along the normal of ImageOrientationPatient. RescaleSlope / RescaleIntercept are
    applied per frame: the array is float32 then (CT in HU); otherwise the stored integer type is kept
    (uint16 above 32767 survives). Raises :class:`DicomSeriesError` naming the series and the files.

    A 4D series (repeated positions, see :func:`series_geometry` for how time points are ordered) gives
    ``array[i, j, k, t]`` with the 3D affine of every time point (nibabel writes it as a 4D NIfTI, as
    dcm2niix does); ``meta["time_key"]`` / ``meta["time_values"]`` say how time was ordered, and
    ``meta["incomplete"]`` (also in ``meta["warnings"]``) says when a partial last volume was dropped.
    Note that :attr:`Volume.spacing` is meant for 2D/3D arrays: use ``voxel_spacing(affine, 3)`` for 4D.
    """
    frames, meta, label = _resolve(series_or_files)
    geometry = series_geometry(frames, label)
    ordered = geometry.frames
    n_slices = geometry.shape[2] if len(geometry.shape) > 2 else 1
    rescale = any(f.slope != 1.0 or f.intercept != 0.0 for f in ordered) or meta.get("Modality") == "CT"
    pixels = _frame_pixels(ordered, label)
    integers = rescale and keep_int16 and _fits_int16(ordered, pixels)
    dtype = np.int16 if integers else (np.float32 if rescale else pixels[0].dtype)
    # Fortran order: each slice (a row-major DICOM frame, transposed) is one contiguous block, and the array is
    # already in NIfTI's on-disk voxel order
    n = len(ordered)
    out = np.empty((ordered[0].columns, ordered[0].rows, n_slices, n // n_slices), dtype=dtype, order="F")
    for k, (frame, values) in enumerate(zip(ordered, pixels)):
        index = (slice(None), slice(None), k % n_slices, k // n_slices)  # frames are time-major
        if integers:  # exact: checked by _fits_int16
            work = values.T.astype(np.int32)
            if frame.slope != 1.0:
                work *= int(frame.slope)
            work += int(frame.intercept)
            out[index] = work
        elif rescale:
            out[index] = values.T.astype(np.float32) * np.float32(frame.slope) + np.float32(frame.intercept)
        else:
            out[index] = values.T
    pixel_type = pixels[-1].dtype
    del pixels
    array = out.reshape(geometry.shape)
    meta = dict(meta)
    meta["source_files"] = [str(p) for p in dict.fromkeys(f.path for f in ordered)]
    meta["warnings"] = list(geometry.warnings)
    meta["time_key"] = geometry.time_key
    meta["time_values"] = list(geometry.time_values) if geometry.time_key else None
    meta["incomplete"] = geometry.incomplete
    meta["time_step"] = geometry.time_step
    # stored integers times integer slopes plus integer intercepts are integers (exact in float32 below 2**24):
    # lets writers store int16 without checking every voxel
    meta["integer_valued"] = bool(
        np.issubdtype(np.dtype(pixel_type), np.integer)
        and all(float(f.slope).is_integer() and float(f.intercept).is_integer() for f in ordered)
    )
    for note in geometry.warnings:
        warnings.warn(f"{label}: {note}", stacklevel=2)
    return Volume(array=array, affine=geometry.affine, meta=meta)

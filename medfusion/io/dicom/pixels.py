"""Stored pixel values of uncompressed DICOM files, read straight from their bytes.

For Implicit and Explicit VR Little Endian greyscale data (PS3.5 8.1.1: frames of Rows x Columns values, row by
row) the stored values are one ``numpy`` read at the PixelData element's offset. pydicom's ``pixel_array`` gives
the same values but sets up a decoder per file (about 4 ms each, most of a 512² slice's reading time), and reading
the file again through pydicom repeats its header parse. Compressed, big-endian, colour, 1-bit and float data are
left to pydicom's decoders (:func:`medfusion.io.dicom.read._decode`).

:class:`PixelRef` records where a file's values are while its header is parsed (discovery may parse in worker
processes, which return only such facts, not datasets), so that reading needs no second parse; the file's size and
modification time are kept with it, and a file changed since falls back to a full read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

# Implicit VR Little Endian, Explicit VR Little Endian
NATIVE_SYNTAXES = frozenset({"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"})


@dataclass(frozen=True)
class PixelRef:
    """Where an uncompressed little-endian greyscale file keeps its stored values, and how to unpack them."""

    offset: int  # byte offset of the PixelData value in the file
    dtype: str  # numpy dtype of the stored values, e.g. '<i2'
    shape: tuple[int, ...]  # (rows, columns), or (frames, rows, columns) for multi-frame objects
    shift: int  # BitsAllocated - BitsStored: high bits to drop (sign-extending signed data)
    size: int  # file size in bytes when the header was parsed
    mtime_ns: int  # file modification time then


def _native_layout(ds: Any, syntax: Any) -> tuple[np.dtype, tuple[int, ...], int] | None:
    """(dtype, shape, shift) of uncompressed little-endian greyscale pixel data; None where a decoder is needed."""
    allocated, stored = ds.get("BitsAllocated"), ds.get("BitsStored")
    representation = ds.get("PixelRepresentation")
    if (
        str(syntax) not in NATIVE_SYNTAXES
        or allocated not in (8, 16, 32)
        or stored is None
        or not 1 <= int(stored) <= int(allocated)
        or representation not in (0, 1)
        or int(ds.get("SamplesPerPixel", 1) or 1) != 1
        or str(ds.get("PhotometricInterpretation", "")).strip() not in ("MONOCHROME1", "MONOCHROME2")
        or "PixelData" not in ds
    ):
        return None
    rows, columns, frames = int(ds.Rows), int(ds.Columns), int(ds.get("NumberOfFrames", 1) or 1)
    dtype = np.dtype(f"<{'iu'[representation == 0]}{allocated // 8}")
    shape = (frames, rows, columns) if frames > 1 else (rows, columns)
    return dtype, shape, int(allocated) - int(stored)


def _unpack(data: bytes | np.ndarray, dtype: np.dtype, shape: tuple[int, ...], shift: int) -> np.ndarray:
    """Stored values with the bits above BitsStored dropped as pydicom does (shifted out, sign-extended for
    signed data), so the result equals ``ds.pixel_array``."""
    pixels = np.frombuffer(data, dtype=dtype, count=int(np.prod(shape))).reshape(shape)
    if shift:
        pixels = np.right_shift(np.left_shift(pixels, shift), shift)
    return pixels


def deferred_pixel_data(ds: Any) -> Any | None:
    """The PixelData element still on disk (deferred by the header parse), with its offset; None if read."""
    raw = ds.get_item("PixelData", keep_deferred=True)
    if raw is None or raw.value is not None or not getattr(raw, "value_tell", None):
        return None
    return raw if isinstance(getattr(ds, "filename", None), str) else None


def pixel_data_length(ds: Any) -> int:
    """Bytes of PixelData there are: for a deferred value, its stated length, cut where the file ends."""
    raw = deferred_pixel_data(ds)
    if raw is None:
        return len(ds.PixelData)
    return max(min(int(raw.length), os.path.getsize(ds.filename) - int(raw.value_tell)), 0)


def native_pixels(ds: Any, syntax: Any) -> np.ndarray | None:
    """The stored values of uncompressed little-endian greyscale pixel data, straight from the bytes (read at
    their offset when the parse deferred them); None where pydicom's decoder is needed. Equals ``ds.pixel_array``
    without its per-file set-up cost."""
    layout = _native_layout(ds, syntax)
    if layout is None:
        return None
    dtype, shape, shift = layout
    raw = deferred_pixel_data(ds)
    if raw is not None:
        with open(ds.filename, "rb") as handle:
            handle.seek(raw.value_tell)
            data = handle.read(int(np.prod(shape)) * dtype.itemsize)
    else:
        data = ds.PixelData
    return _unpack(data, dtype, shape, shift)


def pixel_ref(ds: Any) -> PixelRef | None:
    """A :class:`PixelRef` for a dataset parsed with its pixel data deferred, when the data is uncompressed
    greyscale and the file holds all of it; None otherwise (the reader then decodes the file with pydicom, which
    also reports what is wrong)."""
    try:
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        layout = _native_layout(ds, syntax)
        raw = deferred_pixel_data(ds) if layout is not None else None
        if raw is None:
            return None
        dtype, shape, shift = layout
        stat = os.stat(ds.filename)
        needed = int(np.prod(shape)) * dtype.itemsize
        if min(int(raw.length), stat.st_size - int(raw.value_tell)) < needed:
            return None
        return PixelRef(int(raw.value_tell), dtype.str, shape, shift, stat.st_size, stat.st_mtime_ns)
    except Exception:  # noqa: BLE001 - odd values: leave the file to the full reader and its error messages
        return None


def read_ref(ref: PixelRef, path: str | os.PathLike) -> np.ndarray | None:
    """The stored values :class:`PixelRef` points to; None if the file changed since its header was parsed
    (or cannot be read), so that the caller reads it again in full."""
    try:
        stat = os.stat(path)
        if (stat.st_size, stat.st_mtime_ns) != (ref.size, ref.mtime_ns):
            return None
        dtype = np.dtype(ref.dtype)
        count = int(np.prod(ref.shape))
        with open(path, "rb") as handle:
            handle.seek(ref.offset)
            data = handle.read(count * dtype.itemsize)
    except OSError:
        return None
    if len(data) < count * dtype.itemsize:
        return None
    return _unpack(data, dtype, ref.shape, ref.shift)

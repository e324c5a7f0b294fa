"""Geometry of a DICOM series from its headers: slice order, spacing and orientation checks, the affine, and the
time points of a 4D series.

DICOM PS3.3 C.7.6.2.1.1 ("Image Position and Image Orientation"): the centre of pixel (row r, column c) of a
slice is ``IPP + c * dc * X + r * dr * Y`` with ``X, Y`` the two unit vectors of ImageOrientationPatient (along
a row, along a column) and ``PixelSpacing = (dr, dc)``, in LPS+ mm. Slices are sorted by ``IPP . (X x Y)``,
never by file name, InstanceNumber or SliceLocation. The affine maps ``array[i, j, k]`` (column ``i``, row
``j``, slice ``k``) to RAS+ mm (``diag(-1, -1, 1, 1) @ LPS``, :mod:`medfusion.io.volume`).

Checks raise :class:`DicomSeriesError` instead of guessing: mixed size / orientation / pixel spacing, missing
slices (with the missing positions), duplicate positions, varying spacing, and gantry tilt. A tilted (sheared)
stack is refused, not resampled: the NIfTI qform cannot store a sheared grid and resampling changes the voxel
values (dcm2niix ``-y`` resamples such stacks explicitly). Slice positions stored with low precision (IPP
rounded to 0.01 mm, float noise) are accepted within a tolerance of 10 % of the spacing (dcm2niix#216, #325).

4D series (dynamic / perfusion CT, fMRI-like MR: the same positions repeated over time) are ordered by
TemporalPositionIdentifier, else AcquisitionNumber, else TriggerTime / ContentTime / AcquisitionTime. A partial
last time point (a scan stopped early, dcm2niix#357, #742) is dropped and reported, never stored with t and z
mixed up (dcm2niix#515); a partial earlier one is refused.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medfusion.io.dicom.header import DicomSeriesError, FrameInfo, _fail
from medfusion.io.volume import LPS_TO_RAS

_ORIENT_TOL = 1e-3  # direction-cosine difference treated as "same orientation"
_SPACING_TOL = 1e-3  # mm, pixel spacing difference treated as "same spacing"
_DUP_TOL = 1e-2  # mm along the normal: positions closer than this are duplicates
_SAME_POS_TOL = 5e-2  # mm along the normal: frames this close are "the same slice" of different time points
# Header fields that order the time points of a 4D series, in order of preference, and whether a value is a
# discrete label (time point = value) or a clock (time point = rank at each position).
TIME_KEYS: tuple[tuple[str, str, bool], ...] = (
    ("TemporalPositionIdentifier", "temporal_index", True),
    ("AcquisitionNumber", "acquisition_number", True),
    ("TriggerTime", "trigger_time", False),
    ("ContentTime", "content_time", False),
    ("AcquisitionTime", "acquisition_time", False),
)


@dataclass(frozen=True)
class SeriesGeometry:
    """Sorted frames and the voxel -> RAS+ affine of a series (from headers only).

    ``shape`` is ``(I, J[, K])`` for one time point, ``(I, J, K, T)`` for a 4D series; ``frames`` are then
    time-major (``frames[t * K + k]`` is slice ``k`` of time point ``t``) and the affine is the 3D one of
    every time point. ``time_key`` names the header field that ordered the time points (None for 3D),
    ``time_values`` its value per kept time point, ``incomplete`` describes a dropped partial last volume.
    ``time_step`` is the median interval between time points in seconds (NIfTI ``pixdim[4]``), from the first
    clock field (TriggerTime, ContentTime, AcquisitionTime) present on every frame; None for 3D or when no
    clock field says it.
    """

    frames: list[FrameInfo]
    affine: np.ndarray
    shape: tuple[int, ...]
    warnings: tuple[str, ...]
    time_key: str | None = None
    time_values: tuple[float, ...] = ()
    incomplete: str | None = None
    time_step: float | None = None


def _cluster(values: Sequence[tuple[float, ...] | None], tol: float) -> list[int]:
    """Label each value by the first earlier value within ``tol`` (max abs difference)."""
    reps: list[tuple[float, ...] | None] = []
    labels = []
    for value in values:
        for index, rep in enumerate(reps):
            if (value is None and rep is None) or (
                value is not None and rep is not None and max(abs(a - b) for a, b in zip(value, rep)) <= tol
            ):
                labels.append(index)
                break
        else:
            reps.append(value)
            labels.append(len(reps) - 1)
    return labels


def _position_clusters(proj: np.ndarray) -> np.ndarray:
    """Label positions along the normal: sorted neighbours closer than ``_SAME_POS_TOL`` share a label."""
    order = np.argsort(proj, kind="stable")
    labels = np.empty(len(proj), dtype=int)
    current = 0
    for rank, index in enumerate(order):
        if rank and proj[index] - proj[order[rank - 1]] >= _SAME_POS_TOL:
            current += 1
        labels[index] = current
    return labels


def _time_points(
    frames: list[FrameInfo], labels: np.ndarray, proj: np.ndarray, key: str, discrete: bool
) -> tuple[list[list[int]], list[float]] | str:
    """Frame indices per time point (time-ordered) and the time value of each, or why ``key`` cannot
    order them (missing on some frames, equal at one position, inconsistent)."""
    values = [getattr(f, key) for f in frames]
    if any(v is None for v in values):
        return "not present on every frame"
    by_position: dict[int, list[int]] = {}
    for index, lab in enumerate(labels):
        by_position.setdefault(int(lab), []).append(index)
    for members in by_position.values():
        if len({values[i] for i in members}) != len(members):
            return "equal on two frames at the same position"
    if discrete:
        groups: dict[float, list[int]] = {}
        for index, value in enumerate(values):
            groups.setdefault(value, []).append(index)
        times = sorted(groups)
        return [groups[t] for t in times], [float(t) for t in times]
    # a clock: the r-th frame (in time) at each position belongs to time point r
    ranked: dict[int, list[int]] = {}
    for members in by_position.values():
        for rank, index in enumerate(sorted(members, key=lambda i: values[i])):
            ranked.setdefault(rank, []).append(index)
    points = [ranked[r] for r in sorted(ranked)]
    for t in range(len(points) - 1):
        if max(values[i] for i in points[t]) >= min(values[i] for i in points[t + 1]):
            return f"time points {t} and {t + 1} overlap in time"
    return points, [float(min(values[i] for i in p)) for p in points]


def _order_time_points(
    frames: list[FrameInfo], labels: np.ndarray, proj: np.ndarray, label: str
) -> tuple[str, list[list[int]], list[float], list[int], bool]:
    """Assign repeated positions to time points with the first field of :data:`TIME_KEYS` that orders them.

    Returns ``(field name, frame indices per time point, time values, positions per time point, partial
    last)``; raises :class:`DicomSeriesError` with every field's reason when none does.
    """
    n_positions = int(labels.max()) + 1
    reasons = []
    for name, attribute, discrete in TIME_KEYS:
        found = _time_points(frames, labels, proj, attribute, discrete)
        if isinstance(found, str):
            reasons.append(f"{name}: {found}")
            continue
        points, times = found
        counts = [len({int(labels[i]) for i in p}) for p in points]
        if any(c != len(p) for c, p in zip(counts, points)):
            reasons.append(f"{name}: a time point holds one position twice")
            continue
        short = [t for t, c in enumerate(counts) if c < n_positions]
        if short and short != [len(points) - 1]:
            centres = {int(lab): float(np.mean(proj[labels == lab])) for lab in range(n_positions)}
            details = []
            for t in short[:5]:
                present = {int(labels[i]) for i in points[t]}
                gone = ", ".join(f"{centres[lab]:.2f}" for lab in sorted(set(centres) - present)[:8])
                details.append(
                    f"time point {t} ({name} {times[t]:g}) has {counts[t]} of {n_positions} slices, "
                    f"missing {gone} mm"
                )
            reasons.append(f"{name}: " + "; ".join(details))
            continue
        return name, points, times, counts, bool(short)
    dup = [i for i in range(len(frames)) if np.sum(labels == labels[i]) > 1]
    raise _fail(
        label,
        f"duplicate slice positions: {len(frames) - n_positions} frame(s) repeat a position along the "
        f"normal, first at {proj[dup[0]]:.3f} mm, and no field orders them as time points of a 4D series "
        f"({'; '.join(reasons)})",
        [frames[i].path for i in dup],
    )


def series_geometry(frames: Sequence[FrameInfo], label: str = "series") -> SeriesGeometry:
    """Check that ``frames`` form one regular stack (or a 4D series of them); return them sorted and the affine.

    3D: slices sorted along the normal of ImageOrientationPatient. Raises :class:`DicomSeriesError` for mixed
    image sizes / orientations / pixel spacings, missing slices (naming the missing positions along the
    normal), duplicate positions, non-uniform spacing and gantry tilt.

    4D: when positions repeat, the frames are assigned to time points by the first field of
    :data:`TIME_KEYS` that is present on every frame and differs between the frames at each position:
    TemporalPositionIdentifier (enhanced: TemporalPositionIndex), else AcquisitionNumber (time point = value,
    ordered by value), else TriggerTime, ContentTime, AcquisitionTime (clocks: the r-th frame in time at each
    position is time point r, and time points must not overlap in time). Every time point must hold the same
    full set of positions; a **partial last** time point (a scan stopped early) is dropped with the warning
    ``"incomplete: dropped last volume with k of n slices"`` (``incomplete`` is set); a partial earlier time
    point, or repeated positions that no field tells apart, raise. Frames come back time-major, ``shape`` is
    ``(I, J, K, T)`` (``(I, J, K)`` when one complete time point is left) and the affine is the 3D one.
    """
    frames = list(frames)
    if len(frames) < 2 or any(f.position is None for f in frames) or frames[0].orientation is None:
        return _stack_geometry(frames, label)
    # 1. cluster the frames by position along the slice normal; no repeats: one 3D stack
    iop = np.asarray(frames[0].orientation, dtype=float)
    normal = np.cross(iop[:3] / np.linalg.norm(iop[:3]), iop[3:] / np.linalg.norm(iop[3:]))
    proj = np.array([float(np.dot(f.position, normal)) for f in frames])
    labels = _position_clusters(proj)
    n_positions = int(labels.max()) + 1
    if n_positions == len(frames):
        return _stack_geometry(frames, label)

    # 2. time points; a partial last one is dropped and reported
    name, points, times, counts, partial = _order_time_points(frames, labels, proj, label)
    notes: list[str] = []
    incomplete = None
    if partial:
        incomplete = f"incomplete: dropped last volume with {counts[-1]} of {n_positions} slices"
        notes.append(incomplete)
        points, times = points[:-1], times[:-1]

    # 3. the first time point fixes the slice order and the affine; the others follow its order
    base = _stack_geometry([frames[i] for i in points[0]], label)
    position_of = {id(f): int(labels[i]) for i, f in enumerate(frames)}
    slot = {position_of[id(f)]: k for k, f in enumerate(base.frames)}
    ordered = list(base.frames)
    for p in points[1:]:
        ordered.extend(sorted((frames[i] for i in p), key=lambda f: slot[position_of[id(f)]]))
    shape = tuple(base.shape) + ((len(points),) if len(points) > 1 else ())
    if len(points) > 1 and len(shape) == 3:  # one slice per time point: (I, J, 1, T)
        shape = (shape[0], shape[1], 1, len(points))
    return SeriesGeometry(
        ordered,
        base.affine,
        shape,
        tuple(notes) + base.warnings,
        time_key=name,
        time_values=tuple(times),
        incomplete=incomplete,
        time_step=_time_step(frames, points),
    )


# clock fields and their unit in seconds, for the interval between time points
_CLOCKS: tuple[tuple[str, float], ...] = (
    ("trigger_time", 1e-3),
    ("content_time", 1.0),
    ("acquisition_time", 1.0),
)


def _time_step(frames: Sequence[FrameInfo], points: Sequence[Sequence[int]]) -> float | None:
    """Median interval (s) between the starts of consecutive time points, from the first clock field present
    on every frame of them and increasing over time; None if no field qualifies (e.g. only
    AcquisitionNumber)."""
    if len(points) < 2:
        return None
    for attribute, unit in _CLOCKS:
        values = [[getattr(frames[i], attribute) for i in p] for p in points]
        if any(v is None for vs in values for v in vs):
            continue
        starts = np.array([min(vs) for vs in values], dtype=float)
        steps = np.diff(starts)
        if np.all(steps > 0):
            return float(np.median(steps) * unit)
    return None


def _check_uniform(frames: list[FrameInfo], label: str) -> None:
    """Raise unless every frame has the same image size, orientation and pixel spacing."""
    files = [f.path for f in frames]
    sizes = {(f.rows, f.columns) for f in frames}
    if len(sizes) > 1:
        raise _fail(label, f"mixed image sizes (rows, columns) {sorted(sizes)} in one series", files)
    if len(set(_cluster([f.orientation for f in frames], _ORIENT_TOL))) > 1:
        found = sorted({tuple(round(v, 4) for v in f.orientation or ()) for f in frames})
        raise _fail(label, f"mixed image orientations {found} in one series", files)
    if len(set(_cluster([f.pixel_spacing for f in frames], _SPACING_TOL))) > 1:
        found = sorted({f.pixel_spacing or () for f in frames})
        raise _fail(label, f"mixed pixel spacings {found} in one series", files)


def _spacing_problem(ordered: list[FrameInfo], proj: np.ndarray, diffs: np.ndarray, bad: np.ndarray) -> str:
    """Describe irregular steps ``diffs[bad]``: missing slices (named by position) when every bad step is a
    whole multiple of the smallest one (at most 1000 slices apart), else varying spacing with the positions."""
    base = float(diffs.min())
    ratios = diffs[bad] / base
    if np.all(np.abs(ratios - np.rint(ratios)) < 0.1) and np.all(ratios > 1.5) and np.all(ratios < 1000):
        gaps = []
        for i, r in zip(bad[:5], ratios[:5]):
            n = int(round(r)) - 1
            shown = ", ".join(f"{proj[i] + m * base:.2f}" for m in range(1, min(n, 8) + 1))
            gaps.append(
                f"{n} missing at {shown}{', ...' if n > 8 else ''} mm (between {ordered[i].path.name} at "
                f"{proj[i]:.2f} mm and {ordered[i + 1].path.name} at {proj[i + 1]:.2f} mm)"
            )
        more = f"; {len(bad) - 5} more gaps" if len(bad) > 5 else ""
        return (
            f"missing slice(s) (spacing {base:.3f} mm; ImagePositionPatient along the slice normal): "
            + "; ".join(gaps)
            + more
        )
    return (
        f"slice spacing varies from {diffs.min():.3g} to {diffs.max():.3g} mm (ImagePositionPatient along the slice "
        f"normal: {_positions(ordered, proj)}); medfusion does not resample irregular stacks"
    )


def _positions(ordered: list[FrameInfo], proj: np.ndarray, limit: int = 8) -> str:
    """``file at x mm, ...`` for up to ``limit`` frames (first and last ones)."""
    items = [f"{f.path.name} at {p:.2f}" for f, p in zip(ordered, proj)]
    if len(items) > limit:
        items = items[: limit // 2] + ["..."] + items[-limit // 2 :]
    return ", ".join(items)


def _regular_step(ordered: list[FrameInfo], proj: np.ndarray, label: str) -> float:
    """The slice step (mm) of frames sorted by their positions ``proj`` along the normal; raises for
    duplicate positions, missing slices, varying spacing and drift from a regular grid."""
    diffs = np.diff(proj)
    dups = np.flatnonzero(diffs < _DUP_TOL)
    if dups.size:
        pairs = [(ordered[i].path, ordered[i + 1].path) for i in dups]
        raise _fail(
            label,
            f"duplicate slice positions: {len(dups)} pair(s) at the same position along the normal, "
            f"first at {proj[dups[0]]:.3f} mm",
            [p for pair in pairs for p in pair],
        )
    # reference spacing = the smallest step; jitter below `tol` (low-precision IPP) is accepted
    base = float(diffs.min())
    tol = max(0.05, 0.1 * base)
    bad = np.flatnonzero(np.abs(diffs - base) > tol)
    if bad.size:
        problem = _spacing_problem(ordered, proj, diffs, bad)
        raise _fail(label, problem, [ordered[i].path for i in bad] + [ordered[i + 1].path for i in bad])
    step = float((proj[-1] - proj[0]) / (len(proj) - 1))
    residual = np.abs(proj - (proj[0] + step * np.arange(len(proj))))
    if residual.max() > tol:
        raise _fail(
            label,
            f"slice positions drift {residual.max():.3f} mm from a regular grid",
            [f.path for f in ordered],
        )
    return step


def _check_tilt(
    ordered: list[FrameInfo], normal: np.ndarray, spacing: tuple[float, float], label: str
) -> None:
    """Raise for gantry tilt: the stack moves in-plane from slice to slice (a sheared grid)."""
    total = np.asarray(ordered[-1].position) - np.asarray(ordered[0].position, dtype=float)
    along = float(np.dot(total, normal))
    lateral = float(np.linalg.norm(total - along * normal))
    if lateral > max(0.01, 0.1 * min(spacing)):
        angle = math.degrees(math.atan2(lateral, abs(along)))
        raise _fail(
            label,
            f"gantry tilt / sheared stack: slices shift {lateral:.2f} mm in-plane over {len(ordered)} "
            f"slices ({angle:.2f} degrees); medfusion refuses tilted stacks instead of producing a wrong "
            "geometry - resample them first (e.g. dcm2niix -y)",
            [f.path for f in ordered],
        )


def _stack_geometry(frames: Sequence[FrameInfo], label: str) -> SeriesGeometry:
    """One 3D stack: the checks of :func:`series_geometry` for a single time point."""
    frames = list(frames)
    if not frames:
        raise DicomSeriesError(f"{label}: no image frames")
    _check_uniform(frames, label)

    # 1. in-plane geometry; nominal values (with a note) where the header lacks them
    first = frames[0]
    notes: list[str] = []
    spacing = first.pixel_spacing
    if spacing is None:
        spacing = (1.0, 1.0)
        notes.append("no PixelSpacing: 1 mm assumed in-plane")
    iop = first.orientation
    missing_position = any(f.position is None for f in frames)
    if iop is None or missing_position:
        placed = [f for f in frames if f.position is not None]
        if len({f.path for f in frames}) > 1 and placed and iop is not None:
            lost = sorted({f.path for f in frames if f.position is None})
            multi = (
                " (a multi-frame object: NumberOfFrames > 1 and no per-frame positions)"
                if any(f.frame for f in frames)
                else ""
            )
            raise _fail(
                label,
                f"{len(frames) - len(placed)} frame(s) in {', '.join(p.name for p in lost[:3])}{multi} have no "
                "ImagePositionPatient of their own and cannot be placed among the other slices",
                lost,
            )
        if len(frames) > 1 and len({f.path for f in frames}) > 1:
            raise _fail(
                label,
                f"{len({f.path for f in frames})} separate images without ImagePositionPatient / "
                "ImageOrientationPatient (e.g. secondary captures, ultrasound): no geometry says how to stack "
                "them into one volume, and medfusion does not guess an order (read_series(file) reads one as a 2D image)",
                [f.path for f in frames],
            )
        iop = iop or (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
        notes.append("no per-frame ImagePositionPatient: frames kept in stored order, nominal geometry")
    row_dir = np.asarray(iop[:3], dtype=float)
    col_dir = np.asarray(iop[3:], dtype=float)
    row_dir /= np.linalg.norm(row_dir)
    col_dir /= np.linalg.norm(col_dir)
    normal = np.cross(row_dir, col_dir)
    thickness = first.slice_thickness if first.slice_thickness and first.slice_thickness > 0 else None

    # 2. slice order and step: along the normal, checked to be a regular untilted grid
    if missing_position:
        ordered = sorted(frames, key=lambda f: f.frame or 0)
        origin = np.asarray(first.position if first.position is not None else (0.0, 0.0, 0.0))
        step = thickness or 1.0
    else:
        proj = np.array([float(np.dot(f.position, normal)) for f in frames])
        order = np.argsort(proj, kind="stable")
        ordered = [frames[i] for i in order]
        origin = np.asarray(ordered[0].position, dtype=float)
        step = thickness or 1.0
        if len(ordered) > 1:
            step = _regular_step(ordered, proj[order], label)
            _check_tilt(ordered, normal, spacing, label)

    # 3. voxel -> LPS mm, then RAS+
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * spacing[1]
    affine_lps[:3, 1] = col_dir * spacing[0]
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = origin
    shape = (first.columns, first.rows) + ((len(ordered),) if len(ordered) > 1 else ())
    return SeriesGeometry(ordered, LPS_TO_RAS @ affine_lps, shape, tuple(notes))

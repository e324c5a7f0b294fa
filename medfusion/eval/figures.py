"""Figures of an evaluation: axial slices in radiological orientation, example panels and box plots (PNG).

Axial CT slices are shown as radiologists read them: viewed from the feet, anterior at the top and the patient's
right on the left of the image (the radiological convention of axial display, e.g. DICOM PS3.3 C.7.6.2.1.1 for the
patient axes; every PACS shows axial slices this way). :func:`axial_view` derives that view from the image's
RAS+ affine (NIfTI / nibabel convention: +x towards the patient's Right, +y Anterior, +z Superior), so a scan
stored in any voxel order comes out the same way. Windows are stated in HU; values outside a window are drawn at
its ends (bone above the window is white, not a number of its own).

Writing goes through :mod:`medfusion.io.atomic`; matplotlib runs with the non-interactive Agg backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from medfusion.io.atomic import atomic_path


def axial_view(image: np.ndarray, affine: np.ndarray, index: int | None = None) -> np.ndarray:
    """One axial slice of ``image`` as a ``(rows, columns)`` array to display as is (row 0 at the top).

    Anterior is at the top and the patient's right on the left (module docstring). The image is reordered to RAS
    with ``nibabel.orientations`` (axis permutations and flips only, no resampling).

    Args:
        image: ``(I, J)`` slice or ``(I, J, K)`` volume in voxel order of ``affine``.
        affine: ``(4, 4)`` voxel -> RAS+ world (mm); for a 2D image the third column is the slice normal.
        index: axial slice (RAS order, inferior to superior) of a volume; default the middle one.
    """
    import nibabel.orientations as nio

    arr = np.asarray(image)
    if arr.ndim not in (2, 3):
        raise ValueError(f"axial_view needs a 2D or 3D image, got shape {arr.shape}")
    aff = np.asarray(affine, dtype=np.float64)
    if aff.shape != (4, 4):
        raise ValueError(f"axial_view needs a (4, 4) affine, got shape {aff.shape}")
    vol = arr if arr.ndim == 3 else arr[..., None]
    ras = nio.apply_orientation(vol, nio.io_orientation(aff))
    k = ras.shape[2] // 2 if index is None else int(index)
    if not 0 <= k < ras.shape[2]:
        raise ValueError(f"slice index {index} outside [0, {ras.shape[2]})")
    # ras[x, y]: x towards the patient's Right, y towards Anterior. Display rows run anterior -> posterior
    # (y descending), columns run the patient's right -> left (x descending).
    return np.ascontiguousarray(ras[::-1, ::-1, k].T)


def _save(fig, path: Path, overwrite: bool) -> Path:
    with atomic_path(path, overwrite=overwrite) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def example_panels(
    path: str | Path,
    rows: Sequence[tuple[str, Sequence[tuple[str, np.ndarray]], np.ndarray]],
    *,
    window: tuple[float, float],
    title: str = "",
    overwrite: bool = False,
) -> Path:
    """A grid of axial slices, one row per ``(row title, [(label, HU image)], affine)``, all in one HU ``window``,
    radiological orientation (:func:`axial_view`)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi = window
    if not hi > lo:
        raise ValueError(f"window must be (low, high) with high > low, got {window!r}")
    if not rows:
        raise ValueError("example_panels needs at least one row")
    # one mosaic in one axes (a grid of axes costs seconds per figure); tiles keep each slice's own size
    views = [[axial_view(img, affine) for _, img in panels] for _, panels, affine in rows]
    th = max(v.shape[0] for row in views for v in row)
    tw = max(v.shape[1] for row in views for v in row)
    gap = max(1, tw // 32)
    n_cols = max(len(row) for row in views)
    canvas = np.full((len(rows) * (th + gap), n_cols * (tw + gap)), np.nan)
    for r, row in enumerate(views):
        for c, v in enumerate(row):
            canvas[
                r * (th + gap) : r * (th + gap) + v.shape[0], c * (tw + gap) : c * (tw + gap) + v.shape[1]
            ] = v
    fig, ax = plt.subplots(figsize=(1.9 * n_cols + 0.8, 1.9 * len(rows) + 0.6))
    cmap = matplotlib.colormaps["gray"].with_extremes(bad="0.3")
    ax.imshow(np.ma.masked_invalid(canvas), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    for r, (_, panels, _) in enumerate(rows):
        for c, (label, _) in enumerate(panels):
            ax.text(c * (tw + gap) + 1, r * (th + gap) + 1, label, color="yellow", fontsize=6, va="top")
    ax.set_xticks([])
    ax.set_yticks([(r + 0.5) * (th + gap) for r in range(len(rows))], [t for t, _, _ in rows], fontsize=7)
    fig.suptitle(
        f"{title}  window [{lo:g}, {hi:g}] HU; anterior up, patient's right on the left".strip(), fontsize=9
    )
    try:
        return _save(fig, Path(path), overwrite)
    finally:
        plt.close(fig)


def box_plots(
    path: str | Path,
    values: Mapping[str, Mapping[str, Sequence[float]]],
    *,
    labels: Mapping[str, str] | None = None,
    references: Mapping[str, float] | None = None,
    overwrite: bool = False,
) -> Path:
    """One box plot per metric (``{metric: {method: per-case values}}``, non-finite values left out), side by side
    in one PNG. ``references[metric]``: a dashed line (e.g. the standard scans' own noise SD)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not values:
        raise ValueError("box_plots needs at least one metric")
    labels, references = labels or {}, references or {}
    n = len(values)
    cols = min(n, 4)
    n_methods = max(len(v) for v in values.values())
    fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(cols * max(3.0, 0.5 * n_methods + 1.2),
                             3.4 * ((n + cols - 1) // cols)), squeeze=False)  # fmt: skip
    for ax, (metric, per_method) in zip(axes.ravel(), values.items()):
        names = list(per_method)
        data = [np.asarray(per_method[m], dtype=np.float64) for m in names]
        ax.boxplot([d[np.isfinite(d)] for d in data], showmeans=True)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=35, ha="right", fontsize=7)
        ref = references.get(metric)
        if ref is not None and np.isfinite(ref):
            ax.axhline(ref, color="tab:green", linestyle="--", linewidth=1, label="standard scan")
            ax.legend(fontsize=6)
        ax.set_title(labels.get(metric, metric), fontsize=8)
    for ax in axes.ravel()[n:]:
        ax.axis("off")
    fig.tight_layout()
    try:
        return _save(fig, Path(path), overwrite)
    finally:
        plt.close(fig)


def interval_curves(
    path: str | Path,
    series: Mapping[str, Sequence[tuple[float, float, float, float]]],
    *,
    xlabel: str,
    ylabel: str,
    log_x: bool = False,
    overwrite: bool = False,
) -> Path:
    """One line per series, ``{name: [(x, mean, low, high)]}``, with its interval as error bars (e.g. Dice against
    the labelled fraction, one line per augmentation)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not series:
        raise ValueError("interval_curves needs at least one series")
    fig, ax = plt.subplots(figsize=(4.6, 3.4))
    for i, (name, points) in enumerate(series.items()):
        p = np.asarray(sorted(points), dtype=np.float64).reshape(-1, 4)
        x = p[:, 0] * (1 + 0.02 * (i - len(series) / 2))  # a small offset keeps overlapping bars apart
        ax.errorbar(
            x, p[:, 1], yerr=[p[:, 1] - p[:, 2], p[:, 3] - p[:, 1]], marker="o", capsize=3, label=name
        )
    if log_x:
        from matplotlib.ticker import FixedLocator, NullLocator

        ax.set_xscale("log")
        ax.xaxis.set_major_locator(FixedLocator(sorted({float(p[0]) for pts in series.values() for p in pts})))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticklabels([f"{v:g}" for v in ax.get_xticks()], fontsize=7)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    try:
        return _save(fig, Path(path), overwrite)
    finally:
        plt.close(fig)


def label_overlays(
    path: str | Path,
    image: np.ndarray,
    panels: Sequence[tuple[str, np.ndarray]],
    *,
    affine: np.ndarray | None = None,
    overwrite: bool = False,
) -> Path:
    """The image (``(X, Y)`` array order, in [-1, 1]) with one label map per panel drawn over it in colour, side
    by side (e.g. the reference and each method's prediction). With the image's ``affine`` (voxel -> RAS+) the
    panels are shown in radiological view (:func:`axial_view`); without it array axis 0 runs left to right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("label_overlays needs at least one panel")

    def view(a: np.ndarray) -> np.ndarray:
        return np.asarray(a).T if affine is None else axial_view(np.asarray(a), affine)

    shown = view(image)
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.5), squeeze=False)
    for ax, (title, label) in zip(axes[0], panels):
        ax.imshow(shown, cmap="gray", vmin=-1, vmax=1, interpolation="nearest")
        lab = view(label).astype(np.float64)
        ax.imshow(
            np.ma.masked_equal(lab, 0), cmap="tab20", vmin=0, vmax=20, alpha=0.5, interpolation="nearest"
        )
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    try:
        return _save(fig, Path(path), overwrite)
    finally:
        plt.close(fig)

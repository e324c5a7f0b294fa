"""The CT standardization evaluation protocol: a method's outputs scored against the standard-protocol scan.

DiffusionCT (Selim et al., "Latent Diffusion Model for Medical Image Standardization and Enhancement",
arXiv 2310.05237) is judged by how close a standardized scan comes to the scan of the same anatomy taken with the
standard protocol, and by whether radiomic texture features become reproducible across protocols. Per case and
method, :class:`CTProtocol` computes against the standard scan (all intensities HU):

* ``psnr`` / ``ssim`` on the [-1000, 1000] HU window (both images clipped to it, data range 2000), over the whole
  frame;
* ``psnr_body``: the same PSNR over the body only (every nonzero label): the air around the patient, clipped to
  -1000 HU in both images, agrees exactly and would otherwise inflate the dB by about ``10 log10(frame / body)``;
* ``psnr_soft``: PSNR on the soft-tissue window W 400 / L 40 ([-160, 240] HU, data range 400), where kernel and
  dose differences are read; ``psnr_soft_body``: the same over the body only;
* ``noise_sd``: SD (HU) in a uniform ROI (:meth:`CTProtocol.uniform_roi`: the first organ of ``roi_labels`` with
  at least ``min_pixels`` pixels after ``erosion`` iterations of binary erosion, else the body eroded 3 times);
* ``edge_sharpness``: peak slope of the edge-spread function across the body outline (1/pixel);

and across the cases of one protocol, ``texture_ccc``: the median over texture features of Lin's CCC between the
method's outputs and the standard scans in the uniform ROI (:func:`medfusion.eval.image.feature_ccc`; NaN with
fewer than 2 cases). :func:`score_methods` runs that over ``{protocol: {method: [images]}}`` and
:func:`markdown_rows` writes the table rows of a results page.

Cases come from a manifest's entries (``source``, ``target``, ``label`` NIfTI paths, ``protocol``, ``case_id``;
:func:`read_case`). The label ids of the ROI organs are passed in (:meth:`CTProtocol.for_label_ids` with the
built-in phantoms' ``medfusion.data.phantoms.LABEL_IDS``), so this module depends on no data generator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from medfusion import keys
from medfusion.eval.image import edge_sharpness, feature_ccc, noise_sd, psnr, ssim

METRIC_WINDOW = (-1000.0, 1000.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # W 400 / L 40 HU
TEXTURE_WINDOW = (-200.0, 300.0)  # grey-level window of the texture features (32 levels over 500 HU)
UNIFORM_ROI_ORGANS = ("liver", "muscle", "soft_tissue")  # first one large enough is the uniform ROI
METRICS = ("psnr", "psnr_soft", "ssim", "noise_sd", "edge_sharpness", "texture_ccc")
CASE_METRICS = ("psnr", "psnr_body", "psnr_soft", "psnr_soft_body", "ssim", "noise_sd", "edge_sharpness")
"""What :meth:`CTProtocol.image_metrics` returns per case (``texture_ccc`` is computed across cases)."""

Method = Callable[[np.ndarray, str], np.ndarray]  # (source HU, protocol name) -> output HU


class Case(NamedTuple):
    """One test pair: the source scan of ``protocol``, the standard scan of the same anatomy and its labels (HU)."""

    case_id: str
    protocol: str
    source: np.ndarray
    reference: np.ndarray
    label: np.ndarray
    affine: np.ndarray


def read_case(entry: Mapping[str, Any]) -> Case:
    """A :class:`Case` from a manifest entry with absolute ``source`` / ``target`` / ``label`` NIfTI paths."""
    from medfusion.io.nifti import read_nifti

    src = read_nifti(entry[keys.SOURCE])
    ref = read_nifti(entry[keys.TARGET])
    return Case(
        case_id=str(entry.get(keys.CASE_ID, "case")),
        protocol=str(entry.get(keys.PROTOCOL, "source")),
        source=np.asarray(src.array, dtype=np.float32),
        reference=np.asarray(ref.array, dtype=np.float32),
        label=np.asarray(read_nifti(entry[keys.LABEL]).array),
        affine=np.asarray(ref.affine),
    )


def by_protocol(cases: Iterable[Case]) -> dict[str, list[Case]]:
    """Cases grouped by protocol name, protocols sorted."""
    out: dict[str, list[Case]] = {}
    for c in cases:
        out.setdefault(c.protocol, []).append(c)
    return dict(sorted(out.items()))


@dataclass(frozen=True)
class CTProtocol:
    """Metrics of one image against the standard scan (module docstring).

    Attributes:
        roi_labels: label ids of the uniform-ROI organs, in order of preference.
        metric_window, soft_window: HU windows of ``psnr``/``ssim`` and of ``psnr_soft``.
        texture_window: the fixed window the texture features quantise to grey levels (the same for every image).
        erosion, min_pixels: erosion iterations of an organ label and the pixels it must keep to be the ROI.
    """

    roi_labels: tuple[int, ...]
    metric_window: tuple[float, float] = METRIC_WINDOW
    soft_window: tuple[float, float] = SOFT_TISSUE_WINDOW
    texture_window: tuple[float, float] = TEXTURE_WINDOW
    erosion: int = 2
    min_pixels: int = 16

    @classmethod
    def for_label_ids(cls, label_ids: Mapping[str, int], organs: Sequence[str] = UNIFORM_ROI_ORGANS) -> CTProtocol:
        """The protocol for a label map whose organ names map to ids by ``label_ids``."""
        missing = [o for o in organs if o not in label_ids]
        if missing:
            raise ValueError(f"label_ids has no {missing}; it has {sorted(label_ids)}")
        return cls(roi_labels=tuple(int(label_ids[o]) for o in organs))

    def uniform_roi(self, label: np.ndarray) -> np.ndarray:
        """Boolean ROI for noise SD and texture: an eroded organ, else the body eroded 3 times."""
        from scipy.ndimage import binary_erosion

        label = np.asarray(label)
        for lab in self.roi_labels:
            roi = binary_erosion(label == lab, iterations=self.erosion)
            if roi.sum() >= self.min_pixels:
                return roi
        return binary_erosion(label > 0, iterations=3)

    @staticmethod
    def body(label: np.ndarray) -> np.ndarray:
        """Body mask (every nonzero label), whose outline is the edge of :func:`edge_sharpness`."""
        return np.asarray(label) > 0

    def image_metrics(self, img: np.ndarray, ref: np.ndarray, label: np.ndarray) -> dict[str, float]:
        """The :data:`CASE_METRICS` of ``img`` against ``ref`` (HU), in that order (module docstring)."""
        lo, hi = self.metric_window
        a, b = np.clip(img, lo, hi), np.clip(ref, lo, hi)
        slo, shi = self.soft_window
        sa, sb = np.clip(img, slo, shi), np.clip(ref, slo, shi)
        body = self.body(label)
        return {
            "psnr": psnr(a, b, data_range=hi - lo),
            "psnr_body": psnr(a, b, data_range=hi - lo, mask=body),
            "psnr_soft": psnr(sa, sb, data_range=shi - slo),
            "psnr_soft_body": psnr(sa, sb, data_range=shi - slo, mask=body),
            "ssim": ssim(a, b, data_range=hi - lo),
            "noise_sd": noise_sd(img, self.uniform_roi(label)),
            "edge_sharpness": edge_sharpness(img, body),
        }

    def texture_ccc(self, images: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence) -> float:
        """Median CCC over texture features between ``images`` and ``refs`` across cases (NaN with < 2 cases)."""
        if len(images) < 2:
            return float("nan")
        rois = [self.uniform_roi(lab) for lab in labels]
        vals = [v for v in feature_ccc(images, refs, rois, window=self.texture_window).values() if np.isfinite(v)]
        return float(np.median(vals)) if vals else float("nan")

    def summarize(self, images: Sequence[np.ndarray], refs: Sequence[np.ndarray], labels: Sequence) -> dict:
        """Mean of :meth:`image_metrics` over the cases, plus ``texture_ccc`` across them."""
        rows = [self.image_metrics(x, r, lab) for x, r, lab in zip(images, refs, labels, strict=True)]
        out = mean_rows(rows)
        out["texture_ccc"] = self.texture_ccc(images, refs, labels)
        return out

    def reference_stats(self, cases: Sequence[Case]) -> dict[str, float]:
        """Noise SD and edge sharpness of the standard scans themselves (what a standardizer should reach)."""
        return {
            "noise_sd": float(np.mean([noise_sd(c.reference, self.uniform_roi(c.label)) for c in cases])),
            "edge_sharpness": float(np.mean([edge_sharpness(c.reference, self.body(c.label)) for c in cases])),
        }


def mean_rows(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Key-wise mean of metric dicts (NaN-aware)."""
    if not rows:
        raise ValueError("mean_rows needs at least one row")
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def run_methods(
    cases: Sequence[Case], methods: Mapping[str, Method], timing: dict[str, float] | None = None
) -> dict[str, list[np.ndarray]]:
    """``{method: [output of each case]}``; ``timing`` (optional) accumulates seconds per method."""
    import time

    out: dict[str, list[np.ndarray]] = {name: [] for name in methods}
    for c in cases:
        for name, fn in methods.items():
            t0 = time.perf_counter()
            out[name].append(fn(c.source, c.protocol))
            if timing is not None:
                timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
    return out


def score_methods(
    protocol: CTProtocol,
    outputs: Mapping[str, Mapping[str, Sequence[np.ndarray]]],
    cases: Mapping[str, Sequence[Case]],
) -> dict[str, dict[str, dict[str, float]]]:
    """``{protocol name: {method: summarize(...)}}`` for ``outputs[protocol][method]`` (one image per case)."""
    results = {}
    for name, per_method in sorted(outputs.items()):
        refs = [c.reference for c in cases[name]]
        labels = [c.label for c in cases[name]]
        results[name] = {m: protocol.summarize(imgs, refs, labels) for m, imgs in per_method.items()}
    return results


def mean_over_protocols(results: Mapping[str, Mapping[str, Mapping[str, float]]]) -> dict[str, dict[str, float]]:
    """``{method: metrics averaged over protocols}`` for the methods scored on every protocol."""
    per = list(results.values())
    names = [n for n in per[0] if all(n in r for r in per)]
    return {n: {k: float(np.mean([r[n][k] for r in per])) for k in per[0][n]} for n in names}


def markdown_rows(
    results: Mapping[str, Mapping[str, float]], extra: Mapping[str, Mapping[str, str]] | None = None
) -> list[str]:
    """Markdown table (header + rows) of ``{method: metrics}`` with the columns of :data:`METRICS`.

    ``extra``: ``{column name: {method: cell}}`` appended as further columns (e.g. a time column).
    """
    extra = extra or {}
    head = ["method", "PSNR dB", "PSNR soft dB", "SSIM", "noise SD HU", "edge", "texture CCC", *extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, v in results.items():
        cells = [
            name, f"{v['psnr']:.2f}", f"{v['psnr_soft']:.2f}", f"{v['ssim']:.4f}", f"{v['noise_sd']:.1f}",
            f"{v['edge_sharpness']:.3f}", f"{v['texture_ccc']:.3f}", *(col.get(name, "") for col in extra.values()),
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return lines

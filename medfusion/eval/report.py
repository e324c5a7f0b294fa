"""Evaluate image-to-image methods on the cases of one split and write the evidence: summary, cases, report, figures.

:func:`evaluate` runs every :class:`Method` on every :class:`~medfusion.eval.ct_protocol.Case` (every sample of a
stochastic method), scores each output against the standard scan with
:meth:`~medfusion.eval.ct_protocol.CTProtocol.image_metrics` (:data:`~medfusion.eval.ct_protocol.CASE_METRICS`:
PSNR over the frame and over the body, on the [-1000, 1000] HU and the soft-tissue window; SSIM; noise SD in a
uniform ROI; edge sharpness of the body outline) and texture features in the uniform ROI, and writes into ``out``:

* ``cases.csv``: one row per case x protocol x method x sample with every case metric;
* ``summary.json``: per method (protocols pooled, and per protocol) and metric the mean, its 95% interval from a
  seeded patient-level bootstrap (:mod:`medfusion.eval.stats`) and ``n``; the paired difference against
  ``identity`` (the raw input: same case, protocol and sample) with its interval; the texture CCC (median over
  texture features of Lin's CCC across patients, between the method's outputs and the standard scans) with its
  interval; the standard scans' own noise SD and edge sharpness (what a standardizer should reach);
* ``report.md`` with ``figures/``: an example panel per protocol (input / each method / reference, one window,
  axial slices in radiological orientation, :func:`medfusion.eval.figures.axial_view`) and a box plot per metric.

Every bootstrap statistic of one evaluation uses the same resampling matrix (one ``seed``), so the same seed gives
the same intervals. This module knows nothing of models: a method is a function of a case; the command
``medfusion evaluate`` (:mod:`medfusion.apps.evaluate`) builds them from exported models and fitted baselines.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from medfusion.eval.ct_protocol import (
    CASE_METRICS,
    METRIC_WINDOW,
    SOFT_TISSUE_WINDOW,
    TEXTURE_WINDOW,
    Case,
    CTProtocol,
)
from medfusion.eval.image import texture_features
from medfusion.eval.provenance import describe as describe_environment
from medfusion.eval.stats import Estimate, cluster_mean, mean_estimate, median_ccc_replicates, resample_counts
from medfusion.io.atomic import check_not_overwriting, write_text_atomic

IDENTITY = "identity"
CSV_KEYS = ("case_id", "protocol", "method", "sample")
OUTPUTS = ("summary.json", "cases.csv", "report.md")
METRIC_LABELS = {
    "psnr": "PSNR frame (dB)", "psnr_body": "PSNR body (dB)", "psnr_soft": "PSNR soft window, frame (dB)",
    "psnr_soft_body": "PSNR soft window, body (dB)", "ssim": "SSIM", "noise_sd": "noise SD (HU)",
    "edge_sharpness": "edge sharpness (1/px)", "texture_ccc": "texture CCC",
}  # fmt: skip


class Method(NamedTuple):
    """A method under evaluation: ``run(case, sample)`` returns the output in HU, the shape of ``case.source``.

    ``samples`` > 1 for a stochastic method scored over several sampling seeds (``sample`` = 0, 1, ...).
    """

    name: str
    run: Callable[[Case, int], np.ndarray]
    samples: int = 1


def identity_method() -> Method:
    """The raw input as its own output: the floor every method is compared with."""
    return Method(IDENTITY, lambda case, sample: np.asarray(case.source, dtype=np.float32))


class Scores(NamedTuple):
    """What :func:`score` measured: ``rows`` (one dict per case x method x sample, :data:`CSV_KEYS` + metrics),
    ``textures[(method, protocol, sample)] = {case_id: features}``, the standard scans' ``ref_textures[(protocol,
    case_id)]`` and ``examples[protocol] = [(label, HU image)] + [affine]`` of the first case of each protocol."""

    rows: list[dict[str, Any]]
    textures: dict[tuple[str, str, int], dict[str, dict[str, float]]]
    ref_textures: dict[tuple[str, str], dict[str, float]]
    examples: dict[str, tuple[list[tuple[str, np.ndarray]], np.ndarray]]


def _check_methods(methods: Sequence[Method]) -> list[Method]:
    names = [m.name for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique; repeated: {dup}")
    bad = [m.name for m in methods if m.samples < 1]
    if bad:
        raise ValueError(f"samples must be >= 1; methods {bad}")
    return list(methods) if IDENTITY in names else [identity_method(), *methods]


def score(cases: Sequence[Case], methods: Sequence[Method], protocol: CTProtocol, log=None) -> Scores:
    """Run and score every method on every case (``identity`` is added first when missing)."""
    methods = _check_methods(methods)
    if not cases:
        raise ValueError("no cases to evaluate")
    rows: list[dict[str, Any]] = []
    textures: dict[tuple[str, str, int], dict[str, dict[str, float]]] = {}
    ref_textures: dict[tuple[str, str], dict[str, float]] = {}
    examples: dict[str, tuple[list[tuple[str, np.ndarray]], np.ndarray]] = {}
    tw = protocol.texture_window
    for i, case in enumerate(sorted(cases, key=lambda c: (c.protocol, c.case_id))):
        roi = protocol.uniform_roi(case.label)
        ref_textures[(case.protocol, case.case_id)] = texture_features(case.reference, roi, window=tw)
        first = case.protocol not in examples
        panels: list[tuple[str, np.ndarray]] = [(f"input ({case.protocol})", case.source)]
        for m in methods:
            for s in range(m.samples):
                out = np.asarray(m.run(case, s), dtype=np.float32)
                if out.shape != case.source.shape:
                    raise ValueError(f"method {m.name} returned shape {out.shape} for {case.case_id} "
                                     f"{case.protocol}, whose source has shape {case.source.shape}")  # fmt: skip
                metrics = protocol.image_metrics(out, case.reference, case.label)
                rows.append({"case_id": case.case_id, "protocol": case.protocol, "method": m.name, "sample": s,
                             **metrics})  # fmt: skip
                tex = texture_features(out, roi, window=tw)
                textures.setdefault((m.name, case.protocol, s), {})[case.case_id] = tex
                if first and s == 0 and m.name != IDENTITY:
                    panels.append((m.name, out))
        if first:
            examples[case.protocol] = ([*panels, ("reference (standard)", case.reference)], case.affine)
        if log is not None:
            log(f"[{i + 1}/{len(cases)}] {case.case_id} {case.protocol}")
    return Scores(rows, textures, ref_textures, examples)


# ----------------------------------------------------------------------------------------------- summary
def _patient_index(rows: Sequence[Mapping[str, Any]]) -> dict[str, int]:
    return {cid: i for i, cid in enumerate(sorted({str(r["case_id"]) for r in rows}))}


def _paired(rows: Sequence[Mapping[str, Any]], method: str, metric: str) -> tuple[list[float], list[str]]:
    """``method - identity`` per row of ``method`` (identity's sample 0 of the same case and protocol)."""
    base = {
        (r["case_id"], r["protocol"]): float(r[metric])
        for r in rows
        if r["method"] == IDENTITY and int(r["sample"]) == 0
    }
    diffs, cids = [], []
    for r in rows:
        if r["method"] == method and (r["case_id"], r["protocol"]) in base:
            diffs.append(float(r[metric]) - base[(r["case_id"], r["protocol"])])
            cids.append(str(r["case_id"]))
    return diffs, cids


def _metric_block(rows, method, pidx, counts, metrics) -> tuple[dict[str, Any], dict[str, Any]]:
    own = [r for r in rows if r["method"] == method]
    cids = [pidx[str(r["case_id"])] for r in own]
    values = {k: cluster_mean([float(r[k]) for r in own], cids, counts).as_dict() for k in metrics}
    diffs = {}
    for k in metrics:
        d, dc = _paired(rows, method, k)
        diffs[k] = cluster_mean(d, [pidx[c] for c in dc], counts).as_dict()
    return values, diffs


def _texture(
    scores: Scores, method: str, protocols: Sequence[str], samples: int, pidx, counts
) -> tuple[dict, dict]:
    """Texture CCC per protocol (mean over samples) and pooled (mean over protocols), each with its interval."""
    per: dict[str, Any] = {}
    parts_all = []
    for proto in protocols:
        parts = []
        for s in range(samples):
            feats = scores.textures.get((method, proto, s), {})
            cids = sorted(feats)
            if not cids:
                continue
            names = sorted(feats[cids[0]])
            a = np.array([[feats[c][f] for f in names] for c in cids])
            b = np.array([[scores.ref_textures[(proto, c)][f] for f in names] for c in cids])
            sub = counts[:, [pidx[c] for c in cids]]
            stat, reps, _ = median_ccc_replicates(a, b, sub)
            parts.append((stat, reps))
        if parts:
            n_pat = len(scores.textures[(method, proto, 0)])
            est = mean_estimate(parts, n_pat, n_pat)
            per[proto] = est.as_dict()
            parts_all.append((est.mean, np.mean(np.stack([p[1] for p in parts]), axis=0)))
    pooled = mean_estimate(parts_all, len(pidx), len(pidx)).as_dict() if parts_all else Estimate(
        math.nan, math.nan, math.nan, 0, 0).as_dict()  # fmt: skip
    return pooled, per


def summarize(scores: Scores, *, seed: int = 0, n_boot: int = 2000, protocol: CTProtocol | None = None,
              cases: Sequence[Case] = ()) -> dict[str, Any]:  # fmt: skip
    """``summary.json``'s content (module docstring) from :func:`score`'s result; ``cases`` (with ``protocol``)
    add the standard scans' own noise SD and edge sharpness."""
    rows = scores.rows
    pidx = _patient_index(rows)
    counts = resample_counts(len(pidx), n_boot, seed)
    protocols = sorted({str(r["protocol"]) for r in rows})
    methods = list(dict.fromkeys(str(r["method"]) for r in rows))
    out: dict[str, Any] = {
        "bootstrap": {"unit": "patient", "n_boot": n_boot, "seed": seed, "level": 0.95, "interval": "percentile"},
        "n_patients": len(pidx), "protocols": protocols, "metrics": list(CASE_METRICS), "methods": {},
    }  # fmt: skip
    for m in methods:
        samples = 1 + max(int(r["sample"]) for r in rows if r["method"] == m)
        values, diffs = _metric_block(rows, m, pidx, counts, CASE_METRICS)
        pooled, per_tex = _texture(scores, m, protocols, samples, pidx, counts)
        per_proto = {}
        for p in protocols:
            sub = [r for r in rows if r["protocol"] == p]
            v, d = _metric_block(sub, m, pidx, counts, CASE_METRICS)
            per_proto[p] = {"metrics": v, "vs_identity": d, "texture_ccc": per_tex.get(p)}
        out["methods"][m] = {"samples": samples, "metrics": values, "vs_identity": diffs, "texture_ccc": pooled,
                             "per_protocol": per_proto}  # fmt: skip
    if protocol is not None:
        out["windows"] = {"metric": list(protocol.metric_window), "soft": list(protocol.soft_window),
                          "texture": list(protocol.texture_window)}  # fmt: skip
        if cases:
            out["reference"] = _reference_stats(protocol, cases, pidx, counts)
    return out


def _reference_stats(protocol: CTProtocol, cases: Sequence[Case], pidx, counts) -> dict[str, Any]:
    from medfusion.eval.image import edge_sharpness, noise_sd

    once = {c.case_id: c for c in cases if c.case_id in pidx}  # one standard scan per patient
    cids = [pidx[c] for c in once]
    noise = [noise_sd(c.reference, protocol.uniform_roi(c.label)) for c in once.values()]
    edge = [edge_sharpness(c.reference, protocol.body(c.label)) for c in once.values()]
    return {"noise_sd": cluster_mean(noise, cids, counts).as_dict(),
            "edge_sharpness": cluster_mean(edge, cids, counts).as_dict()}  # fmt: skip


# ----------------------------------------------------------------------------------------------- files
def cases_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """``cases.csv`` text: :data:`CSV_KEYS` then :data:`CASE_METRICS` (full float precision)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=[*CSV_KEYS, *CASE_METRICS], lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if k in CASE_METRICS else r[k]) for k in w.fieldnames})
    return buf.getvalue()


def read_cases_csv(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a ``cases.csv`` with metrics as floats and ``sample`` as int."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["sample"] = int(r["sample"])
        for k in CASE_METRICS:
            r[k] = float(r[k])
    return rows


def _fmt(e: Mapping[str, Any] | None, digits: int) -> str:
    if not e or e["mean"] is None or not np.isfinite(e["mean"]):
        return "n/a"
    lo, hi = e["ci"]
    ci = f" [{lo:.{digits}f}, {hi:.{digits}f}]" if np.isfinite(lo) and np.isfinite(hi) else ""
    return f"{e['mean']:.{digits}f}{ci}"


DIGITS = {"ssim": 4, "edge_sharpness": 3, "texture_ccc": 3, "noise_sd": 1}


def _table(
    summary: Mapping[str, Any], key: str, metrics: Sequence[str], proto: str | None = None
) -> list[str]:
    hu = _in_hu(summary)
    digits = DIGITS if hu else {**DIGITS, "noise_sd": 4}
    head = ["method", *(METRIC_LABELS[k] if hu else METRIC_LABELS[k].replace(" (HU)", "") for k in metrics)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in summary["methods"].items():
        src = m if proto is None else m["per_protocol"][proto]
        cells = []
        for k in metrics:
            e = src.get(key, {}).get(k) if k != "texture_ccc" else src.get("texture_ccc")
            cells.append(_fmt(e, digits.get(k, 2)))
        lines.append("| " + " | ".join([name, *cells]) + " |")
    return lines


def _in_hu(summary: Mapping[str, Any]) -> bool:
    """Whether the summary's intensities are CT numbers (a metric window wider than 100 units; MR in [0, 1] is not)."""
    lo, hi = summary.get("windows", {}).get("metric", METRIC_WINDOW)
    return hi - lo > 100


def report_markdown(
    summary: Mapping[str, Any], figures: Mapping[str, Sequence[str]], header: Mapping[str, Any]
) -> str:
    """``report.md``: what was run, the tables with 95% patient-bootstrap intervals, the figures."""
    b = summary["bootstrap"]
    windows = summary.get("windows", {"metric": METRIC_WINDOW, "soft": SOFT_TISSUE_WINDOW, "texture": TEXTURE_WINDOW})
    (lo, hi), (slo, shi), (tlo, thi) = windows["metric"], windows["soft"], windows["texture"]
    lines = [f"# Evaluation: {header.get('task', '')} on the {header.get('split', '')} split", ""]
    lines += [f"- {k}: `{v}`" for k, v in header.items() if k != "environment"]
    if header.get("environment"):
        lines += [f"- {describe_environment(header['environment'])}"]
    lines += [
        f"- patients: {summary['n_patients']}; protocols: {', '.join(summary['protocols'])}",
        f"- intervals: {int(b['level'] * 100)}% {b['interval']} bootstrap over {b['unit']}s, {b['n_boot']} replicates, "
        f"seed {b['seed']}; PSNR/SSIM on [{lo:g}, {hi:g}], soft window [{slo:g}, {shi:g}], texture grey levels "
        f"on [{tlo:g}, {thi:g}] (CT: HU); 'body' = inside the patient",
        "", "## All protocols pooled", "",
        *_table(summary, "metrics", [*CASE_METRICS, "texture_ccc"]),
        "", "## Paired difference against identity (method minus raw input, same case)", "",
        *_table(summary, "vs_identity", CASE_METRICS),
    ]  # fmt: skip
    ref = summary.get("reference")
    if ref:
        noise = f"{_fmt(ref['noise_sd'], 1)} HU" if _in_hu(summary) else _fmt(ref["noise_sd"], 4)
        lines += ["", f"Standard scans themselves: noise SD {noise}, "
                  f"edge sharpness {_fmt(ref['edge_sharpness'], 3)} /px."]  # fmt: skip
    for p in summary["protocols"]:
        lines += ["", f"## Protocol {p}", "",
                  *_table(summary, "metrics", ["psnr_body", "psnr_soft_body", "ssim", "noise_sd", "texture_ccc"], p),
                  "", "Against identity:", "",
                  *_table(summary, "vs_identity", ["psnr_body", "psnr_soft_body", "ssim", "noise_sd"], p)]  # fmt: skip
    lines += ["", "## Figures", "", "Axial slices as radiologists read them: anterior up, the patient's right on the "
              "image's left.", ""]  # fmt: skip
    for group, paths in figures.items():
        lines += [f"![{group}]({p})" for p in paths] + [""]
    return "\n".join(lines) + "\n"


def write_figures(out: Path, summary: Mapping[str, Any], scores: Scores, overwrite: bool,
                  window: tuple[float, float] = SOFT_TISSUE_WINDOW) -> dict[str, list[str]]:  # fmt: skip
    """``figures/examples.png`` (a row per protocol: its first case) and ``figures/box_plots.png`` (a box plot per
    metric over the cases); returns the relative paths by group."""
    from medfusion.eval.figures import box_plots, example_panels

    rows = [(proto, panels, affine) for proto, (panels, affine) in scores.examples.items()]
    example_panels(out / "figures" / "examples.png", rows, window=window, title="first case of each protocol",
                   overwrite=overwrite)  # fmt: skip
    values: dict[str, dict[str, list[float]]] = {k: {} for k in CASE_METRICS}
    for r in scores.rows:
        for k in CASE_METRICS:
            values[k].setdefault(str(r["method"]), []).append(float(r[k]))
    refs = {k: v["mean"] for k, v in summary.get("reference", {}).items()}
    box_plots(
        out / "figures" / "box_plots.png", values, labels=METRIC_LABELS, references=refs, overwrite=overwrite
    )
    return {"examples": ["figures/examples.png"], "box plots": ["figures/box_plots.png"]}


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def evaluate(
    cases: Sequence[Case],
    methods: Sequence[Method],
    protocol: CTProtocol,
    out: str | Path,
    *,
    seed: int = 0,
    n_boot: int = 2000,
    header: Mapping[str, Any] | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Score ``methods`` on ``cases`` and write :data:`OUTPUTS` and ``figures/`` into ``out``; returns the summary.

    ``header``: what was run (task, split, manifest, command, ...), written at the top of ``report.md`` and under
    ``"run"`` in ``summary.json``. Existing outputs raise ``FileExistsError`` before any work unless ``overwrite``.
    """
    out = Path(out)
    for name in (*OUTPUTS, "figures"):
        check_not_overwriting(out / name, overwrite)
    scores = score(cases, methods, protocol, log=log)
    summary = summarize(scores, seed=seed, n_boot=n_boot, protocol=protocol, cases=cases)
    summary = {"run": dict(header or {}), **summary}
    write_text_atomic(out / "cases.csv", cases_csv(scores.rows), overwrite=overwrite)
    figs = write_figures(out, summary, scores, overwrite, window=protocol.soft_window)
    summary["figures"] = figs
    write_text_atomic(out / "summary.json", json.dumps(_json_safe(summary), indent=1), overwrite=overwrite)
    write_text_atomic(out / "report.md", report_markdown(summary, figs, header or {}), overwrite=overwrite)
    return summary


def append_jsonl(path: str | Path, record: Mapping[str, Any]) -> Path:
    """Append one JSON line to ``path`` (the file is rewritten atomically with the line added)."""
    path = Path(path)
    old = path.read_text() if path.exists() else ""
    if old and not old.endswith("\n"):
        old += "\n"
    return write_text_atomic(
        path, old + json.dumps(_json_safe(dict(record)), sort_keys=True) + "\n", overwrite=True
    )

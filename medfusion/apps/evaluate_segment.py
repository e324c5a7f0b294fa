"""``medfusion evaluate --task segment``: few-shot segmentation with and without deformation augmentation.

The protocol of DRDM's downstream test (Zheng et al., arXiv 2407.07295, sec. 4.3 and Table 2), as a command:

1. For each labelled fraction ``f`` (``--fractions``) and seed ``s`` (``--seeds``), a subset of
   ``max(1, round(f * N))`` of the ``N`` training cases is drawn (seeded by ``s``; its labels are the only ones used).
2. For each augmentation (``--augment``: ``none``, ``elastic``, ``drdm-random``, ``drdm:PATH``), ``--copies`` deformed
   copies of every labelled case are made once (:mod:`medfusion.apps.deformers`, seeded by ``s``, the case and the
   copy) and pooled with the originals.
3. The same segmenter (:class:`medfusion.models.segmentation.Segmentation`: MONAI ``UNet``, Dice + cross-entropy,
   AdamW with cosine decay) is trained from the same initial weights (seed ``s``) for the same number of steps
   (``--train-steps``, global batch ``--train-batch``), drawing uniformly from the pool: every arm gets the same budget.
4. It is scored on every case of ``--split``: Dice and HD95 (mm) per class (MONAI ``compute_dice`` /
   ``compute_hausdorff_distance``, classes absent from a case's reference left out), their mean over classes.

Outputs (``OUT/``): ``cases.csv`` (one row per fraction x seed x augmentation x case), ``summary.json`` (per fraction
and augmentation: mean Dice and HD95 with 95% patient-bootstrap intervals over cases and seeds, the SD over seeds,
the paired difference against ``none`` with its interval, Dice per class, the folding % of the augmenting fields),
``report.md`` and ``figures/`` (Dice against the labelled fraction; example overlays). Under ``--devices N`` training
runs on N ranks (the stream of :mod:`medfusion.apps.downstream`: the same model as on one rank). With
``--strategy ddp`` (Lightning's launcher, torchrun, SLURM) every rank stays up and scoring splits the cases across
ranks, each case once; with ``ddp_spawn`` the trained weights come back to the main process, which scores every case.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medfusion import keys as K
from medfusion.apps.downstream import (
    Case,
    Launch,
    StreamDataset,
    StreamSampler,
    copy_seed,
    drdm_models,
    few_shot_subset,
    fit,
    fmt_estimate,
    is_writer,
    label_scores,
    prepare,
    score_cases,
    write_outputs,
)
from medfusion.eval.provenance import describe as describe_environment
from medfusion.eval.provenance import environment

SEGMENT_AUGMENTATIONS = ("none", "elastic", "drdm-random", "drdm:PATH")


def check_augmentations(names: Sequence[str], copies: int = 1) -> list[str]:
    """Unique augmentation names, ``none`` first where it is asked for (the paired differences need it);
    ``ValueError`` naming the valid ones, ``FileNotFoundError`` for a missing ``drdm:`` model, before any training."""
    out = ["none"] if "none" in names else []
    for n in names:
        if n not in ("none", "elastic", "drdm-random") and not n.startswith("drdm:"):
            raise ValueError(f"unknown augmentation {n!r}; valid: {', '.join(SEGMENT_AUGMENTATIONS)}")
        if n.startswith("drdm:") and not Path(n.split(":", 1)[1]).exists():
            raise FileNotFoundError(f"DRDM model not found: {n.split(':', 1)[1]}")
        if n not in out:
            out.append(n)
    if copies < 1 and any(n != "none" for n in out):
        raise ValueError(
            f"--copies must be >= 1 with an augmentation (0 would train it as 'none'), got {copies}"
        )
    return out


def augmentation_pool(
    cases: Sequence[Case], name: str, copies: int, seed: int, spatial_dims: int, settings: Mapping[str, Any]
) -> tuple[list[dict[str, torch.Tensor]], float]:
    """The labelled cases plus ``copies`` deformations of each (none for ``none``), the mean folding % of the
    fields and their mean displacement |u| in voxels (NaN for ``none``)."""
    from medfusion.apps.deformers import make_deformer

    items = [{K.IMAGE: c.arrays[K.IMAGE], K.LABEL: c.arrays[K.LABEL]} for c in cases]
    if name == "none":
        return items, float("nan"), float("nan")
    deform = make_deformer(name, [K.IMAGE], [K.LABEL], spatial_dims, **settings)
    folds, sizes = [], []
    for i, item in enumerate(list(items)):
        for k in range(copies):
            d = deform(item, copy_seed(seed, i, k))
            items.append(d.arrays)
            folds.append(d.folding_pct)
            sizes.append(float(d.ddf.norm(dim=0).mean()))
    return items, float(np.mean(folds)), float(np.mean(sizes))


def _segmenter(num_classes: int, spatial_dims: int, options: Mapping[str, Any], seed: int) -> Any:
    import lightning as L

    from medfusion.models.segmentation import Segmentation

    L.seed_everything(seed, verbose=False)
    channels = tuple(options["channels"])
    return Segmentation(
        num_classes=num_classes, spatial_dims=spatial_dims, channels=channels, strides=(2,) * (len(channels) - 1),
        num_res_units=2, lr=options["lr"], hu_window=tuple(options["hu_window"]),
        sw_roi_size=options.get("roi_size") if spatial_dims == 3 else None,
    )  # fmt: skip


def score_case(module: Any, case: Case, num_classes: int) -> dict[str, float]:
    """Dice and HD95 (mm) per class (``dice_<c>``, ``hd95_<c>``) and their means over the classes present."""
    pred = module.predict_labels(case.arrays[K.IMAGE][None])
    return label_scores(pred, case.arrays[K.LABEL][None].long(), num_classes, case.spacing)


def _crop_draw(roi: Sequence[int] | None):
    """A per-draw random crop of ``roi`` (3D patches), reproducible from the draw seed; None: whole images."""
    if roi is None:
        return None

    def draw(item: Mapping[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        shape = item[K.IMAGE].shape[1:]
        if any(r > s for r, s in zip(roi, shape)):
            raise ValueError(f"--roi-size {tuple(roi)} is larger than an image {tuple(shape)}")
        start = [int(torch.randint(0, s - r + 1, (1,), generator=g)) for r, s in zip(roi, shape)]
        sl = (slice(None), *(slice(a, a + r) for a, r in zip(start, roi)))
        return {k: v[sl] for k, v in item.items()}

    return draw


def run_protocol(
    training: Sequence[Case],
    evaluation: Sequence[Case],
    *,
    augmentations: Sequence[str],
    fractions: Sequence[float],
    seeds: Sequence[int],
    options: Mapping[str, Any],
    launch: Launch,
    root: Path,
    log=print,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Rows of every fraction x seed x augmentation x evaluation case, and per-run facts (labelled count, pool
    size, folding %, minutes). ``options``: ``spatial_dims``, ``num_classes``, ``copies``, ``train_steps``,
    ``train_batch``, ``lr``, ``channels``, ``hu_window``, ``roi_size`` and ``deformer`` settings."""
    import time

    dims, ncls = int(options["spatial_dims"]), int(options["num_classes"])
    rows: list[dict[str, Any]] = []
    runs: dict[str, Any] = {}
    for fraction in fractions:
        for seed in seeds:
            subset = [training[i] for i in few_shot_subset(len(training), fraction, seed)]
            for aug in augmentations:
                t0 = time.perf_counter()
                pool, folding, size = augmentation_pool(
                    subset, aug, int(options["copies"]), seed, dims, options["deformer"]
                )
                module = _segmenter(ncls, dims, options, seed)
                sampler = StreamSampler(
                    [1.0] * len(pool), options["train_steps"], options["train_batch"], seed
                )
                module = fit(
                    module, StreamDataset(pool, _crop_draw(options.get("roi_size"))), sampler, launch, root
                )
                new = score_cases(len(evaluation), lambda i, m=module: [score_case(m, evaluation[i], ncls)])
                for case, r in zip(evaluation, new):
                    rows.append({"fraction": fraction, "n_labelled": len(subset), "seed": seed, "augmentation": aug,
                                 "case_id": case.patient, **r})  # fmt: skip
                minutes = (time.perf_counter() - t0) / 60
                runs[f"{fraction}|{seed}|{aug}"] = {"n_labelled": len(subset), "pool": len(pool), "folding_pct": folding,
                                                    "displacement_vox": size, "minutes": minutes}  # fmt: skip
                if dims == 2:  # the first case's prediction, for the report's overlays
                    example = module.predict_labels(evaluation[0].arrays[K.IMAGE][None])[0, 0].numpy()
                    runs[f"{fraction}|{seed}|{aug}"]["example"] = example
                dice = np.nanmean([r["dice"] for r in new])
                log(f"fraction {fraction:g} ({len(subset)} labelled), seed {seed}, {aug}: Dice {dice:.3f} "
                    f"({minutes:.1f} min)")  # fmt: skip
    return rows, runs


def _run_mean(runs: Mapping[str, Any], fraction: float, seeds: Sequence[int], aug: str, key: str) -> float:
    """Mean of a per-run fact over the seeds (NaN where no run has it)."""
    v = [runs[f"{fraction}|{s}|{aug}"].get(key, float("nan")) for s in seeds]
    return float(np.nanmean(v)) if any(math.isfinite(x) for x in v) else float("nan")


def summarize(rows: Sequence[Mapping[str, Any]], runs: Mapping[str, Any], *, seed: int, n_boot: int,
              num_classes: int) -> dict[str, Any]:  # fmt: skip
    """Per fraction and augmentation: Dice / HD95 estimates (patient bootstrap over the evaluation cases, every
    seed's row of a case resampled with it), the SD over seeds of the mean Dice, the paired difference against
    ``none`` (same fraction, seed and case), Dice per class and the mean folding %."""
    from medfusion.eval.stats import cluster_mean, resample_counts

    patients = sorted({r["case_id"] for r in rows})
    pidx = {p: i for i, p in enumerate(patients)}
    counts = resample_counts(len(patients), n_boot, seed)
    out: dict[str, Any] = {"n_cases": len(patients), "n_boot": n_boot, "results": []}
    base = {(r["fraction"], r["seed"], r["case_id"]): r for r in rows if r["augmentation"] == "none"}
    for fraction in sorted({r["fraction"] for r in rows}):
        for aug in dict.fromkeys(r["augmentation"] for r in rows):
            sel = [r for r in rows if r["fraction"] == fraction and r["augmentation"] == aug]
            if not sel:
                continue
            g = [pidx[r["case_id"]] for r in sel]
            seeds = sorted({r["seed"] for r in sel})
            per_seed = [float(np.nanmean([r["dice"] for r in sel if r["seed"] == s])) for s in seeds]
            entry: dict[str, Any] = {
                "fraction": fraction, "augmentation": aug, "n_labelled": sel[0]["n_labelled"], "seeds": seeds,
                "dice": cluster_mean([r["dice"] for r in sel], g, counts).as_dict(),
                "hd95": cluster_mean([r["hd95"] for r in sel], g, counts).as_dict(),
                "dice_seed_sd": float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else float("nan"),
                "dice_per_class": {str(c): float(np.nanmean([r[f"dice_{c}"] for r in sel]))
                                   if any(math.isfinite(r[f"dice_{c}"]) for r in sel) else float("nan")
                                   for c in range(1, num_classes)},
                "folding_pct": _run_mean(runs, fraction, seeds, aug, "folding_pct"),
            }  # fmt: skip
            entry["displacement_vox"] = _run_mean(runs, fraction, seeds, aug, "displacement_vox")
            entry["missed_classes"] = float(np.mean([r.get("missed_classes", np.nan) for r in sel]))
            if aug != "none" and base:
                diff = [r["dice"] - base[(fraction, r["seed"], r["case_id"])]["dice"] for r in sel]
                entry["dice_vs_none"] = cluster_mean(diff, g, counts).as_dict()
                # the interval above resamples cases with the trained models fixed; the seeds' own differences
                # show the training-seed variation (same sign for every seed or not)
                entry["dice_vs_none_per_seed"] = [
                    float(np.nanmean([d for d, r in zip(diff, sel) if r["seed"] == s])) for s in seeds
                ]
            out["results"].append(entry)
    return out


def evaluate_segment(
    manifest: str | Path,
    output: str | Path,
    *,
    split: str = "validation",
    augmentations: Sequence[str] = ("none", "elastic", "drdm-random"),
    fractions: Sequence[float] = (0.05, 0.2, 1.0),
    seeds: Sequence[int] = (0, 1, 2),
    copies: int = 8,
    train_steps: int = 1000,
    train_batch: int = 8,
    lr: float = 2e-3,
    channels: Sequence[int] = (16, 32, 64, 128),
    roi_size: Sequence[int] | None = None,
    hu_window: Sequence[float] = (-1000.0, 1000.0),
    deformer: Mapping[str, Any] | None = None,
    launch: Launch = Launch(),
    seed: int = 0,
    n_boot: int = 2000,
    test_logs: Sequence[str | Path] = (),
    command: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = print,
) -> dict[str, Any]:
    """Few-shot segmentation with and without augmentation (module docstring) on a
    ``segment`` manifest (``image``, ``label``); returns the summary. ``deformer``: settings of
    :func:`medfusion.apps.deformers.make_deformer`; ``seed``: the bootstrap's seed."""
    augs = check_augmentations(augmentations, copies)
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"labelled fractions must lie in (0, 1], got {f}")
    out, dims, train, evaluation = prepare(manifest, output, "segment", split, overwrite, [K.IMAGE], [K.LABEL],
                                            hu_window)  # fmt: skip
    num_classes = (
        int(max(float(c.arrays[K.LABEL].max()) for c in train)) + 1
    )  # the evaluation split chooses nothing
    options = {"spatial_dims": dims, "num_classes": num_classes, "copies": copies, "train_steps": train_steps,
               "train_batch": train_batch, "lr": lr, "channels": list(channels), "hu_window": list(hu_window),
               "roi_size": list(roi_size) if roi_size else None, "deformer": dict(deformer or {})}  # fmt: skip
    rows, runs = run_protocol(train, evaluation, augmentations=augs, fractions=fractions, seeds=seeds,
                              options=options, launch=launch, root=out, log=log or (lambda s: None))  # fmt: skip
    summary = summarize(rows, runs, seed=seed, n_boot=n_boot, num_classes=num_classes)
    header = {"task": "segment", "split": split, "manifest": str(manifest), "command": command or "",
              "n_training": len(train), "options": options, "launch": launch._asdict(),
              "environment": environment(), "models": drdm_models(augs)}  # fmt: skip
    summary["runs"] = runs
    if is_writer():
        figures = _segment_figures(out, summary, evaluation, overwrite)
        write_outputs(
            out, rows, summary, segment_report(summary, header, figures), header, test_logs, overwrite
        )
    return {"run": header, **summary}


def _segment_figures(out: Path, summary: Mapping[str, Any], evaluation, overwrite: bool) -> list[str]:
    from medfusion.eval.figures import interval_curves, label_overlays

    series: dict[str, list] = {}
    for e in summary["results"]:
        d = e["dice"]
        series.setdefault(e["augmentation"], []).append((e["fraction"], d["mean"], *d["ci"]))
    figs = [interval_curves(out / "figures" / "dice_vs_fraction.png", series, xlabel="labelled fraction of the "
                            "training cases", ylabel="mean Dice (95% CI)", log_x=True, overwrite=overwrite)]  # fmt: skip
    examples = [(k, v["example"]) for k, v in summary["runs"].items() if v.get("example") is not None]
    if examples and evaluation[0].arrays[K.IMAGE].ndim == 3:
        smallest = min(float(k.split("|")[0]) for k, _ in examples)
        panels = [("reference", evaluation[0].arrays[K.LABEL][0].numpy())]
        panels += [(k.split("|")[2], v) for k, v in examples if float(k.split("|")[0]) == smallest
                   and k.split("|")[1] == examples[0][0].split("|")[1]]  # fmt: skip
        figs.append(label_overlays(out / "figures" / "overlays.png", evaluation[0].arrays[K.IMAGE][0].numpy(),
                                   panels, affine=evaluation[0].affine, overwrite=overwrite))  # fmt: skip
    for v in summary["runs"].values():
        v.pop("example", None)
    return [str(Path(f).relative_to(out)) for f in figs]


def segment_report(summary: Mapping[str, Any], header: Mapping[str, Any], figures: Sequence[str]) -> str:
    """``report.md`` of a few-shot segmentation evaluation."""
    o = header["options"]
    lines = [
        f"# Few-shot segmentation ({header['split']} split, {summary['n_cases']} cases)", "",
        f"Command: `{header['command']}`" if header.get("command") else "", "",
        describe_environment(header.get("environment")), "",
        f"Manifest `{header['manifest']}`: {header['n_training']} training cases; {o['spatial_dims']}D, "
        f"{o['num_classes']} label values. Segmenter: MONAI UNet {tuple(o['channels'])}, Dice + CE, AdamW "
        f"{o['lr']:g} cosine; {o['train_steps']} steps x batch {o['train_batch']} for every arm; {o['copies']} "
        f"deformed copies per labelled case. Intervals: 95% patient bootstrap ({summary['n_boot']} replicates) over "
        "the evaluation cases, every seed's row of a case resampled with it; seed SD = SD of the per-seed mean Dice.",
        "",
        "HD95: a class of the reference missing from the prediction counts as the image diagonal. vs none per seed: "
        "the paired difference of each seed's model (the interval holds the models fixed; the seeds show their own "
        "variation). |u|: mean displacement of the augmenting fields, voxels.",
        "",
        "| fraction | labelled | augmentation | Dice [95% CI] | vs none [95% CI] | vs none per seed | HD95 mm [95% CI] | "
        "missed classes / case | seed SD | |u| vox | folding % |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in summary["results"]:
        fold, size = e["folding_pct"], e.get("displacement_vox", float("nan"))
        per_seed = ", ".join(f"{d:+.3f}" for d in e.get("dice_vs_none_per_seed", [])) or "-"
        lines.append(
            f"| {e['fraction']:g} | {e['n_labelled']} | {e['augmentation']} | {fmt_estimate(e['dice'])} | "
            f"{fmt_estimate(e.get('dice_vs_none'))} | {per_seed} | {fmt_estimate(e['hd95'], 2)} | "
            f"{e.get('missed_classes', float('nan')):.2f} | {e['dice_seed_sd']:.3f} | "
            f"{'-' if size != size else f'{size:.2f}'} | {'-' if fold != fold else f'{fold:.3f}'} |"
        )
    lines += ["", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    return "\n".join(lines)

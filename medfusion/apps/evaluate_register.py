"""``medfusion evaluate --task register``: a registration network trained on real or synthesised pairs, scored on
the real pairs of one split.

The protocol of DRDM's registration test (Zheng et al., arXiv 2407.07295: VoxelMorph trained on synthetic pairs
only, with random B-spline pairs as the baseline, and on synthetic + real pairs), as a command:

* Training sets (``--augment``, one arm each; ``A+B`` pools two): ``real`` (the manifest's training pairs of different
  patients, unsupervised: similarity + smoothness), ``bspline`` / ``drdm-random`` / ``drdm:PATH`` (each training
  image paired with ``--copies`` deformations of itself, :mod:`medfusion.apps.deformers`; the field is known, so the
  pair also trains the network towards it: the supervised term of :class:`~medfusion.models.registration.Registration`,
  weight 0 for the real pairs of a pooled arm).
* The network: :class:`~medfusion.models.registration.Registration` (MONAI ``VoxelMorph``: U-Net to a stationary
  velocity, scaling and squaring, LNCC + diffusion smoothness; Balakrishnan et al., TMI 2019; Dalca et al., MedIA
  2019), the same initial weights (per seed), steps and batch for every arm.
* Scored on every pair of ``--split``: Dice and HD95 (mm) of the nearest-warped moving label against the fixed
  label (classes absent from the fixed label left out), the SD of log det J (no offset) and the % of voxels with
  det J <= 0 (central differences); before registration (identity field) as the reference row. Aggregated as
  Learn2Reg reports them: mean, SD, and the worst 30% point (DSC30: the 30th percentile of Dice; the 70th of
  the lower-is-better metrics), each with a 95% patient-bootstrap interval (the pair is the resampled unit; every seed's row of a pair
  resampled with it).
"""

from __future__ import annotations

import time
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

REGISTER_PAIRS = ("real", "bspline", "drdm-random", "drdm:PATH", "A+B")
METRICS = ("dice", "hd95", "sdlogj", "folding_pct")


def check_pairs(names: Sequence[str]) -> list[list[str]]:
    """Each arm as its parts (``real+drdm:DIR`` -> ``["real", "drdm:DIR"]``); ``ValueError`` naming the valid ones."""
    arms = []
    for name in dict.fromkeys(names):
        parts = name.split("+")
        for p in parts:
            if p not in ("real", "bspline", "drdm-random") and not p.startswith("drdm:"):
                raise ValueError(
                    f"unknown training pairs {p!r} in {name!r}; valid: {', '.join(REGISTER_PAIRS)}"
                )
            if p.startswith("drdm:") and not Path(p.split(":", 1)[1]).exists():
                raise FileNotFoundError(f"DRDM model not found: {p.split(':', 1)[1]}")
        arms.append(parts)
    return arms


def training_pairs(real: Sequence[Case], parts: Sequence[str], copies: int, seed: int, dims: int,
                   settings: Mapping[str, Any]) -> tuple[list[dict[str, torch.Tensor]], float]:  # fmt: skip
    """The pool of training pairs of one arm, every item with ``ddf`` and ``ddf_weight`` (zeros and 0 for real
    pairs), and the mean folding % of the synthetic fields."""
    from medfusion.apps.deformers import make_deformer

    shape = tuple(real[0].arrays[K.MOVING].shape[1:])
    zero = torch.zeros((dims, *shape))
    pool, folds = [], []
    for part in parts:
        if part == "real":
            pool += [{K.MOVING: c.arrays[K.MOVING], K.FIXED: c.arrays[K.FIXED], K.DDF: zero,
                      K.DDF_WEIGHT: torch.tensor(0.0)} for c in real]  # fmt: skip
            continue
        deform = make_deformer(part, [K.IMAGE], [], dims, **settings)
        # each training pair's moving image (the built-in pairs chain the patients, so each patient once)
        for i, img in enumerate(c.arrays[K.MOVING] for c in real):
            for k in range(copies):
                d = deform({K.IMAGE: img}, copy_seed(seed, i, k))
                pool.append(
                    {K.MOVING: img, K.FIXED: d.arrays[K.IMAGE], K.DDF: d.ddf, K.DDF_WEIGHT: torch.tensor(1.0)}
                )
                folds.append(d.folding_pct)
    return pool, float(np.mean(folds)) if folds else float("nan")


def score_pair(ddf: torch.Tensor, case: Case, num_classes: int) -> dict[str, float]:
    """Metrics of one field ``(1, D, *spatial)`` (voxels, pull) on one real pair (module docstring)."""
    from medfusion.fields import folding_fraction, sdlogj, warp_labels

    warped = warp_labels(case.arrays[K.MOVING_LABEL][None].long(), ddf, mode="nearest")
    row = label_scores(warped, case.arrays[K.FIXED_LABEL][None].long(), num_classes, case.spacing)
    return {
        "dice": row["dice"],
        "hd95": row["hd95"],
        "sdlogj": float(sdlogj(ddf).mean()),
        "folding_pct": 100.0 * float(folding_fraction(ddf).mean()),
    }


def _network(dims: int, num_classes: int, options: Mapping[str, Any], seed: int) -> Any:
    import lightning as L

    from medfusion.models.registration import Registration

    L.seed_everything(seed, verbose=False)
    kw = {"channels": tuple(options["channels"])} if options.get("channels") else {}
    return Registration(spatial_dims=dims, num_label_classes=num_classes, lr=options["lr"],
                        supervised_weight=options["supervised_weight"], smooth_weight=options["smooth_weight"],
                        hu_window=tuple(options["hu_window"]), **kw)  # fmt: skip


def run_protocol(training: Sequence[Case], evaluation: Sequence[Case], *, arms: Sequence[Sequence[str]],
                 seeds: Sequence[int], options: Mapping[str, Any], launch: Launch, root: Path,
                 log: Callable[[str], None]) -> tuple[list[dict[str, Any]], dict[str, Any]]:  # fmt: skip
    """Rows of every seed x arm x evaluation pair (plus the identity field's, arm ``before``) and per-run facts."""
    dims, ncls = int(options["spatial_dims"]), int(options["num_classes"])
    shape = tuple(evaluation[0].arrays[K.MOVING].shape[1:])
    identity = torch.zeros((1, dims, *shape))
    rows = [
        {"arm": "before", "seed": -1, "case_id": c.patient, **score_pair(identity, c, ncls)}
        for c in evaluation
    ]
    runs: dict[str, Any] = {}
    for seed in seeds:
        for parts in arms:
            name, t0 = "+".join(parts), time.perf_counter()
            pool, folding = training_pairs(
                training, parts, int(options["copies"]), seed, dims, options["deformer"]
            )
            module = _network(dims, ncls, options, seed)
            sampler = StreamSampler([1.0] * len(pool), options["train_steps"], options["train_batch"], seed)
            module = fit(module, StreamDataset(pool), sampler, launch, root)

            def one(i: int, module=module) -> list[dict[str, Any]]:
                with torch.no_grad():
                    _, ddf = module(evaluation[i].arrays[K.MOVING][None], evaluation[i].arrays[K.FIXED][None])
                return [score_pair(ddf, evaluation[i], ncls)]

            new = score_cases(len(evaluation), one)
            rows += [{"arm": name, "seed": seed, "case_id": c.patient, **r} for c, r in zip(evaluation, new)]
            minutes = (time.perf_counter() - t0) / 60
            runs[f"{seed}|{name}"] = {"pairs": len(pool), "folding_pct": folding, "minutes": minutes}
            log(f"seed {seed}, {name}: Dice {np.nanmean([r['dice'] for r in new]):.3f}, folding "
                f"{np.nanmean([r['folding_pct'] for r in new]):.3f}% ({minutes:.1f} min)")  # fmt: skip
    return rows, runs


def summarize(rows: Sequence[Mapping[str, Any]], *, seed: int, n_boot: int) -> dict[str, Any]:
    """Per arm and metric: mean, SD and the worst-30% point (``worst30``: the 30th percentile of Dice, the 70th of
    HD95, SDlogJ and folding, where lower is better) over rows (pairs x seeds), each with a patient-bootstrap
    interval; the paired Dice difference against the ``real`` arm where there is one."""
    from medfusion.eval.stats import cluster_mean, cluster_statistic, resample_counts

    patients = sorted({r["case_id"] for r in rows})
    pidx = {p: i for i, p in enumerate(patients)}
    counts = resample_counts(len(patients), n_boot, seed)
    real = {(r["seed"], r["case_id"]): r for r in rows if r["arm"] == "real"}
    out: dict[str, Any] = {"n_cases": len(patients), "n_boot": n_boot, "results": []}
    for arm in dict.fromkeys(r["arm"] for r in rows):
        sel = [r for r in rows if r["arm"] == arm]
        g = [pidx[r["case_id"]] for r in sel]
        entry: dict[str, Any] = {"arm": arm, "seeds": sorted({r["seed"] for r in sel})}
        for m in METRICS:
            v = [r[m] for r in sel]
            entry[m] = {
                "mean": cluster_mean(v, g, counts).as_dict(),
                "sd": cluster_statistic(v, g, counts, lambda x: float(np.std(x, ddof=1)) if x.size > 1 else np.nan).as_dict(),
                # robustness: the worst 30% of pairs: the 30th percentile of Dice, the 70th of the others
                "worst30": cluster_statistic(v, g, counts, lambda x, q=30 if m == "dice" else 70: float(
                    np.percentile(x, q))).as_dict(),
            }  # fmt: skip
        if real and arm not in ("real", "before"):
            diff = [r["dice"] - real[(r["seed"], r["case_id"])]["dice"] for r in sel]
            entry["dice_vs_real"] = cluster_mean(diff, g, counts).as_dict()
        out["results"].append(entry)
    return out


def register_report(summary: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """``report.md`` of a registration evaluation."""
    o = header["options"]
    lines = [
        f"# Registration trained on real or synthesised pairs ({header['split']} split, {summary['n_cases']} pairs)",
        "", f"Command: `{header['command']}`" if header.get("command") else "", "",
        describe_environment(header.get("environment")), "",
        f"Manifest `{header['manifest']}`: {header['n_training']} training pairs; {o['spatial_dims']}D, "
        f"{o['num_classes']} label values. Network: MONAI VoxelMorph, LNCC + {o['smooth_weight']:g} x smoothness "
        f"(+ {o['supervised_weight']:g} x known-field error on synthetic pairs), Adam {o['lr']:g}; "
        f"{o['train_steps']} steps x batch {o['train_batch']} for every arm; {o['copies']} synthetic pairs per "
        "training image. Each cell: over pairs x seeds, with 95% bootstrap intervals resampling the pairs "
        f"({summary['n_boot']} replicates; the built-in pairs chain the patients, so each patient is in two pairs "
        "and the intervals are somewhat narrow). Worst 30%: the 30th percentile of Dice, the 70th of HD95. HD95 in "
        "mm (a missed class counts as the image diagonal); SDlogJ without offset; folding = % det J <= 0.",
        "",
        "| training pairs | Dice mean | Dice SD | Dice worst 30% | vs real | HD95 mm | HD95 worst 30% | SDlogJ | "
        "folding % |",
        "|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for e in summary["results"]:
        lines.append(
            f"| {e['arm']} | {fmt_estimate(e['dice']['mean'])} | {fmt_estimate(e['dice']['sd'])} | {fmt_estimate(e['dice']['worst30'])} | "
            f"{fmt_estimate(e.get('dice_vs_real'))} | {fmt_estimate(e['hd95']['mean'], 2)} | {fmt_estimate(e['hd95']['worst30'], 2)} | "
            f"{fmt_estimate(e['sdlogj']['mean'])} | "
            f"{fmt_estimate(e['folding_pct']['mean'])} |"
        )
    return "\n".join(lines) + "\n"


def evaluate_register(
    manifest: str | Path,
    output: str | Path,
    *,
    split: str = "validation",
    pairs: Sequence[str] = ("real", "bspline", "drdm-random"),
    seeds: Sequence[int] = (0, 1, 2),
    copies: int = 8,
    train_steps: int = 1000,
    train_batch: int = 8,
    lr: float = 1e-3,
    smooth_weight: float = 1.0,
    supervised_weight: float = 1.0,
    channels: Sequence[int] | None = None,
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
    """Registration trained on each arm's pairs, scored on the real pairs of ``split`` (module docstring), on a
    ``register`` manifest (``moving``, ``fixed``, ``moving_label``, ``fixed_label``); returns the summary."""
    if roi_size:
        raise ValueError("--roi-size is not used by --task register: pairs are registered whole")
    arms = check_pairs(pairs)
    out, dims, train, evaluation = prepare(manifest, output, "register", split, overwrite, [K.MOVING, K.FIXED],
                                            [K.MOVING_LABEL, K.FIXED_LABEL], hu_window)  # fmt: skip
    labels = (K.MOVING_LABEL, K.FIXED_LABEL)  # from the training split: the evaluation split chooses nothing
    num_classes = int(max(float(c.arrays[k].max()) for c in train for k in labels)) + 1
    options = {"spatial_dims": dims, "num_classes": num_classes, "copies": copies, "train_steps": train_steps,
               "train_batch": train_batch, "lr": lr, "smooth_weight": smooth_weight,
               "supervised_weight": supervised_weight, "channels": list(channels) if channels else None,
               "hu_window": list(hu_window), "deformer": dict(deformer or {})}  # fmt: skip
    rows, runs = run_protocol(train, evaluation, arms=arms, seeds=seeds, options=options, launch=launch, root=out,
                              log=log or (lambda s: None))  # fmt: skip
    summary = {**summarize(rows, seed=seed, n_boot=n_boot), "runs": runs}
    header = {"task": "register", "split": split, "manifest": str(manifest), "command": command or "",
              "n_training": len(train), "options": options, "launch": launch._asdict(),
              "environment": environment(), "models": drdm_models([part for arm in arms for part in arm])}  # fmt: skip
    if is_writer():
        write_outputs(out, rows, summary, register_report(summary, header), header, test_logs, overwrite)
    return {"run": header, **summary}

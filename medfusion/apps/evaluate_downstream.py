"""``medfusion evaluate --task segment|register`` from Python: read the manifest, run the protocol, write the report.

:func:`evaluate_segment` runs :mod:`medfusion.apps.evaluate_segment`'s few-shot protocol and
:func:`evaluate_register` :mod:`medfusion.apps.evaluate_register`'s registration protocol; both write
``OUT/cases.csv``, ``OUT/summary.json``, ``OUT/report.md`` and ``OUT/figures/`` (on global rank 0 only under DDP)
and, for ``split="test"``, one line per evaluation to ``OUT/test_log.jsonl`` and to each of ``test_logs``.
Training reads only the manifest's ``training`` split; choices (augmentation strength, steps) belong on
``split="validation"``.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from medfusion import keys as K
from medfusion.apps.downstream import Launch, is_writer, load_cases

OUTPUTS = ("cases.csv", "summary.json", "report.md")


def _fmt(e: Mapping[str, Any] | None, digits: int = 3) -> str:
    if not e or e.get("mean") is None:
        return "-"
    lo, hi = e["ci"]
    return f"{e['mean']:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def _rows_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    import csv
    import io

    names = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _safe(obj: Any) -> Any:
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {str(k): _safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_safe(v) for v in obj]
    return obj


def _spatial_dims(entries: Sequence[Mapping[str, Any]], key: str) -> int:
    import nibabel as nib

    shape = nib.load(str(entries[0][key])).shape
    return 2 if len(shape) == 2 or (len(shape) == 3 and shape[2] == 1) else 3


def write_outputs(
    out: Path, rows, summary, report: str, header: Mapping[str, Any], test_logs, overwrite: bool
) -> None:
    """Write the outputs (and the test-log line for the test split) atomically."""
    from medfusion.eval.report import append_jsonl
    from medfusion.io.atomic import write_text_atomic

    summary = {"run": dict(header), **summary}
    write_text_atomic(out / "cases.csv", _rows_csv(rows), overwrite=overwrite)
    write_text_atomic(out / "summary.json", json.dumps(_safe(summary), indent=1), overwrite=overwrite)
    write_text_atomic(out / "report.md", report, overwrite=overwrite)
    if header.get("split") == "test":
        record = {**header, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  "output": str(out)}  # fmt: skip
        for path in [out / "test_log.jsonl", *(Path(p) for p in test_logs)]:
            append_jsonl(path, record)


def _prepare(manifest, output, task, split, overwrite, image_keys, label_keys, hu_window):
    from medfusion.data.manifest import load_manifest
    from medfusion.io.atomic import check_not_overwriting

    if split not in ("test", "validation"):
        raise ValueError(f"split must be 'test' or 'validation', got {split!r}")
    out = Path(output)
    for name in (*OUTPUTS, "figures"):
        check_not_overwriting(out / name, overwrite)
    man = load_manifest(manifest, task=task)
    train, evaluation = man.split("training"), man.split(split)
    if not train or not evaluation:
        raise ValueError(f"{manifest}: the downstream evaluation needs 'training' and {split!r} entries")
    dims = _spatial_dims(train, image_keys[0])
    read = [load_cases(e, image_keys, label_keys, tuple(hu_window), dims) for e in (train, evaluation)]
    return out, dims, read[0], read[1]


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
    """Few-shot segmentation with and without augmentation (:mod:`medfusion.apps.evaluate_segment`) on a
    ``segment`` manifest (``image``, ``label``); returns the summary. ``deformer``: settings of
    :func:`medfusion.apps.deformers.make_deformer`; ``seed``: the bootstrap's seed."""
    from medfusion.apps.evaluate_segment import check_augmentations, run_protocol, summarize

    augs = check_augmentations(augmentations, copies)
    for f in fractions:
        if not 0 < f <= 1:
            raise ValueError(f"labelled fractions must lie in (0, 1], got {f}")
    out, dims, train, evaluation = _prepare(manifest, output, "segment", split, overwrite, [K.IMAGE], [K.LABEL],
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
              "n_training": len(train), "options": options, "launch": launch._asdict()}  # fmt: skip
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
                                   panels, overwrite=overwrite))  # fmt: skip
    for v in summary["runs"].values():
        v.pop("example", None)
    return [str(Path(f).relative_to(out)) for f in figs]


def segment_report(summary: Mapping[str, Any], header: Mapping[str, Any], figures: Sequence[str]) -> str:
    """``report.md`` of a few-shot segmentation evaluation."""
    o = header["options"]
    lines = [
        f"# Few-shot segmentation ({header['split']} split, {summary['n_cases']} cases)", "",
        f"Command: `{header['command']}`" if header.get("command") else "", "",
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
            f"| {e['fraction']:g} | {e['n_labelled']} | {e['augmentation']} | {_fmt(e['dice'])} | "
            f"{_fmt(e.get('dice_vs_none'))} | {per_seed} | {_fmt(e['hd95'], 2)} | "
            f"{e.get('missed_classes', float('nan')):.2f} | {e['dice_seed_sd']:.3f} | "
            f"{'-' if size != size else f'{size:.2f}'} | {'-' if fold != fold else f'{fold:.3f}'} |"
        )
    lines += ["", *(f"![{Path(f).stem}]({f})" for f in figures), ""]
    return "\n".join(lines)


def register_report(summary: Mapping[str, Any], header: Mapping[str, Any]) -> str:
    """``report.md`` of a registration evaluation."""
    o = header["options"]
    lines = [
        f"# Registration trained on real or synthesised pairs ({header['split']} split, {summary['n_cases']} pairs)",
        "", f"Command: `{header['command']}`" if header.get("command") else "", "",
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
            f"| {e['arm']} | {_fmt(e['dice']['mean'])} | {_fmt(e['dice']['sd'])} | {_fmt(e['dice']['worst30'])} | "
            f"{_fmt(e.get('dice_vs_real'))} | {_fmt(e['hd95']['mean'], 2)} | {_fmt(e['hd95']['worst30'], 2)} | "
            f"{_fmt(e['sdlogj']['mean'])} | "
            f"{_fmt(e['folding_pct']['mean'])} |"
        )
    return "\n".join(lines) + "\n"


def run_downstream(args) -> int:
    """``medfusion evaluate --task segment|register`` (exit codes: :mod:`medfusion.exit_codes`)."""
    import shlex
    import sys

    from medfusion.exit_codes import EXIT_NOTHING_DONE, EXIT_OK

    launch = Launch(args.accelerator, args.devices, args.num_nodes, args.strategy)
    deformer = {"elastic_magnitude": tuple(args.elastic_magnitude), "elastic_spacing": args.elastic_spacing,
                "bspline_sigma": args.bspline_sigma, "drdm_t_range": tuple(args.drdm_t_range),
                "drdm_steps": args.drdm_steps}  # fmt: skip
    common = dict(split=args.split, seeds=args.seeds, copies=args.copies, train_steps=args.train_steps,
                  train_batch=args.train_batch, roi_size=args.roi_size, hu_window=args.hu_window, deformer=deformer,
                  launch=launch, seed=args.seed, n_boot=args.n_boot, test_logs=[args.test_log] if args.test_log else [],
                  command=shlex.join(["medfusion", *sys.argv[1:]]) if sys.argv[1:2] == ["evaluate"] else None,
                  overwrite=args.overwrite, log=None if args.quiet else print)  # fmt: skip
    if args.channels:
        common["channels"] = args.channels
    if args.task == "segment" and args.roi_size is None:
        common.pop("roi_size")
    try:
        if args.task == "segment":
            summary = evaluate_segment(args.manifest, args.output, augmentations=args.augment or ["none"],
                                       fractions=args.fractions, lr=args.lr or 2e-3, **common)  # fmt: skip
        else:
            from medfusion.apps.evaluate_register import evaluate_register

            summary = evaluate_register(args.manifest, args.output, pairs=args.augment or ["real"],
                                        lr=args.lr or 1e-3, smooth_weight=args.smooth_weight,
                                        supervised_weight=args.supervised_weight, **common)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medfusion evaluate: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    if is_writer():
        print(f"wrote {Path(args.output) / 'report.md'} (summary.json, cases.csv, figures/); "
              f"{len(summary['results'])} results")  # fmt: skip
    return EXIT_OK

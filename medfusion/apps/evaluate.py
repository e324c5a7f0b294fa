"""``medfusion evaluate``: score trained models and baselines on one split of a manifest, with intervals.

    medfusion evaluate --task standardize|restore --manifest M --split test|validation
                       --model DIR [--model DIR@option=value,...] --baseline identity --baseline gaussian
                       [--baseline linear-filter] [--baseline supervised:DIR] --output OUT
                       [--seed S] [--samples N] [--n-boot B] [--test-log PATH] [--device auto] [--overwrite]
                       [--window LO,HI] [--soft-window LO,HI] [--roi-label ID ...]

Every method runs on every case of the split (``source`` -> compared with ``target``, the standard-protocol scan;
``label`` gives the body and the uniform ROI) and :func:`medfusion.eval.report.evaluate` writes
``OUT/summary.json`` (means, 95% patient-bootstrap intervals, paired differences against the raw input),
``OUT/cases.csv``, ``OUT/report.md`` and ``OUT/figures/``.

* Models (``--model``, ``--baseline supervised:DIR``) are exported folders or Lightning ``.ckpt`` files of any
  :class:`medfusion.models.base.Restorer`; they run through the volume job's
  :func:`~medfusion.apps.volume_job.apply_to_array` in their own HU window (values outside it pass through), on
  RAS-ordered volumes (:func:`~medfusion.apps.volume_job.to_ras`), 2D models on batches of axial slices. ``@``
  after the path sets the model's inference options (``DIR@mean_only=true,num_steps=20``; YAML values), checked
  by the model before any case is read. A model's ``sample`` s draws with the generator seeded ``seed + s``
  (``--samples N`` scores N draws of each ``--model``; baselines are deterministic).
* Baselines that need fitting (``gaussian``: the sigma per protocol; ``linear-filter``: the least-squares filter per
  protocol, 2D data; ``noise-matched:DIR``: a supervised restorer's output plus noise drawn with the standard
  protocol's noise power spectrum, :class:`~medfusion.eval.baselines.NoiseTexture`, inside the body) fit on the
  training and validation splits only, never on the split under evaluation, and never on ``test``
  (:func:`fit_baselines`, :func:`fit_noise`).
* The protocol: design choices are scored on ``--split validation``. Every evaluation of ``--split test`` appends
  one line to ``OUT/test_log.jsonl`` (and to ``--test-log PATH``, e.g. ``bench/results/test_log.jsonl``): date,
  command, split, manifest, seed and the SHA-256 of every model's weights, so that a reported test number names
  the run it came from and the number of looks at the test split is on record.

* Intensities: CT in HU by default (PSNR/SSIM on [-1000, 1000], soft-tissue window W400/L40, the uniform ROI an
  eroded liver / muscle / soft-tissue label of the built-in phantoms). Other data give their own range
  (``--window 0,1 --soft-window 0,1 --roi-label 3`` for the brain MR phantom's [0, 1] intensities and its white
  matter; a given soft window is also the texture features' grey-level window): :func:`metric_protocol`.

Exit status: :mod:`medfusion.exit_codes` (0 done; 2 nothing written: bad arguments, manifest or model).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

from medfusion.eval.provenance import environment
from medfusion.exit_codes import EXIT_CODES_HELP, EXIT_NOTHING_DONE, EXIT_OK

TASKS = ("standardize", "restore", "segment", "register")
SPLITS = ("test", "validation")
FIT_SPLITS = ("training", "validation")
BASELINES = ("identity", "gaussian", "linear-filter", "supervised:DIR", "noise-matched:DIR")
TEST_LOG = "test_log.jsonl"


class ModelSpec(NamedTuple):
    """A model to evaluate: its method name, weights path, inference options, whether it is a baseline, and
    whether standard-protocol noise is added to its output (``noise-matched:DIR``)."""

    name: str
    path: Path
    options: dict[str, Any]
    baseline: bool = False
    noise: bool = False


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = EXIT_CODES_HELP
    parser.add_argument(
        "--task", required=True, choices=TASKS,
        help="standardize / restore: source -> standard scan; segment: few-shot segmentation with augmentation; "
        "register: registration trained on real or synthesised pairs",
    )
    parser.add_argument(
        "--manifest", required=True, help="manifest JSON/CSV with source, target, label entries"
    )
    parser.add_argument(
        "--split",
        required=True,
        choices=SPLITS,
        help="split to score: validation while choosing, test for reported numbers (logged)",
    )
    parser.add_argument(
        "--model", action="append", default=[], metavar="DIR[@opt=value,...]",
        help="exported model folder or .ckpt (repeatable); '@' sets inference options, e.g. @mean_only=true",
    )  # fmt: skip
    parser.add_argument(
        "--baseline", action="append", default=[], metavar="NAME",
        help=f"baseline (repeatable): {', '.join(BASELINES)}; identity is always scored",
    )  # fmt: skip
    parser.add_argument("--output", required=True, help="output folder (summary.json, cases.csv, report.md)")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed (default 0)")
    parser.add_argument("--samples", type=int, default=1, help="sampling seeds per --model (default 1)")
    parser.add_argument("--n-boot", type=int, default=2000, help="bootstrap replicates (default 2000)")
    parser.add_argument("--test-log", default=None, help="also append the test-split line to this JSONL file")
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda, cuda:N")
    parser.add_argument("--batch-size", type=int, default=8, help="axial slices per call of a 2D model")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the outputs of an earlier evaluation"
    )
    parser.add_argument("--quiet", action="store_true", help="no per-case progress lines")
    parser.add_argument(
        "--window", default=None, metavar="LO,HI",
        help="intensity range of PSNR/SSIM (default -1000,1000: CT in HU; e.g. 0,1 for normalised MR; write "
        "--window=LO,HI when LO is negative)",
    )  # fmt: skip
    parser.add_argument(
        "--soft-window", default=None, metavar="LO,HI",
        help="range of the soft-window PSNR (default -160,240: CT W400/L40), of the example figures and (when "
        "given) of the texture features' grey levels (default -200,300)",
    )  # fmt: skip
    parser.add_argument(
        "--roi-label", type=int, action="append", default=None, metavar="ID",
        help="label id of the uniform ROI for noise SD and texture (repeatable, in order of preference; default "
        "the built-in phantoms' liver, muscle, soft tissue)",
    )  # fmt: skip
    from medfusion.apps.evaluate_downstream import add_downstream_arguments

    add_downstream_arguments(parser)


# ----------------------------------------------------------------------------------------------- specs
def parse_window(text: str | None, option: str) -> tuple[float, float] | None:
    """``"LO,HI"`` -> ``(LO, HI)`` with ``HI > LO``; None stays None."""
    if text is None:
        return None
    try:
        lo, hi = (float(v) for v in str(text).split(","))
    except ValueError:
        raise ValueError(f"{option} must be two numbers LO,HI, got {text!r}") from None
    if not hi > lo:
        raise ValueError(f"{option} must have HI > LO, got {text!r}")
    return lo, hi


def metric_protocol(
    window: tuple[float, float] | None = None,
    soft_window: tuple[float, float] | None = None,
    roi_labels: Sequence[int] | None = None,
) -> Any:
    """The :class:`~medfusion.eval.ct_protocol.CTProtocol` that scores the cases: CT defaults (module docstring)
    unless a window or the uniform-ROI labels are given. A given ``soft_window`` is also the texture features'
    grey-level window (CT: [-200, 300] HU)."""
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.eval.ct_protocol import METRIC_WINDOW, SOFT_TISSUE_WINDOW, TEXTURE_WINDOW, CTProtocol

    base = CTProtocol.for_label_ids(LABEL_IDS)
    return CTProtocol(
        roi_labels=tuple(int(v) for v in roi_labels) if roi_labels else base.roi_labels,
        metric_window=tuple(window) if window else METRIC_WINDOW,
        soft_window=tuple(soft_window) if soft_window else SOFT_TISSUE_WINDOW,
        texture_window=tuple(soft_window) if soft_window else TEXTURE_WINDOW,
    )


def parse_model(spec: str, *, baseline: bool = False) -> ModelSpec:
    """``DIR`` or ``DIR@key=value,key=value`` (values parsed as YAML scalars) -> :class:`ModelSpec`."""
    import yaml

    path, options = spec, {}
    head, sep, tail = spec.rpartition("@")
    if sep and "=" in tail:
        path = head
        for item in tail.split(","):
            key, eq, value = item.partition("=")
            if not eq or not key.strip():
                raise ValueError(f"model options must be key=value pairs separated by commas, got {tail!r}")
            options[key.strip()] = yaml.safe_load(value)
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model not found: {p}")
    name = p.name[: -len(".ckpt")] if p.name.endswith(".ckpt") else p.name
    if options:
        name += "@" + ",".join(f"{k}={v}" for k, v in options.items())
    return ModelSpec(name, p, options, baseline)


def parse_baselines(names: Sequence[str]) -> tuple[list[str], list[ModelSpec]]:
    """``(fitted baseline names, supervised model specs)``; ``ValueError`` naming the valid baselines."""
    fitted, models = [], []
    for n in names:
        if n.startswith("supervised:"):
            models.append(parse_model(n.split(":", 1)[1], baseline=True))
        elif n.startswith("noise-matched:"):
            models.append(parse_model(n.split(":", 1)[1], baseline=True)._replace(noise=True))
        elif n in ("identity", "gaussian", "linear-filter"):
            if n != "identity" and n not in fitted:
                fitted.append(n)
        else:
            raise ValueError(f"unknown baseline {n!r}; valid: {', '.join(BASELINES)}")
    return fitted, models


def unique_names(specs: Sequence[ModelSpec], taken: Sequence[str]) -> list[ModelSpec]:
    """Make method names unique (``name``, ``name_2``, ...), also against ``taken``."""
    seen = {n: 1 for n in taken}
    out = []
    for s in specs:
        base = f"{'noise-matched' if s.noise else 'supervised'}:{s.name}" if s.baseline else s.name
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append(s._replace(name=base if n == 0 else f"{base}_{n + 1}"))
    return out


# ----------------------------------------------------------------------------------------------- data
def read_split(manifest: Any, split: str, read: Callable | None = None) -> list:
    """The :class:`~medfusion.eval.ct_protocol.Case` of every entry of ``split`` (entries need source, target,
    label)."""
    from medfusion.eval.ct_protocol import read_case

    read = read or read_case
    entries = manifest.split(split)
    if not entries:
        raise ValueError(
            f"{manifest.path}: no entries in split {split!r}; present: {', '.join(manifest.splits)}"
        )
    missing = [k for k in ("source", "target", "label") if k not in entries[0]]
    if missing:
        raise ValueError(
            f"{manifest.path}: entries of split {split!r} lack {missing} (needs source, target, label)"
        )
    return [read(e) for e in entries]


def fit_splits(split: str) -> tuple[str, ...]:
    """The splits that baselines fit on when ``split`` is evaluated: training and validation, minus ``split``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return tuple(s for s in FIT_SPLITS if s != split)


def fit_baselines(names: Sequence[str], manifest: Any, split: str, read: Callable | None = None) -> list:
    """Fit the ``gaussian`` / ``linear-filter`` baselines on :func:`fit_splits` of ``manifest`` (never the test
    split) and return them as :class:`~medfusion.eval.report.Method` objects."""
    import numpy as np

    from medfusion.eval.baselines import GaussianBaseline, LinearFilterBaseline
    from medfusion.eval.report import Method

    if not names:
        return []
    pairs: dict[str, list] = {}
    for s in fit_splits(split):
        if manifest.split(s):
            for c in read_split(manifest, s, read):
                pairs.setdefault(c.protocol, []).append((np.asarray(c.source), np.asarray(c.reference)))
    if not pairs:
        raise ValueError(
            f"{manifest.path}: no {' or '.join(fit_splits(split))} cases to fit the baselines on"
        )
    out = []
    for n in names:
        if n == "gaussian":
            fitted: Any = GaussianBaseline.fit(pairs)
        else:
            fitted = LinearFilterBaseline.fit(pairs)
            if not fitted.filters:
                raise ValueError(
                    "linear-filter fits 2D slices (or stacks of them) of one slice shape; this manifest's scans are not"
                )
        out.append(Method(n, lambda case, sample, f=fitted: f(case.source, case.protocol)))
    return out


def fit_noise(manifest: Any, split: str, read: Callable | None = None, protocol: Any = None) -> Any:
    """The standard protocol's :class:`~medfusion.eval.baselines.NoiseTexture`, measured in the uniform ROI
    (``protocol``'s, default :func:`metric_protocol`'s) of the standard scans (``target``) of :func:`fit_splits`
    (each patient once; 16-pixel patches, else 8)."""
    from medfusion.eval.baselines import NoiseTexture

    protocol = protocol or metric_protocol()
    refs = {}
    for s in fit_splits(split):
        if manifest.split(s):
            refs.update({c.case_id: c for c in read_split(manifest, s, read)})
    if not refs:
        raise ValueError(
            f"{manifest.path}: no {' or '.join(fit_splits(split))} cases to measure the noise on"
        )
    images = [c.reference for c in refs.values()]
    rois = [protocol.uniform_roi(c.label) for c in refs.values()]
    try:
        return NoiseTexture.fit(images, rois, patch=16)
    except ValueError:
        return NoiseTexture.fit(images, rois, patch=8)


def model_method(
    spec: ModelSpec, model: Any, *, seed: int, samples: int, batch_size: int, device: Any, noise: Any = None
):
    """A :class:`~medfusion.eval.report.Method` running ``model.restore`` over a case (RAS order, HU window);
    with ``noise`` (a :class:`~medfusion.eval.baselines.NoiseTexture`) its draws are added inside the body."""
    import numpy as np
    import torch

    from medfusion.apps.volume_job import apply_to_array, to_ras
    from medfusion.eval.report import Method

    window = model.hu_window
    if window is None:
        raise ValueError(f"{spec.path}: {type(model).__name__} has no HU window of its own")
    generator = torch.Generator()

    def restore(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.restore(x, generator=generator, **spec.options)

    def run(case: Any, sample: int):
        generator.manual_seed(seed + sample)
        arr, back = to_ras(case.source, case.affine)
        hu = back(apply_to_array(
            arr, restore, spatial_dims=model.spatial_dims, hu_window=(float(window[0]), float(window[1])),
            batch_size=batch_size, divisible_by=model.divisible_by, device=device,
        ))  # fmt: skip
        if noise is not None:  # seeded per case and sample
            import zlib

            rng = np.random.default_rng(
                [seed, sample, zlib.crc32(f"{case.case_id}/{case.protocol}".encode())]
            )
            hu = hu + noise.sample(hu.shape, rng) * (np.asarray(case.label) > 0)
        return hu

    return Method(spec.name, run, samples)


# ----------------------------------------------------------------------------------------------- entry
def evaluate(
    manifest: str | Path,
    output: str | Path,
    *,
    task: Literal["standardize", "restore"] = "standardize",
    split: Literal["test", "validation"] = "validation",
    models: Sequence[str] = (),
    baselines: Sequence[str] = ("identity", "gaussian"),
    seed: int = 0,
    samples: int = 1,
    n_boot: int = 2000,
    device: str = "auto",
    batch_size: int = 8,
    test_logs: Sequence[str | Path] = (),
    command: str | None = None,
    overwrite: bool = False,
    log: Callable[[str], None] | None = None,
    protocol: Any = None,
) -> dict[str, Any]:
    """``medfusion evaluate`` from Python (module docstring); returns the summary written to ``summary.json``.

    Args:
        models: ``DIR`` or ``DIR@key=value,...`` per model (:func:`parse_model`).
        baselines: names of :data:`BASELINES` (``supervised:DIR`` for a trained supervised restorer).
        test_logs: extra JSONL files that get the test-split line (``OUT/test_log.jsonl`` always does).
        command: the command line recorded in the report and the test log (default: the call's arguments).
        protocol: the :class:`~medfusion.eval.ct_protocol.CTProtocol` of the metrics (default
            :func:`metric_protocol`: CT in HU).
    """
    from medfusion.apps.volume_job import load_restorer, resolve_device
    from medfusion.data.manifest import load_manifest
    from medfusion.eval.report import OUTPUTS, append_jsonl
    from medfusion.eval.report import evaluate as evaluate_cases
    from medfusion.io.atomic import check_not_overwriting
    from medfusion.models.export import weights_sha256

    if task not in ("standardize", "restore") or split not in SPLITS:
        raise ValueError(f"task must be one of {TASKS} and split one of {SPLITS}; got {task!r}, {split!r}")
    if samples < 1 or n_boot < 1 or batch_size < 1:
        raise ValueError(
            f"samples, n_boot and batch_size must be >= 1; got {samples}, {n_boot}, {batch_size}"
        )
    protocol = protocol or metric_protocol()
    out = Path(output)
    for name in (*OUTPUTS, "figures"):
        check_not_overwriting(out / name, overwrite)
    fitted, sup = parse_baselines(baselines)
    specs = unique_names([parse_model(m) for m in models] + sup, ["identity", *fitted])
    man = load_manifest(manifest, task=task)
    dev = resolve_device(device)
    loaded = []
    for s in specs:  # load and check every model before any case is read
        model = load_restorer(s.path, dev)
        model.check_options(**s.options)
        loaded.append((s, model))
    methods = fit_baselines(fitted, man, split)
    noise = fit_noise(man, split, protocol=protocol) if any(s.noise for s in specs) else None
    methods += [
        model_method(s, m, seed=seed, samples=1 if s.baseline else samples, batch_size=batch_size, device=dev,
                     noise=noise if s.noise else None)
        for s, m in loaded
    ]  # fmt: skip
    cases = read_split(man, split)
    command = command or _command(manifest, output, task, split, models, baselines, seed, samples, n_boot)
    header = {"task": task, "split": split, "manifest": str(Path(manifest)), "command": command,
              "models": {s.name: {"path": str(s.path), "weights_sha256": weights_sha256(s.path)} for s in specs},
              "environment": environment()}  # fmt: skip
    if split == "test":
        header["test_log"] = str(out / TEST_LOG)
    summary = evaluate_cases(cases, methods, protocol, out, seed=seed, n_boot=n_boot,
                             header=header, overwrite=overwrite, log=log)  # fmt: skip
    if split == "test":
        record = {
            **header,
            "date": _now(),
            "output": str(out),
            "seed": seed,
            "n_patients": summary["n_patients"],
        }
        for path in [out / TEST_LOG, *(Path(p) for p in test_logs)]:
            append_jsonl(path, record)
    return summary


def _now() -> str:
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _command(manifest, output, task, split, models, baselines, seed, samples, n_boot) -> str:
    parts = ["medfusion", "evaluate", "--task", task, "--manifest", str(manifest), "--split", split]
    for m in models:
        parts += ["--model", str(m)]
    for b in baselines:
        parts += ["--baseline", str(b)]
    parts += [
        "--output",
        str(output),
        "--seed",
        str(seed),
        "--samples",
        str(samples),
        "--n-boot",
        str(n_boot),
    ]
    return shlex.join(parts)


def _print_summary(summary: Mapping[str, Any]) -> None:
    print(
        f"{'method':<28} {'PSNR body dB [95% CI]':>24} {'vs identity dB [95% CI]':>26} {'texture CCC [95% CI]':>24}"
    )
    for name, m in summary["methods"].items():
        p, d, t = m["metrics"]["psnr_body"], m["vs_identity"]["psnr_body"], m["texture_ccc"]

        def f(e: Mapping[str, Any], k: int) -> str:
            lo, hi = e["ci"]
            return f"{e['mean']:.{k}f} [{lo:.{k}f}, {hi:.{k}f}]"

        print(f"{name:<28} {f(p, 2):>24} {f(d, 2):>26} {f(t, 3):>24}")


def run(args: argparse.Namespace) -> int:
    if args.task in ("segment", "register"):
        from medfusion.apps.evaluate_downstream import run_downstream

        return run_downstream(args)
    models, baselines = list(args.model), list(args.baseline) or ["identity"]
    command = _command(args.manifest, args.output, args.task, args.split, models, baselines, args.seed,
                       args.samples, args.n_boot)  # fmt: skip
    for opt in ("window", "soft_window"):
        if getattr(args, opt) is not None:
            command += f" --{opt.replace('_', '-')} {getattr(args, opt)}"
    command += "".join(f" --roi-label {v}" for v in args.roi_label or [])
    try:
        protocol = metric_protocol(
            parse_window(args.window, "--window"), parse_window(args.soft_window, "--soft-window"), args.roi_label
        )
        summary = evaluate(
            args.manifest, args.output, task=args.task, split=args.split, models=models, baselines=baselines,
            seed=args.seed, samples=args.samples, n_boot=args.n_boot, device=args.device, batch_size=args.batch_size,
            test_logs=[args.test_log] if args.test_log else [], command=command, overwrite=args.overwrite,
            log=None if args.quiet else print, protocol=protocol,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"medfusion evaluate: error: {err}", file=sys.stderr)
        return EXIT_NOTHING_DONE
    _print_summary(summary)
    print(f"wrote {Path(args.output) / 'report.md'} (summary.json, cases.csv, figures/)")
    return EXIT_OK

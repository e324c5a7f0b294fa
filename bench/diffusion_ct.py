"""Benchmark: DiffusionCT standardization on held-out patients of the built-in dataset.

Per non-standard protocol, against the standard-protocol scan of the same anatomy (the CT evaluation protocol of
:mod:`medfusion.eval.ct_protocol`: PSNR / SSIM on [-1000, 1000] HU, soft-tissue PSNR, noise SD in an eroded liver
ROI, edge sharpness of the body outline, median texture-feature CCC across test patients), for

* identity (raw input) and the standard repeat scan (test-retest ceiling of the CCC);
* a Gaussian filter whose sigma is tuned per protocol on the validation patients and the per-protocol
  least-squares linear filter (:mod:`medfusion.eval.baselines`);
* the supervised residual U-Net (:class:`medfusion.models.supervised.SupervisedRestorer`) trained on the same pairs;
* DiffusionCT stage-1 passthrough ``decode(encode(source))`` and its ceiling ``decode(encode(standard))``;
* DiffusionCT conditional (residual target, v-prediction) and translate (SDEdit) modes, each decoded the paper's way
  (``D(z_hat)``) and with residual decoding (``x + D(z_hat) - D(E(x))``);
* sampler steps vs quality for the conditional model (DDPM 1000, DDIM 50, DPM-Solver++ 10 / 20).

With ``--eval-manifest M --eval-split validation|test`` the exported models and the baselines are also scored by
``medfusion evaluate`` (patient-bootstrap intervals, paired differences; ``OUT/evaluation/``) on another cohort,
e.g. a fresh one from ``medfusion make-data --seed 1``; a test-split run appends its line to
``bench/results/test_log.jsonl``. Every model trains for a fixed number of optimiser steps (``--ae-steps``, ``--dm-steps``, ``--unet-steps``), so the
figures do not depend on machine load; the wall time is written beside them. Usage::

    python bench/diffusion_ct.py --out /tmp/bench_dct --results bench/results/diffusion_ct_bench.md
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CONDITIONAL_ROW = "DiffusionCT conditional (DPM++ 10), residual decoding"
LINEAR_ROW = "linear filter (least squares on training pairs)"
REMOVED = {  # flags of variants removed from DiffusionCT (their results stay on docs/methods/diffusion_ct.md)
    "ae_cross": False, "skip_dropout": 0.0, "regression_rescale_step": None,
}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=None)
    p.add_argument("--minutes", type=float, default=60.0, help="safety wall-clock cap per trained model")
    p.add_argument("--patients", type=int, default=80, help="80 gives 12 test patients (texture CCC needs >= 12)")
    p.add_argument("--train-pool", type=int, default=0, help="train on cases 0..N-1 of the same-seed dataset "
                   "minus the base split's validation and test patients (0 = the base split's training patients)")  # fmt: skip
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--ae-steps", type=int, default=3000)
    p.add_argument("--dm-steps", type=int, default=4000)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument("--ae-channels", type=int, nargs="+", default=[32, 64, 64], help="stage-1 channels per level")
    p.add_argument("--modes", nargs="+", default=["conditional", "translate"], choices=["conditional", "translate"])
    p.add_argument("--ae-skip-from", type=int, default=2,
                   help="skip autoencoder, skips from this level (2 = none with 3 levels); -1 = MONAI AutoencoderKL")  # fmt: skip
    p.add_argument("--ae-cross", action="store_true", help="removed (cross skips did not pay)")
    p.add_argument("--ae-shortcuts", action="store_true", help="stage 1 with DC-AE residual shortcuts")
    p.add_argument("--skip-dropout", type=float, default=0.0, help="removed (skip dropout did not pay)")
    p.add_argument("--unet-from", default=None, help="reuse the supervised U-Net of this folder (same data, seed)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--workers", type=int, default=0, help="training dataloader workers (persistent)")
    p.add_argument("--reuse", action="store_true", help="load the models a previous run saved in --out")
    p.add_argument("--dm-lr", type=float, default=2e-4, help="stage-2 AdamW learning rate (cosine schedule)")
    p.add_argument("--dm-batch", type=int, default=8, help="stage-2 batch size (crops per step)")
    p.add_argument("--min-snr-gamma", type=float, default=None, help="stage-2 Min-SNR loss weighting")
    p.add_argument("--regression", action="store_true", help="stage 2 with the CorrDiff regression U-Net")
    p.add_argument("--regression-channels", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--regression-lr", type=float, default=None, help="the regression U-Net's own rate")
    p.add_argument("--regression-rescale-step", type=int, default=None, help="removed (did not pay)")
    p.add_argument("--pixel-shuffle", type=int, default=0, help="DiffusionCT(pixel_shuffle=k)")
    p.add_argument("--dm-channels", type=int, nargs="+", default=[64, 128], help="stage-2 denoiser widths")
    p.add_argument("--dm-attention", type=int, nargs="+", default=[0, 1], help="stage-2 self-attention per level")
    p.add_argument("--translate-strengths", type=float, nargs="*", default=[0.1, 0.3])
    p.add_argument("--residual-sigmas", type=float, nargs="*", default=[1.0],
                   help="extra rows: residual decoding with the Gaussian low-pass (px) of the autoencoder's error")  # fmt: skip
    p.add_argument("--skip-ddpm1000", action="store_true")
    p.add_argument("--sweep-protocol", default="sharp_low_dose", help="protocol of the sampler-steps sweep")
    p.add_argument("--seed-repeats", type=int, default=3, help="sampler seeds of the seed-variability table")
    p.add_argument("--eval-manifest", default=None,
                   help="also score the exported models with `medfusion evaluate` on this standardize manifest "
                   "(e.g. a fresh cohort: medfusion make-data --seed 1); writes OUT/evaluation/")  # fmt: skip
    p.add_argument("--eval-split", default="validation", choices=["validation", "test"],
                   help="split of --eval-manifest; test appends a line to bench/results/test_log.jsonl")  # fmt: skip
    args = p.parse_args(argv)
    if "conditional" not in args.modes:
        p.error("--modes must include conditional (the sampler sweep and passthrough rows use it)")
    for name, default in REMOVED.items():
        if getattr(args, name) != default:
            p.error(f"--{name.replace('_', '-')} was removed in medfusion 0.2 (see docs/methods/diffusion_ct.md)")
    if args.train_pool and args.train_pool <= args.patients:
        p.error("--train-pool must be larger than --patients")
    return args


# ------------------------------------------------------------------------------------------- data
def pool_manifest(pool: Path, base: Path) -> Path:
    """A standardize manifest over the pool's cases: training = every pool case outside the base split's validation
    and test patients (case content depends only on (seed, index)); validation and test = the base split's."""
    from medfusion.io.atomic import write_text_atomic

    doc = json.loads(pool.read_text())
    ref = json.loads(base.read_text())
    held = {s: {e["case_id"] for e in ref[s]} for s in ("validation", "test")}
    every = [e for s in ("training", "validation", "test") for e in doc[s]]
    doc["training"] = [e for e in every if e["case_id"] not in held["validation"] | held["test"]]
    for s in ("validation", "test"):
        doc[s] = [e for e in every if e["case_id"] in held[s]]
        if len(doc[s]) != len(ref[s]):
            raise ValueError(f"{pool}: the pool lacks some {s} cases of {base}")
    doc["numTraining"], doc["numValidation"], doc["numTest"] = (len(doc[s]) for s in ("training", "validation", "test"))
    return write_text_atomic(pool.parent / "standardize_pool.json", json.dumps(doc, indent=1), overwrite=True)


def build_data(args: argparse.Namespace, out: Path) -> tuple[Path, Path]:
    """(manifest of the base split, manifest the models train on)."""
    from medfusion.data.builtin import make_dataset

    manifest = Path(make_dataset(out / "data", n_patients=args.patients, dim=2, size=args.size, seed=0,
                                 progress=False)["standardize"])  # fmt: skip
    if not args.train_pool:
        return manifest, manifest
    pool = make_dataset(out / "data_pool", n_patients=args.train_pool, dim=2, size=args.size, seed=0, progress=False)
    return manifest, pool_manifest(Path(pool["standardize"]), manifest)


def pairs_of(manifest: Path, split: str) -> dict[str, list[tuple[np.ndarray, np.ndarray]]]:
    """``{protocol: [(source HU, standard HU)]}`` of one split."""
    from medfusion.data.manifest import load_manifest
    from medfusion.eval.ct_protocol import read_case

    out: dict[str, list] = {}
    for e in load_manifest(manifest).split(split):
        c = read_case(e)
        out.setdefault(c.protocol, []).append((np.squeeze(c.source), np.squeeze(c.reference)))
    return out


# ------------------------------------------------------------------------------------------- models
def trainer(steps: int, minutes: float, dev: torch.device, root: Path):
    import lightning as L

    return L.Trainer(
        max_steps=steps, max_time={"minutes": minutes}, accelerator="gpu" if dev.type == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
        limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
        precision="bf16-mixed" if dev.type == "cuda" else "32-true",
    )  # fmt: skip


def datamodule(manifest: Path, args: argparse.Namespace, batch: int):
    from medfusion.data.datamodule import ManifestDataModule

    return ManifestDataModule(
        str(manifest), task="standardize", spatial_dims=2, roi_size=[args.crop] * 2, batch_size=batch,
        cache="memory", seed=0, num_workers=args.workers, persistent_workers=args.workers > 0,
    )  # fmt: skip


def train_stage1(args, out: Path, dev, train_manifest: Path) -> str:
    from medfusion.models.diffusion_ct_autoencoder import DiffusionCTAutoencoder
    from medfusion.models.export import export_model

    t0, skip = time.perf_counter(), args.ae_skip_from >= 0
    ae = DiffusionCTAutoencoder(
        spatial_dims=2, architecture="skip" if skip else "kl", channels=tuple(args.ae_channels),
        latent_channels=args.latent_channels, skip_from_level=max(args.ae_skip_from, 0), shortcuts=args.ae_shortcuts,
        kl_weight=1e-6, lr=1e-3,
    )  # fmt: skip
    dm = datamodule(train_manifest, args, 2)
    tr = trainer(args.ae_steps, args.minutes, dev, out)
    tr.fit(ae, datamodule=dm)
    ae.calibrate_latent_scale(dm.train_dataloader(), max_batches=50)
    export_model(ae.cpu(), out / "stage1", overwrite=True)
    kind = f"skips from level {args.ae_skip_from}" if skip else "AutoencoderKL"
    return (f"{tr.global_step} steps, bs 4 images ({args.crop}² crops), {args.latent_channels} latent channels, "
            f"{kind}{', DC-AE shortcuts' if args.ae_shortcuts else ''}, {time.perf_counter() - t0:.0f} s")  # fmt: skip


def train_stage2(args, out: Path, dev, train_manifest: Path, mode: str) -> tuple[Any, str]:
    from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, RegressionConfig, SamplingConfig
    from medfusion.models.export import export_model

    t0 = time.perf_counter()
    regression = args.regression and mode == "conditional"
    m = DiffusionCT(
        autoencoder=str(out / "stage1"), mode=mode, prediction="v", residual=True, min_snr_gamma=args.min_snr_gamma,
        denoiser=DenoiserConfig(channels=tuple(args.dm_channels), attention_levels=tuple(map(bool, args.dm_attention))),
        regression=RegressionConfig(tuple(args.regression_channels), args.regression_lr) if regression else None,
        pixel_shuffle=args.pixel_shuffle, sampling=SamplingConfig(num_steps=10, strength=0.3), lr=args.dm_lr,
        ema_decay=0.995,
    )  # fmt: skip
    tr = trainer(args.dm_steps, args.minutes, dev, out)
    tr.fit(m, datamodule=datamodule(train_manifest, args, args.dm_batch))
    export_model(m.cpu(), out / f"stage2_{mode}", overwrite=True)
    info = (f"{tr.global_step} steps, bs {args.dm_batch}, denoiser {tuple(args.dm_channels)} attention "
            f"{tuple(args.dm_attention)}{f', pixel shuffle {args.pixel_shuffle}' if args.pixel_shuffle else ''}"
            f"{f', regression U-Net {tuple(args.regression_channels)}' if regression else ''}"
            f"{f', regression lr {args.regression_lr:g}' if regression and args.regression_lr else ''}"
            f"{f', Min-SNR gamma {args.min_snr_gamma:g}' if args.min_snr_gamma else ''}, lr {args.dm_lr:g}, "
            f"{time.perf_counter() - t0:.0f} s")  # fmt: skip
    return m.to(dev).eval(), info


def train_supervised(args, out: Path, dev, train_manifest: Path) -> tuple[Any, str]:
    """The supervised residual U-Net (MONAI UNet (32, 64, 128), ReZero gate, L1, Adam 1e-3), batch 8."""
    import lightning as L

    from medfusion.models.export import export_model
    from medfusion.models.supervised import SupervisedRestorer

    t0 = time.perf_counter()
    L.seed_everything(0, verbose=False)
    sup = SupervisedRestorer(channels=(32, 64, 128), strides=(2, 2), num_res_units=1, rezero=True, lr=1e-3)
    tr = trainer(args.unet_steps, args.minutes, dev, out)
    tr.fit(sup, datamodule=datamodule(train_manifest, args, 8))
    export_model(sup.cpu(), out / "supervised", overwrite=True)
    return sup.to(dev).eval(), f"{tr.global_step} steps, bs 8, {time.perf_counter() - t0:.0f} s"


def build_models(args, out: Path, dev, train_manifest: Path) -> tuple[dict[str, Any], Any, dict[str, str]]:
    """(``{mode: DiffusionCT}``, supervised U-Net, budget lines); ``--reuse`` / ``--unet-from`` load saved ones."""
    from medfusion.models.export import load_model

    prev = json.loads((out / "results.json").read_text())["budget"] if (out / "results.json").exists() else {}
    budget: dict[str, str] = {}
    if args.reuse and (out / "stage1").exists():
        budget["stage 1 AE"] = prev.get("stage 1 AE", "reused")
    else:
        budget["stage 1 AE"] = train_stage1(args, out, dev, train_manifest)
    models = {}
    for mode in args.modes:
        if args.reuse and (out / f"stage2_{mode}").exists():
            models[mode] = load_model(out / f"stage2_{mode}").to(dev).eval()
            budget[f"stage 2 {mode}"] = prev.get(f"stage 2 {mode}", "reused")
        else:
            models[mode], budget[f"stage 2 {mode}"] = train_stage2(args, out, dev, train_manifest, mode)
    saved = Path(args.unet_from or out) / "supervised"
    if (args.reuse or args.unet_from) and saved.exists():
        sup = load_model(saved).to(dev).eval()
        budget["supervised U-Net"] = prev.get("supervised U-Net", "reused")
    else:
        sup, budget["supervised U-Net"] = train_supervised(args, out, dev, train_manifest)
    return models, sup, budget


# ------------------------------------------------------------------------------------------- evaluation
def on_array(fn, dev, divisible_by: int):
    """``fn(batch in [-1, 1]) -> batch`` as a ct_protocol method ``(source HU, protocol) -> HU``."""
    from medfusion.apps.volume_job import apply_to_array

    def method(src: np.ndarray, protocol: str) -> np.ndarray:
        with torch.no_grad():
            return apply_to_array(src, fn, spatial_dims=2, divisible_by=divisible_by, device=dev, batch_size=32)

    return method


def seeded(model, seed: int = 0, **options):
    """``model.restore`` with a fresh generator of ``seed`` per call."""
    return lambda x: model.restore(x, generator=torch.Generator().manual_seed(seed), **options)


def method_table(args, models: dict, sup, gauss, linear, dev) -> dict[str, Any]:
    """The scored rows: ``{name: (source HU, protocol) -> HU}``."""
    cond = models["conditional"]
    div = cond.divisible_by
    run = lambda fn: on_array(fn, dev, div)  # noqa: E731
    rows: dict[str, Any] = {"identity": lambda s, p: s, "gaussian (val-tuned)": gauss}
    if linear.filters:
        rows[LINEAR_ROW] = linear
    rows["supervised U-Net"] = run(sup.restore)
    rows["stage-1 passthrough"] = run(cond.autoencoder.reconstruct)
    rows["DiffusionCT conditional (DPM++ 10), D(z)"] = run(seeded(cond, decode="latent"))
    rows[CONDITIONAL_ROW] = run(seeded(cond, decode="residual"))
    if args.regression:
        rows["DiffusionCT regression mean only (no DDPM), D(z)"] = run(seeded(cond, mean_only=True, decode="latent"))
        rows["DiffusionCT regression mean only (no DDPM), residual decoding"] = run(
            seeded(cond, mean_only=True, decode="residual")
        )
    for sg in args.residual_sigmas:
        rows[f"{CONDITIONAL_ROW}, low-pass {sg:g} px"] = run(seeded(cond, decode="residual", residual_sigma=sg))
    for st in args.translate_strengths if "translate" in args.modes else []:
        for dec, name in (("latent", "D(z)"), ("residual", "residual decoding")):
            rows[f"DiffusionCT translate (s={st:g}, DPM++ 10), {name}"] = run(
                seeded(models["translate"], strength=st, decode=dec)
            )
    return rows


def seed_variability(args, protocol, cond, cases, outputs, dev) -> dict[str, dict[str, float]]:
    """Per protocol: SD across sampler seeds of the mean PSNR, and the mean per-pixel SD in the body (HU)."""
    if args.seed_repeats <= 1:
        return {}
    out = {}
    for proto, cs in cases.items():
        runs = [outputs[proto][CONDITIONAL_ROW]] + [
            [on_array(seeded(cond, seed=k, decode="residual"), dev, cond.divisible_by)(c.source, proto) for c in cs]
            for k in range(1, args.seed_repeats)
        ]
        psnrs = [np.mean([protocol.image_metrics(x, c.reference, c.label)["psnr"] for x, c in zip(imgs, cs)])
                 for imgs in runs]  # fmt: skip
        pix = [float(np.std(np.stack([r[i] for r in runs]), axis=0)[c.label > 0].mean()) for i, c in enumerate(cs)]
        out[proto] = {"psnr_sd": float(np.std(psnrs, ddof=1)), "pixel_sd": float(np.mean(pix))}
    return out


def sampler_sweep(args, cond, cases, timing: dict[str, float]) -> tuple[str, dict[str, list[np.ndarray]]]:
    """The conditional model with residual decoding at several samplers, one protocol, its slices in one batch."""
    from medfusion.data.pipelines import hu_to_unit, unit_to_hu

    sweep = {"DDIM 50": dict(sampler="ddim", num_steps=50), "DPM++ 10": dict(sampler="dpmpp_2m", num_steps=10),
             "DPM++ 20": dict(sampler="dpmpp_2m", num_steps=20)}  # fmt: skip
    if not args.skip_ddpm1000:
        sweep = {"DDPM 1000": dict(sampler="ddpm", num_steps=1000), **sweep}
    proto = args.sweep_protocol if args.sweep_protocol in cases else next(iter(cases))
    srcs = [c.source for c in cases[proto]]
    x = torch.from_numpy(np.stack([hu_to_unit(s, (-1000.0, 1000.0)) for s in srcs])[:, None]).float()
    rows = {}
    for name, kw in sweep.items():
        t0 = time.perf_counter()
        with torch.no_grad():
            y = cond.restore(x.to(cond.device), generator=torch.Generator().manual_seed(0), decode="residual", **kw)
        timing["sweep " + name] = time.perf_counter() - t0
        outs = [np.asarray(unit_to_hu(v, (-1000.0, 1000.0)), dtype=np.float32) for v in y.float().cpu().numpy()[:, 0]]
        for o, s in zip(outs, srcs):  # the out-of-window pass-through of apply_to_array
            o[(s < -1000) | (s > 1000)] = s[(s < -1000) | (s > 1000)]
        rows["sweep " + name] = outs
    return proto, rows


def ceiling_and_repeat(protocol, cond, entries, dev) -> tuple[dict[str, float], dict[str, float] | None]:
    """Stage-1 ceiling ``decode(encode(standard))`` and the standard repeat scan, both against the standard scan."""
    from medfusion.data.builtin import REPEAT
    from medfusion.eval.ct_protocol import mean_rows, read_case
    from medfusion.io.nifti import read_nifti

    patients = {e["case_id"]: e for e in entries}.values()
    ae = on_array(cond.autoencoder.reconstruct, dev, cond.divisible_by)
    ceiling, reps, refs, labels = [], [], [], []
    for e in patients:
        c = read_case(e)
        ceiling.append(protocol.image_metrics(ae(c.reference, ""), c.reference, c.label))
        path = Path(e["target"]).with_name(f"{REPEAT}.nii.gz")
        if path.exists():
            reps.append(np.asarray(read_nifti(path).array, dtype=np.float32))
            refs.append(c.reference)
            labels.append(c.label)
    return mean_rows(ceiling), (protocol.summarize(reps, refs, labels) if reps else None)


def evaluate(args, manifest: Path, train_manifest: Path, models, sup, dev) -> dict[str, Any]:
    """Fit the baselines, run every method on the test split and score it (:mod:`medfusion.eval.ct_protocol`)."""
    from medfusion.data.manifest import load_manifest
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.eval import ct_protocol as P
    from medfusion.eval.baselines import GaussianBaseline, LinearFilterBaseline

    gauss = GaussianBaseline.fit(pairs_of(manifest, "validation"))
    linear = LinearFilterBaseline.fit(pairs_of(train_manifest, "training"))
    protocol = P.CTProtocol.for_label_ids(LABEL_IDS)
    entries = [dict(e) for e in load_manifest(manifest).split("test")]
    cases = P.by_protocol(P.read_case(e) for e in entries)
    methods = method_table(args, models, sup, gauss, linear, dev)
    timing: dict[str, float] = {}
    with torch.no_grad():
        outputs = {proto: P.run_methods(cs, methods, timing) for proto, cs in cases.items()}
        seed_var = seed_variability(args, protocol, models["conditional"], cases, outputs, dev)
        sweep_proto, sweep = sampler_sweep(args, models["conditional"], cases, timing)
        outputs[sweep_proto].update(sweep)
        ceiling, repeat = ceiling_and_repeat(protocol, models["conditional"], entries, dev)
    return {
        "results": P.score_methods(protocol, outputs, cases), "timing": timing, "seed_variability": seed_var,
        "sweep_protocol": sweep_proto, "ceiling": ceiling, "repeat": repeat, "n_test": len({c["case_id"] for c in entries}),
        "gaussian_sigmas": gauss.sigmas, "linear_filters": sorted(linear.filters),
    }  # fmt: skip


def evaluate_with_tool(args, out: Path) -> dict[str, Any]:
    """Score the exported models and the baselines with :func:`medfusion.apps.evaluate.evaluate` on
    ``--eval-manifest`` / ``--eval-split`` (patient-bootstrap intervals, ``OUT/evaluation/``); a test-split run is
    logged to ``bench/results/test_log.jsonl`` with this command line."""
    import shlex

    from medfusion.apps.evaluate import evaluate as evaluate_models

    models = [f"{out / f'stage2_{m}'}@decode=residual" for m in args.modes]  # the headline rows' decoding
    if args.regression:
        models.append(f"{out / 'stage2_conditional'}@mean_only=true,decode=residual")
    supervised = Path(args.unet_from or out) / "supervised"
    log = Path(__file__).resolve().parent / "results" / "test_log.jsonl"
    return evaluate_models(
        args.eval_manifest, out / "evaluation", task="standardize", split=args.eval_split, models=models,
        baselines=["identity", "gaussian", "linear-filter", f"supervised:{supervised}", f"noise-matched:{supervised}"],
        seed=0,
        device="cuda" if torch.cuda.is_available() else "cpu", test_logs=[log] if args.eval_split == "test" else [],
        command=shlex.join(["python", "bench/diffusion_ct.py", *(sys.argv[1:])]), overwrite=True,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- report
def report(args, ev: dict[str, Any], budget: dict[str, str], dev, minutes: float, n_pool: int | None) -> str:
    from medfusion.data.builtin import FORMAT_VERSION
    from medfusion.eval.ct_protocol import markdown_rows, mean_over_protocols

    results, ceil, rep, n_test = ev["results"], ev["ceiling"], ev["repeat"], ev["n_test"]
    lines = [
        "# DiffusionCT benchmark (built-in 2D phantoms)", "",
        f"Command: `python {shlex.join(['bench/diffusion_ct.py', *sys.argv[1:]])}`",
        f"Device: {dev} ({platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}). "
        f"Total wall time {minutes:.1f} min. Test set: {n_test} held-out patients, {args.size}² slices, one slice per "
        f"patient and protocol; built-in data format {FORMAT_VERSION} (protocols from one raw acquisition).", "",
        "Training budget per model (fixed optimiser steps):", "", *[f"- {k}: {v}" for k, v in budget.items()],
    ]  # fmt: skip
    if n_pool is not None:
        lines.append(f"- training pool: {n_pool} training pairs from {args.train_pool} generated patients minus the "
                     "base split's validation and test patients (`--train-pool`)")  # fmt: skip
    lines += [
        f"- Gaussian sigma per protocol, tuned on validation (MSE): {ev['gaussian_sigmas']}",
        f"- linear filter: one least-squares transfer function per protocol ({', '.join(ev['linear_filters']) or 'none'}), "
        "fitted in closed form on the training pairs (whole slices, HU window); no training steps", "",
        f"Stage-1 ceiling `decode(encode(standard))` vs standard: PSNR {ceil['psnr']:.2f} dB, SSIM {ceil['ssim']:.4f}, "
        f"noise SD {ceil['noise_sd']:.1f} HU, edge {ceil['edge_sharpness']:.3f}.",
    ]  # fmt: skip
    if rep:
        lines.append(f"Standard repeat scan vs standard (test-retest): PSNR {rep['psnr']:.2f} dB, noise SD "
                     f"{rep['noise_sd']:.1f} HU, edge {rep['edge_sharpness']:.3f}, texture CCC {rep['texture_ccc']:.3f}.")  # fmt: skip
    lines += ["", f"Sampler sweep (rows 'sweep ...'): conditional model with residual decoding, protocol "
              f"{ev['sweep_protocol']} only, its test slices in one batch; time s = per protocol (methods) or for the "
              "whole sweep batch.", "", "PSNR/SSIM on [-1000, 1000] HU, PSNR soft on the soft-tissue window [-160, 240] "
              "HU; noise SD in an eroded liver ROI (HU); edge = peak LSF slope of the body outline (1/px); CCC = median "
              f"over texture features across test patients ({n_test} patients).", "",
              f"## mean over the {len(results)} protocols", "", *markdown_rows(mean_over_protocols(results)), ""]  # fmt: skip
    for proto, res in results.items():
        per = {n: f"{ev['timing'].get(n, 0.0) / (1 if n.startswith('sweep') else len(results)):.1f}" for n in res}
        lines += [f"## {proto}", "", *markdown_rows(res, extra={"time s": per}), ""]
    if ev["seed_variability"]:
        lines += [f"## seed-to-seed variability ({CONDITIONAL_ROW}, seeds 0-{args.seed_repeats - 1})", "",
                  "| protocol | SD of mean PSNR across seeds dB | mean per-pixel SD across seeds in the body HU |",
                  "|---|---|---|", *[f"| {p} | {v['psnr_sd']:.3f} | {v['pixel_sd']:.1f} |"
                                     for p, v in sorted(ev["seed_variability"].items())], ""]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    import lightning as L

    from medfusion.data.manifest import load_manifest

    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    manifest, train_manifest = build_data(args, out)
    models, sup, budget = build_models(args, out, dev, train_manifest)
    ev = evaluate(args, manifest, train_manifest, models, sup, dev)
    n_pool = len(load_manifest(train_manifest).split("training")) if args.train_pool else None
    text = report(args, ev, budget, dev, (time.perf_counter() - t_start) / 60, n_pool)
    print(text)
    keep = {k: ev[k] for k in ("results", "ceiling", "repeat", "seed_variability")}
    (out / "results.json").write_text(json.dumps({"budget": budget, **keep}, indent=1))
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text + "\n")
    if args.eval_manifest:
        summary = evaluate_with_tool(args, out)
        print(f"medfusion evaluate ({args.eval_split} split of {args.eval_manifest}): {out / 'evaluation' / 'report.md'}")
        for name, m in summary["methods"].items():
            d = m["vs_identity"]["psnr_body"]
            print(f"  {name}: PSNR body vs identity {d['mean']:+.2f} dB [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]")


if __name__ == "__main__":
    main()

"""Benchmark: DiffusionCT standardization on held-out patients of the built-in dataset (issue 5).

Per non-standard protocol, against the standard-protocol scan of the same anatomy: PSNR / SSIM ([-1000, 1000] HU),
noise SD (HU, eroded liver ROI), edge sharpness (body outline, 1/pixel) and median texture-feature CCC across test
patients, for

* identity (raw input) and the standard repeat scan (test-retest ceiling of the CCC);
* a Gaussian filter whose sigma is tuned per protocol on the validation patients (PSNR);
* a supervised residual U-Net (MONAI ``UNet``, similar size) trained on the same pairs;
* DiffusionCT stage-1 passthrough ``decode(encode(source))`` and its ceiling ``decode(encode(standard))``;
* DiffusionCT conditional (residual target, v-prediction) and translate (SDEdit) modes, each decoded the paper's way
  (``D(z_hat)``) and with residual decoding (``x + D(z_hat) - D(E(x))``, ``DiffusionCT(decode=...)``);
* sampler steps vs quality for the conditional model (DDPM 1000, DDIM 50, DPM-Solver++ 10 / 20).

Every model trains for a fixed number of optimiser steps (``--ae-steps``, ``--dm-steps``, ``--unet-steps``), so the
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

import numpy as np
import torch


class ResidualUNet(torch.nn.Module):
    """x + g * UNet(x) with the gate g = 0 at start (ReZero), so training starts from the identity."""

    def __init__(self) -> None:
        from monai.networks.nets import UNet

        super().__init__()
        self.unet = UNet(2, 1, 1, channels=(32, 64, 128), strides=(2, 2), num_res_units=1)
        self.gate = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gate * self.unet(x)


def _train_unet(dm, minutes: float, max_steps: int, device) -> tuple[torch.nn.Module, int]:
    from medfusion import keys

    torch.manual_seed(0)
    net = ResidualUNet().to(device)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    t_end, steps = time.perf_counter() + 60 * minutes, 0
    while steps < max_steps and time.perf_counter() < t_end:
        for batch in dm.train_dataloader():
            x, y = batch[keys.SOURCE].to(device), batch[keys.TARGET].to(device)
            loss = torch.nn.functional.l1_loss(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            steps += 1
            if steps >= max_steps or time.perf_counter() >= t_end:
                break
    net.eval()
    return net, steps


def _pool_manifest(pool: Path, base: Path) -> Path:
    """A standardize manifest over the pool's cases: training = every pool case outside the base split's validation
    and test patients (case content depends only on (seed, index), so case_i is the same phantom in both), validation
    and test = the base split's patients. Written next to the pool's manifest."""
    doc = json.loads(pool.read_text())
    ref = json.loads(base.read_text())
    held = {s: {e["case_id"] for e in ref[s]} for s in ("validation", "test")}
    every = [e for s in ("training", "validation", "test") for e in doc[s]]
    doc["training"] = [e for e in every if e["case_id"] not in held["validation"] | held["test"]]
    for s in ("validation", "test"):
        doc[s] = [e for e in every if e["case_id"] in held[s]]
        if len(doc[s]) != len(ref[s]):
            raise ValueError(f"{pool}: the pool lacks some {s} cases of {base}")
    doc["numTraining"], doc["numValidation"], doc["numTest"] = (
        len(doc[s]) for s in ("training", "validation", "test")
    )
    from medfusion.io.atomic import write_text_atomic

    return write_text_atomic(pool.parent / "standardize_pool.json", json.dumps(doc, indent=1), overwrite=True)


LINEAR_ROW = "linear filter (least squares on training pairs)"


def fit_linear_filter(pairs: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Least-squares shift-invariant filter source -> target: ``H(f) = sum S L* / sum |L|^2`` over training pairs.

    The classical image-domain answer to kernel (and noise) conversion: one transfer function per protocol, as in
    filtering-based CT kernel conversion (a filter per kernel pair, usually derived from measured MTFs), here fitted
    on the training pairs in the HU window. It is the best linear shift-invariant map in the MSE sense, so
    a learned model that does not beat it has learned nothing a filter could not do.
    """
    num = den = 0.0
    for src, ref in pairs:
        spec = np.fft.fft2(np.clip(src, -1000, 1000))
        num = num + np.fft.fft2(np.clip(ref, -1000, 1000)) * np.conj(spec)
        den = den + np.abs(spec) ** 2
    return num / np.maximum(den, 1e-12)


def apply_linear_filter(src: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Apply :func:`fit_linear_filter`'s ``H`` to one slice (any trailing singleton axes are kept)."""
    x = np.clip(np.squeeze(src), -1000, 1000)
    return np.real(np.fft.ifft2(np.fft.fft2(x) * h)).reshape(src.shape).astype(src.dtype)


def main() -> None:
    import lightning as L
    from scipy.ndimage import gaussian_filter

    from medfusion.apps.demo import _load_test_entries, _trainer, image_metrics, texture_ccc
    from medfusion.apps.volume_job import apply_to_array
    from medfusion.data.builtin import FORMAT_VERSION, REPEAT, make_dataset
    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.io.nifti import read_nifti
    from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
    from medfusion.models.export import export_model

    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--results", default=None)
    p.add_argument("--minutes", type=float, default=60.0, help="safety wall-clock cap per trained model")
    p.add_argument(
        "--patients", type=int, default=80, help="80 gives 12 test patients (texture CCC needs >= 12)"
    )
    p.add_argument(
        "--train-pool", type=int, default=0,
        help="train every model on cases 0..N-1 of the same-seed dataset minus the base split's validation and test "
        "patients (test set unchanged; 0 = the base split's training patients only)",
    )  # fmt: skip
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--crop", type=int, default=64)
    p.add_argument("--ae-steps", type=int, default=3000)
    p.add_argument("--dm-steps", type=int, default=4000)
    p.add_argument("--unet-steps", type=int, default=3000)
    p.add_argument("--latent-channels", type=int, default=16)
    p.add_argument(
        "--ae-channels", type=int, nargs="+", default=[32, 64, 64],
        help="stage-1 channels per level (len - 1 downsamplings: 32 64 = factor-2 latent)",
    )  # fmt: skip
    p.add_argument(
        "--modes", nargs="+", default=["conditional", "translate"], choices=["conditional", "translate"],
        help="stage-2 modes to train and score",
    )  # fmt: skip
    p.add_argument(
        "--ae-skip-from", type=int, default=2,
        help="skip-connected encoder-decoder, skips from this level (2 = none with 3 levels); -1 = MONAI AutoencoderKL",
    )  # fmt: skip
    p.add_argument(
        "--ae-cross", action="store_true", help="stage 1 trained with cross skips (cross_skips=True)"
    )
    p.add_argument(
        "--ae-shortcuts", action="store_true", help="stage 1 with DC-AE residual shortcuts (shortcuts=True)"
    )
    p.add_argument(
        "--skip-dropout", type=float, default=0.0, help="stage 1 skip dropout (DiffusionCTAutoencoder)"
    )
    p.add_argument(
        "--unet-from", default=None, help="reuse unet.safetensors from this folder (same data and seed)"
    )
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument(
        "--workers", type=int, default=0,
        help="dataloader workers for training (persistent across epochs); on a GPU the crops of the main process bound the step",
    )  # fmt: skip
    p.add_argument(
        "--reuse", action="store_true",
        help="load the models a previous run saved in --out (stage1/, stage2_*/, unet.safetensors) instead of training",
    )  # fmt: skip
    p.add_argument("--dm-lr", type=float, default=2e-4, help="stage-2 AdamW learning rate (cosine schedule)")
    p.add_argument("--dm-batch", type=int, default=8, help="stage-2 batch size (crops per step)")
    p.add_argument(
        "--min-snr-gamma", type=float, default=None, help="stage-2 Min-SNR loss weighting (Hang et al. 2023)"
    )
    p.add_argument(
        "--regression", action="store_true",
        help="stage 2 with the CorrDiff regression U-Net (DiffusionCT(regression=True)); adds 'mean only' rows",
    )  # fmt: skip
    p.add_argument("--regression-channels", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--regression-lr", type=float, default=None, help="DiffusionCT(regression_lr=...)")
    p.add_argument(
        "--regression-rescale-step", type=int, default=None, help="DiffusionCT(regression_rescale_step=...)"
    )
    p.add_argument("--pixel-shuffle", type=int, default=0, help="DiffusionCT(pixel_shuffle=k)")
    p.add_argument("--dm-channels", type=int, nargs="+", default=[64, 128], help="stage-2 denoiser widths")
    p.add_argument(
        "--dm-attention", type=int, nargs="+", default=[0, 1], help="stage-2 self-attention per level (0/1)"
    )
    p.add_argument("--translate-strengths", type=float, nargs="*", default=[0.1, 0.3])
    p.add_argument(
        "--residual-sigmas", type=float, nargs="*", default=[1.0],
        help="extra rows: residual decoding keeping only the Gaussian low-pass (px) of the autoencoder's error",
    )  # fmt: skip
    p.add_argument("--skip-ddpm1000", action="store_true")
    p.add_argument("--sweep-protocol", default="sharp_low_dose", help="protocol of the sampler-steps sweep")
    p.add_argument(
        "--seed-repeats",
        type=int,
        default=3,
        help="sampler seeds for the seed-to-seed variability table (1: off)",
    )
    args = p.parse_args()
    if "conditional" not in args.modes:
        p.error("--modes must include conditional (the sampler sweep and passthrough rows use it)")
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    t_start = time.perf_counter()
    L.seed_everything(0, verbose=False)
    manifest = Path(
        make_dataset(out / "data", n_patients=args.patients, dim=2, size=args.size, seed=0, progress=False)[
            "standardize"
        ]
    )
    train_manifest = manifest
    if args.train_pool:
        if args.train_pool <= args.patients:
            p.error("--train-pool must be larger than --patients")
        pool = make_dataset(
            out / "data_pool", n_patients=args.train_pool, dim=2, size=args.size, seed=0, progress=False
        )
        train_manifest = _pool_manifest(Path(pool["standardize"]), manifest)
    dm = lambda bs: ManifestDataModule(  # noqa: E731
        str(train_manifest), task="standardize", spatial_dims=2, roi_size=[args.crop] * 2, batch_size=bs, cache="memory", seed=0,
        num_workers=args.workers, persistent_workers=args.workers > 0,
    )  # fmt: skip
    budget: dict[str, str] = {}

    # --- models --------------------------------------------------------------------------------------------
    from safetensors.torch import load_file, save_file

    from medfusion.models.export import load_model

    prev = json.loads((out / "results.json").read_text())["budget"] if (out / "results.json").exists() else {}
    t0 = time.perf_counter()
    skip = args.ae_skip_from >= 0
    if args.reuse and (out / "stage1").exists():
        budget["stage 1 AE"] = prev.get("stage 1 AE", "reused")
    else:
        ae = DiffusionCTAutoencoder(
            spatial_dims=2, channels=tuple(args.ae_channels), latent_channels=args.latent_channels, kl_weight=1e-6, lr=1e-3,
            skip_connections=skip, skip_from_level=max(args.ae_skip_from, 0), cross_skips=args.ae_cross, skip_dropout=args.skip_dropout,
            shortcuts=args.ae_shortcuts,
        )  # fmt: skip
        d1 = dm(2)
        tr = _trainer(args.ae_steps, args.minutes, dev, out, True)
        tr.fit(ae, datamodule=d1)
        ae.calibrate_latent_scale(d1.train_dataloader(), max_batches=50)
        export_model(ae.cpu(), out / "stage1", overwrite=True)
        budget["stage 1 AE"] = (
            f"{tr.global_step} steps, bs 4 images ({args.crop}² crops), {args.latent_channels} latent channels, "
            f"{'skips from level ' + str(args.ae_skip_from) if skip else 'AutoencoderKL'}"
            f"{', cross skips' if args.ae_cross else ''}{', DC-AE shortcuts' if args.ae_shortcuts else ''}"
            f"{f', skip dropout {args.skip_dropout:g}' if args.skip_dropout else ''}, {time.perf_counter() - t0:.0f} s"
        )

    models = {}
    for mode in args.modes:
        t0 = time.perf_counter()
        if args.reuse and (out / f"stage2_{mode}").exists():
            models[mode] = load_model(out / f"stage2_{mode}").to(dev).eval()
            budget[f"stage 2 {mode}"] = prev.get(f"stage 2 {mode}", "reused")
            continue
        m = DiffusionCT(
            autoencoder=str(out / "stage1"), mode=mode, channels=tuple(args.dm_channels), attention_levels=tuple(map(bool, args.dm_attention)),
            pixel_shuffle=args.pixel_shuffle, regression_lr=args.regression_lr,
            regression_rescale_step=args.regression_rescale_step if args.regression and mode == "conditional" else None,
            prediction="v", residual=True, num_inference_steps=10, min_snr_gamma=args.min_snr_gamma, translate_strength=0.3, lr=args.dm_lr, ema_decay=0.995,
            regression=args.regression and mode == "conditional", regression_channels=tuple(args.regression_channels),
        )  # fmt: skip
        tr = _trainer(args.dm_steps, args.minutes, dev, out, True)
        tr.fit(m, datamodule=dm(args.dm_batch))
        export_model(m.cpu(), out / f"stage2_{mode}", overwrite=True)
        models[mode] = m.to(dev).eval()
        budget[f"stage 2 {mode}"] = (
            f"{tr.global_step} steps, bs {args.dm_batch}, denoiser {tuple(args.dm_channels)} attention {tuple(args.dm_attention)}"
            f"{f', pixel shuffle {args.pixel_shuffle}' if args.pixel_shuffle else ''}"
            f"{f', regression lr {args.regression_lr:g}' if args.regression_lr else ''}"
            f"{f', DDPM target rescaled at step {args.regression_rescale_step}' if args.regression_rescale_step is not None else ''}"
            f"{f', regression U-Net {tuple(args.regression_channels)}' if args.regression and mode == 'conditional' else ''}"
            f"{f', Min-SNR gamma {args.min_snr_gamma:g}' if args.min_snr_gamma else ''}, lr {args.dm_lr:g}, "
            f"{time.perf_counter() - t0:.0f} s"
        )
    t0 = time.perf_counter()
    unet_file = Path(args.unet_from or out) / "unet.safetensors"
    if (args.reuse or args.unet_from) and unet_file.exists():
        unet = ResidualUNet().to(dev).eval()
        unet.load_state_dict(load_file(str(unet_file)))
        budget["supervised U-Net"] = prev.get("supervised U-Net", "reused")
    else:
        unet, unet_steps = _train_unet(dm(8), args.minutes, args.unet_steps, dev)
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(out / "unet.safetensors"))
        budget["supervised U-Net"] = f"{unet_steps} steps, bs 8, {time.perf_counter() - t0:.0f} s"
    ae = models["conditional"].autoencoder
    div = models["conditional"].divisible_by

    def run(arr, fn):
        return apply_to_array(arr, fn, spatial_dims=2, divisible_by=div, device=dev, batch_size=32)

    def seeded(mode, seed=0, **kw):
        def fn(x):
            return models[mode].standardize(x, generator=torch.Generator().manual_seed(seed), **kw)

        return fn

    # --- Gaussian sigma tuned on validation ----------------------------------------------------------------
    from medfusion.data.manifest import load_manifest

    sigmas = (0.0, 0.5, 0.75, 1.0, 1.5, 2.0)
    best_sigma: dict[str, float] = {}
    val: dict[str, list] = {}
    for e in load_manifest(manifest).split("validation"):
        src = read_nifti(e["source"]).array
        ref = read_nifti(e["target"]).array
        val.setdefault(e["protocol"], []).append((src, ref))
    for proto, pairs in val.items():
        scores = [np.mean([-np.mean((gaussian_filter(s, sg) - r) ** 2) for s, r in pairs]) for sg in sigmas]
        best_sigma[proto] = sigmas[int(np.argmax(scores))]

    # --- linear shift-invariant filter per protocol, fitted on the training pairs (same-size slices only) -----
    train_pairs: dict[str, list] = {}
    for e in load_manifest(train_manifest).split("training"):
        train_pairs.setdefault(e["protocol"], []).append(
            (np.squeeze(read_nifti(e["source"]).array), np.squeeze(read_nifti(e["target"]).array))
        )
    filters = {
        proto: fit_linear_filter(pairs)
        for proto, pairs in train_pairs.items()
        if len({a.shape for pair in pairs for a in pair}) == 1 and pairs[0][0].ndim == 2
    }

    # --- evaluation ----------------------------------------------------------------------------------------
    entries = _load_test_entries(manifest)
    methods = {
        "identity": lambda s, p: s,
        "gaussian (val-tuned)": lambda s, p: gaussian_filter(s, best_sigma.get(p, 0.0)),
        **({LINEAR_ROW: lambda s, p: apply_linear_filter(s, filters[p])} if filters else {}),
        "supervised U-Net": lambda s, p: run(s, unet),
        "stage-1 passthrough": lambda s, p: run(s, ae.reconstruct),
        "DiffusionCT conditional (DPM++ 10), D(z)": lambda s, p: run(s, seeded("conditional")),
        "DiffusionCT conditional (DPM++ 10), residual decoding": lambda s, p: run(
            s, seeded("conditional", decode="residual")
        ),
        **(
            {
                "DiffusionCT regression mean only (no DDPM), D(z)": lambda s, p: run(
                    s, seeded("conditional", mean_only=True)
                ),
                "DiffusionCT regression mean only (no DDPM), residual decoding": lambda s, p: run(
                    s, seeded("conditional", mean_only=True, decode="residual")
                ),
            }
            if args.regression
            else {}
        ),
        **{
            f"DiffusionCT conditional (DPM++ 10), residual decoding, low-pass {sg:g} px": (
                lambda s, p, sg=sg: run(s, seeded("conditional", decode="residual", residual_sigma=sg))
            )
            for sg in args.residual_sigmas
        },
        **{
            f"DiffusionCT translate (s={st:g}, DPM++ 10), {dec}": (
                lambda s, p, st=st, dec=dec: run(
                    s, seeded("translate", strength=st, decode="latent" if dec == "D(z)" else "residual")
                )
            )
            for st in (args.translate_strengths if "translate" in args.modes else [])
            for dec in ("D(z)", "residual decoding")
        },
    }
    sweep = {
        "DDIM 50": dict(sampler="ddim", num_steps=50),
        "DPM++ 10": dict(sampler="dpmpp_2m", num_steps=10),
        "DPM++ 20": dict(sampler="dpmpp_2m", num_steps=20),
    }
    if not args.skip_ddpm1000:
        sweep = {"DDPM 1000": dict(sampler="ddpm", num_steps=1000), **sweep}
    per: dict[str, dict[str, list]] = {}
    timing: dict[str, float] = {}
    with torch.no_grad():
        for e in entries:
            src = np.asarray(read_nifti(e["source"]).array, dtype=np.float32)
            ref = np.asarray(read_nifti(e["target"]).array, dtype=np.float32)
            lab = np.asarray(read_nifti(e["label"]).array)
            d = per.setdefault(e["protocol"], {"ref": [], "label": [], "src": []})
            d["ref"].append(ref)
            d["label"].append(lab)
            for name, fn in methods.items():
                t0 = time.perf_counter()
                d.setdefault(name, []).append(fn(src, e["protocol"]))
                timing[name] = timing.get(name, 0.0) + time.perf_counter() - t0
    # seed-to-seed variability of the main sample row (seeds 0, 1, 2): SD of the protocol's mean PSNR, and the mean
    # per-pixel SD across seeds inside the body (HU): how much of the output the sampler's noise decides
    seed_row = "DiffusionCT conditional (DPM++ 10), residual decoding"
    seed_var: dict[str, dict[str, float]] = {}
    if args.seed_repeats > 1:
        with torch.no_grad():
            for proto, d in per.items():
                srcs_p = [
                    np.asarray(read_nifti(e["source"]).array, dtype=np.float32)
                    for e in entries
                    if e["protocol"] == proto
                ]
                runs = [d[seed_row]] + [
                    [run(s_, seeded("conditional", seed=k, decode="residual")) for s_ in srcs_p]
                    for k in range(1, args.seed_repeats)
                ]
                psnrs = [
                    np.mean(
                        [image_metrics(x, r, lab)["psnr"] for x, r, lab in zip(imgs, d["ref"], d["label"])]
                    )
                    for imgs in runs
                ]
                pix = [
                    float(np.std(np.stack([r_[i] for r_ in runs]), axis=0)[d["label"][i] > 0].mean())
                    for i in range(len(srcs_p))
                ]
                seed_var[proto] = {"psnr_sd": float(np.std(psnrs, ddof=1)), "pixel_sd": float(np.mean(pix))}

    # sampler sweep on one hard protocol, all its test slices in one batch
    from medfusion.data.pipelines import hu_to_unit, unit_to_hu

    sweep_proto = args.sweep_protocol if args.sweep_protocol in per else sorted(per)[0]
    d = per[sweep_proto]
    srcs = [
        np.asarray(read_nifti(e["source"]).array, dtype=np.float32)
        for e in entries
        if e["protocol"] == sweep_proto
    ]
    x = (
        torch.from_numpy(np.stack([hu_to_unit(s_, (-1000.0, 1000.0)) for s_ in srcs])[:, None])
        .float()
        .to(dev)
    )
    for name, kw in sweep.items():
        t0 = time.perf_counter()
        y = (
            models["conditional"]
            .standardize(x, generator=torch.Generator().manual_seed(0), decode="residual", **kw)
            .cpu()
            .numpy()[:, 0]
        )
        timing["sweep " + name] = time.perf_counter() - t0
        outs = [np.asarray(unit_to_hu(v, (-1000.0, 1000.0)), dtype=np.float32) for v in y]
        for o, s_ in zip(outs, srcs):  # same out-of-window pass-through as apply_to_array
            o[(s_ < -1000) | (s_ > 1000)] = s_[(s_ < -1000) | (s_ > 1000)]
        d["sweep " + name] = outs
    ceiling, repeat = [], {}
    for e in {e["case_id"]: e for e in entries}.values():
        ref = np.asarray(read_nifti(e["target"]).array, dtype=np.float32)
        lab = np.asarray(read_nifti(e["label"]).array)
        ceiling.append(image_metrics(run(ref, ae.reconstruct), ref, lab))
        rep_path = Path(e["target"]).with_name(f"{REPEAT}.nii.gz")
        if rep_path.exists():
            repeat.setdefault("img", []).append(np.asarray(read_nifti(rep_path).array, dtype=np.float32))
            repeat.setdefault("ref", []).append(ref)
            repeat.setdefault("label", []).append(lab)

    def summarize(imgs, refs, labs):
        rows = [image_metrics(x, r, lab) for x, r, lab in zip(imgs, refs, labs)]
        res = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
        res["texture_ccc"] = texture_ccc(imgs, refs, labs)
        return res

    results = {
        proto: {
            name: summarize(d[name], d["ref"], d["label"])
            for name in d
            if name not in ("ref", "label", "src")
        }
        for proto, d in sorted(per.items())
    }
    rep = summarize(repeat["img"], repeat["ref"], repeat["label"]) if repeat else None
    ceil = {k: float(np.mean([c[k] for c in ceiling])) for k in ceiling[0]}
    n_test = len({e["case_id"] for e in entries})
    total_min = (time.perf_counter() - t_start) / 60

    # --- report --------------------------------------------------------------------------------------------
    cpu = platform.processor() or platform.machine()
    lines = [
        "# DiffusionCT benchmark (built-in 2D phantoms)",
        "",
        f"Command: `python {shlex.join(['bench/diffusion_ct.py', *sys.argv[1:]])}`",
        f"Device: {dev} ({cpu}, torch threads {torch.get_num_threads()}). Total wall time {total_min:.1f} min. "
        f"Test set: {n_test} held-out patients, {args.size}² slices, one slice per patient and protocol; built-in "
        f"data format {FORMAT_VERSION} (protocols from one raw acquisition).",
        "",
        "Training budget per model (fixed optimiser steps):",
        "",
        *[f"- {k}: {v}" for k, v in budget.items()],
        *(
            [
                f"- training pool: {len(load_manifest(train_manifest).split('training'))} training pairs from "
                f"{args.train_pool} generated patients minus the base split's validation and test patients (`--train-pool`)"
            ]
            if args.train_pool
            else []
        ),  # fmt: skip
        f"- Gaussian sigma per protocol, tuned on validation (MSE): {best_sigma}",
        f"- linear filter: one least-squares transfer function per protocol ({', '.join(sorted(filters)) or 'none'}), "
        "fitted in closed form on the training pairs (whole slices, HU window); no training steps",
        "",
        f"Stage-1 ceiling `decode(encode(standard))` vs standard: PSNR {ceil['psnr']:.2f} dB, SSIM {ceil['ssim']:.4f}, "
        f"noise SD {ceil['noise_sd']:.1f} HU, edge {ceil['edge_sharpness']:.3f}.",
    ]
    if rep:
        lines.append(
            f"Standard repeat scan vs standard (test-retest): PSNR {rep['psnr']:.2f} dB, noise SD {rep['noise_sd']:.1f} "
            f"HU, edge {rep['edge_sharpness']:.3f}, texture CCC {rep['texture_ccc']:.3f}."
        )
    lines += ["", f"Sampler sweep (rows 'sweep ...'): conditional model with residual decoding, protocol {sweep_proto} only, its test slices in one batch; "
              "time s = per protocol (methods) or for the whole sweep batch.",
              "", "PSNR/SSIM on [-1000, 1000] HU, PSNR soft on the soft-tissue window [-160, 240] HU; noise SD in an eroded liver ROI (HU); edge = peak LSF slope of the "
              "body outline (1/px); CCC = median over texture features across test patients "
              f"({n_test} patients).", ""]  # fmt: skip
    names = [n for n in next(iter(results.values())) if all(n in r for r in results.values())]
    lines += [f"## mean over the {len(results)} protocols", "",
              "| method | PSNR dB | PSNR soft dB | SSIM | noise SD HU | edge | texture CCC |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in names:
        m = {
            k: float(np.mean([r[name][k] for r in results.values()]))
            for k in results[next(iter(results))][name]
        }
        lines.append(
            f"| {name} | {m['psnr']:.2f} | {m['psnr_soft']:.2f} | {m['ssim']:.4f} | {m['noise_sd']:.1f} | "
            f"{m['edge_sharpness']:.3f} | {m['texture_ccc']:.2f} |"
        )
    lines.append("")
    for proto, res in results.items():
        lines += [f"## {proto}", "", "| method | PSNR dB | PSNR soft dB | SSIM | noise SD HU | edge | texture CCC | time s |",
                  "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for name, v in res.items():
            lines.append(
                f"| {name} | {v['psnr']:.2f} | {v['psnr_soft']:.2f} | {v['ssim']:.4f} | {v['noise_sd']:.1f} | "
                f"{v['edge_sharpness']:.3f} | {v['texture_ccc']:.3f} | "
                f"{timing.get(name, 0.0) / (1 if name.startswith('sweep') else len(results)):.1f} |"
            )
        lines.append("")
    if seed_var:
        lines += [f"## seed-to-seed variability ({seed_row}, seeds 0-{args.seed_repeats - 1})", "",
                  "| protocol | SD of mean PSNR across seeds dB | mean per-pixel SD across seeds in the body HU |",
                  "|---|---|---|"]  # fmt: skip
        lines += [
            f"| {p_} | {v['psnr_sd']:.3f} | {v['pixel_sd']:.1f} |" for p_, v in sorted(seed_var.items())
        ]
        lines.append("")
    text = "\n".join(lines)
    print(text)
    (out / "results.json").write_text(
        json.dumps(
            {
                "budget": budget,
                "results": results,
                "ceiling": ceil,
                "repeat": rep,
                "seed_variability": seed_var,
            },
            indent=1,
        )
    )
    if args.results:
        Path(args.results).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results).write_text(text + "\n")


if __name__ == "__main__":
    main()

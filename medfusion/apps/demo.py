"""``medfusion demo``: the main job end to end on the built-in data.

1. write the built-in phantom dataset (``medfusion.data.builtin.make_dataset``; 2D, 128² by default);
2. train DiffusionCT stage 1 (autoencoder on every protocol) and stage 2 (conditional latent DDPM, stage 1 frozen)
   with a Lightning ``Trainer``, sized for about 10 minutes on 2 CPU cores (step counts plus a wall-clock guard per
   stage; larger automatically when CUDA is available). The default stage 1 is the encoder-decoder with no decoder
   skip (with skips the latent diffusion was inert), DC-AE residual shortcuts and the lossless 16-channel f = 4
   latent; stage 2 runs its denoiser on the image grid (``pixel_shuffle=2``) beside the CorrDiff-style regression
   U-Net at its own rate (``regression_lr``); the exported model decodes with residual decoding,
   ``x + D(z_hat) - D(E(x))``, which kept 0.6 dB over the paper's ``D(z_hat)`` on 12 test patients (measurements:
   bench/results/diffusion_ct_bench_regression.md and bench/results/diffusion_ct.md, "Session 5" and "Session 6");
3. standardize the held-out test patients (every non-standard protocol) and write NIfTI outputs;
4. score them against the standard scan of the same anatomy: PSNR / SSIM on the [-1000, 1000] HU window, noise SD
   in an eroded liver/soft-tissue ROI, edge sharpness of the body outline, and the CCC of texture features
   across test patients, for identity (the raw input), the stage-1 passthrough ``decode(encode(source))`` (the
   ablation the feasibility study asks for: most of a gain can come from the autoencoder alone), DiffusionCT and
   DiffusionCT decoded the paper's way, ``D(z_hat)`` (``diffusion_ct_latent``), and the regression's posterior
   mean without the DDPM (``diffusion_ct_mean``, ``standardize(mean_only=True)``: best PSNR, not a sample);
5. write ``metrics.json``, ``figure.png`` (source / standardized / reference / difference per protocol) and print
   a table.

``--quick`` runs the same pipeline at toy size (a few seconds; used by the tests): its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

DISPLAY_WINDOW = (-160.0, 240.0)  # soft-tissue window (W400 / L40) for the figure
METRIC_WINDOW = (-1000.0, 1000.0)
SOFT_TISSUE_WINDOW = (-160.0, 240.0)  # W 400 / L 40 HU: where kernel and dose differences are read


@dataclass
class DemoBudget:
    """Sizes and training budget of one demo run (recorded in ``metrics.json``)."""

    size: int = 128
    n_patients: int = 24
    crop: int = (
        64  # training crops (the data pipeline crops to the body, so sizes vary; inference: whole slices)
    )
    ae_channels: tuple[int, ...] = (32, 64, 64)
    # stage 1 (measured, bench/results/diffusion_ct.md, sessions 3-5): the encoder-decoder with no skip at all
    # (skip_from_level = len(ae_channels) - 1), so that the protocol's texture has to pass the latent and the diffusion
    # in it is not inert (with decoder skips it was: <= 0.02 dB from the passthrough), with DC-AE residual shortcuts
    # and the lossless 16-channel f = 4 latent (ceiling 46.5 dB at 3,000 CPU steps, 45.7 in this demo)
    latent_channels: int = 16
    ae_groups: int = 32
    ae_skip: bool = True  # our U-Net-style encoder-decoder (False: MONAI AutoencoderKL)
    ae_skip_from: int = 2  # first encoder level feeding the decoder; len(ae_channels) - 1 = no skip
    ae_shortcuts: bool = True  # DC-AE residual shortcuts (needs ae_skip: our network)
    ae_lr: float = 1e-3
    ae_ssim_weight: float = 0.2
    ae_steps: int = 2200  # optimizer steps matter more than batch size for the AE ceiling (feasibility run)
    ae_batch: int = 2  # source/target pairs per step (2x images)
    ae_minutes: float = 3.5
    # stage 2 (sessions 5-6, bench/results/diffusion_ct.md): the paper's conditional latent DDPM with the denoiser on
    # the image grid (pixel_shuffle = 2: the 16-channel latent rearranged to 1 channel at f = 1; the diffusion stays in
    # the latent). 12 test patients, 4,000 steps: mean PSNR 39.01 dB with residual decoding (identity 37.93; on the
    # latent grid 35.7), texture CCC 0.47 (identity 0.19). Plus the CorrDiff-style regression U-Net
    # (regression=True) at its own rate: a plain regression tolerates a much higher rate than the DDPM, and at this
    # demo's 1,800 x 4 steps (session 6 probe, same data and stage 1) the mean PSNR was 36.86 dB without it, 37.36
    # with regression_lr 1e-3, 37.65 with 3e-3 and 37.13 with 6e-3 (identity 37.33), at ~5% more time per step.
    # More steps remain the lever (the GPU budget below).
    unet_channels: tuple[int, ...] = (32, 64, 128)
    unet_attention: tuple[bool, ...] = (False, False, True)
    unet_groups: int = 32
    head_channels: int = 32
    regression: bool = True
    regression_channels: tuple[int, ...] = (32, 64, 128)
    regression_lr: float | None = 3e-3
    pixel_shuffle: int = 2  # needs latent_channels divisible by 4^k (2D)
    dm_steps: int = 1800  # cosine decay length; the minutes guard stops earlier on a slower machine
    dm_batch: int = 4
    dm_minutes: float = 5.5
    dm_lr: float = 2e-4  # the DDPM's AdamW rate (1e-3 was worse at this budget: 36.43 vs 36.86 dB, session 6)
    dm_ema_decay: float = 0.995
    crop_foreground: bool = True  # body-cropped training crops (False, i.e. crops with air as inference sees: 34.4 dB ceiling vs 38.0)
    sample_steps: int = 10
    sampler: str = "dpmpp_2m"
    # how the exported model decodes: x + D(z_hat) - D(E(x)) (DiffusionCT module docstring; residual_sigma 0: the full
    # residual, 39.14 dB vs 38.92 with the 1-px low-pass in session 5's bench); "latent" (the paper's D(z_hat)) is
    # scored beside it as the ablation
    decode: str = "residual"
    residual_sigma: float = 0.0
    # training dataloader workers (persistent across epochs). 0 on CPU (the crops cost little beside the model there).
    # On a GPU the main process's crops bound the step: session 7's H200 trained stage 2 (crop 64, batch 32) at 5.5
    # steps/s with 0 workers, ~180 ms a step of which the crops were a large share (bench/results/gpu_h200.md)
    workers: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def budget_for(quick: bool, cuda: bool) -> DemoBudget:
    """Quick (toy, seconds), CPU (about 10 minutes on 2 cores) or CUDA (bigger: more steps, whole slices)."""
    if quick:
        return DemoBudget(
            size=32, n_patients=6, crop=16, ae_channels=(8, 16), latent_channels=4, ae_groups=4, ae_skip_from=1, ae_steps=2,
            ae_batch=2, ae_minutes=1.0, unet_channels=(16, 32), unet_attention=(False, True), unet_groups=8, head_channels=8,
            regression_channels=(8, 16), pixel_shuffle=1, dm_steps=2, dm_batch=2, dm_minutes=1.0, dm_ema_decay=0.5,
            sample_steps=2,
        )  # fmt: skip
    if cuda:
        return DemoBudget(
            crop=96, ae_steps=8000, ae_batch=16, ae_minutes=4.0, unet_channels=(64, 128, 128),
            unet_attention=(False, False, True), dm_steps=6000, dm_batch=32, dm_minutes=4.0, sample_steps=20,
            workers=min(6, max(0, (os.cpu_count() or 1) - 2)),
        )  # fmt: skip
    return DemoBudget()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--output", required=True, help="demo folder (data, models, outputs, figure, metrics)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="toy sizes: runs in seconds (numbers meaningless)"
    )
    parser.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, training and sampling")
    parser.add_argument("--overwrite", action="store_true", help="reuse a non-empty output folder")


# ------------------------------------------------------------------------------------------- helpers
def _trainer(steps: int, minutes: float, device, root: Path, quick: bool):
    import lightning as L

    return L.Trainer(
        max_steps=steps, max_time={"minutes": minutes}, accelerator="gpu" if device.type == "cuda" else "cpu",
        devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=not quick, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=str(root),
        precision="bf16-mixed" if device.type == "cuda" else "32-true",
    )  # fmt: skip


def _rois(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(uniform ROI for noise SD / texture: eroded liver, else muscle / soft tissue; body mask for edges)."""
    from scipy.ndimage import binary_erosion

    from medfusion.data.phantoms import LABEL_IDS

    for name in ("liver", "muscle", "soft_tissue"):
        roi = binary_erosion(label == LABEL_IDS[name], iterations=2)
        if roi.sum() >= 16:
            return roi, label > 0
    return binary_erosion(label > 0, iterations=3), label > 0


def image_metrics(img: np.ndarray, ref: np.ndarray, label: np.ndarray) -> dict[str, float]:
    """PSNR / SSIM on the clipped [-1000, 1000] HU window, PSNR in the soft-tissue window (W 400 / L 40, clipped),
    noise SD (HU) in the uniform ROI, edge sharpness."""
    from medfusion.eval.image import edge_sharpness, noise_sd, psnr, ssim

    lo, hi = METRIC_WINDOW
    a, b = np.clip(img, lo, hi), np.clip(ref, lo, hi)
    roi, body = _rois(label)
    return {
        "psnr": psnr(a, b, data_range=hi - lo),
        "ssim": ssim(a, b, data_range=hi - lo),
        "psnr_soft": psnr(
            np.clip(img, *SOFT_TISSUE_WINDOW),
            np.clip(ref, *SOFT_TISSUE_WINDOW),
            data_range=SOFT_TISSUE_WINDOW[1] - SOFT_TISSUE_WINDOW[0],
        ),
        "noise_sd": noise_sd(img, roi),
        "edge_sharpness": edge_sharpness(img, body),
    }


def texture_ccc(images: list[np.ndarray], refs: list[np.ndarray], labels: list[np.ndarray]) -> float:
    """Median CCC over texture features between ``images`` and the standard scans (NaN with < 2 cases)."""
    from medfusion.eval.image import feature_ccc

    if len(images) < 2:
        return float("nan")
    rois = [_rois(lab)[0] for lab in labels]
    vals = [v for v in feature_ccc(images, refs, rois).values() if np.isfinite(v)]
    return float(np.median(vals)) if vals else float("nan")


def _load_test_entries(manifest: Path) -> list[dict[str, Any]]:
    """Test-split entries of a manifest with absolute paths (``medfusion.data.manifest.load_manifest``)."""
    from medfusion.data.manifest import load_manifest

    out = [dict(e) for e in load_manifest(manifest).split("test")]
    if not out:
        raise ValueError(f"{manifest}: no test entries")
    return out


def _mid(a: np.ndarray) -> np.ndarray:
    """A 2D image, or the middle slice along the last axis of a volume."""
    return a if a.ndim == 2 else a[..., a.shape[-1] // 2]


def _figure(path: Path, rows: list[tuple[str, np.ndarray, np.ndarray, np.ndarray]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from medfusion.io.atomic import atomic_path

    fig, axes = plt.subplots(len(rows), 4, figsize=(10, 2.6 * len(rows)), squeeze=False)
    for r, (proto, src, out, ref) in enumerate(rows):
        panels = [
            (_mid(src), f"{proto}: source"),
            (_mid(out), "DiffusionCT"),
            (_mid(ref), "standard (reference)"),
        ]
        for c, (img, title) in enumerate(panels):
            axes[r, c].imshow(
                img.T, cmap="gray", vmin=DISPLAY_WINDOW[0], vmax=DISPLAY_WINDOW[1], origin="lower"
            )
            axes[r, c].set_title(title, fontsize=8)
        axes[r, 3].imshow((_mid(out) - _mid(ref)).T, cmap="coolwarm", vmin=-200, vmax=200, origin="lower")
        axes[r, 3].set_title("standardized - reference (±200 HU)", fontsize=8)
        for a in axes[r]:
            a.axis("off")
    fig.tight_layout()
    with atomic_path(path, overwrite=True) as tmp:
        fig.savefig(tmp, dpi=80, format="png")
    plt.close(fig)


# ------------------------------------------------------------------------------------------- main job
def run_demo(
    output: str | Path, *, quick: bool = False, device: str = "auto", seed: int = 0, overwrite: bool = False,
    log=print, budget: DemoBudget | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Run the whole demo into ``output``; returns the metrics dict also written to ``metrics.json``.

    ``budget`` overrides :func:`budget_for` (experiments; the CLI always uses the default for the device).
    """
    import lightning as L
    import torch

    from medfusion import keys
    from medfusion.apps.volume_job import apply_to_array, resolve_device
    from medfusion.data.builtin import make_dataset
    from medfusion.data.ctsim import STANDARD
    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.io.atomic import write_text_atomic
    from medfusion.io.nifti import read_nifti, write_nifti
    from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
    from medfusion.models.export import export_model

    output = Path(output)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} exists and is not empty; refusing to overwrite it (use --overwrite)")
    dev = resolve_device(device)
    b = budget if budget is not None else budget_for(quick, dev.type == "cuda")
    timings: dict[str, float] = {}
    L.seed_everything(seed, workers=True, verbose=False)

    t0 = time.perf_counter()
    manifests = make_dataset(
        output / "data", n_patients=b.n_patients, dim=2, size=b.size, seed=seed, progress=not quick
    )
    manifest = Path(manifests["standardize"])
    timings["data_s"] = time.perf_counter() - t0
    log(f"[1/4] built-in data: {b.n_patients} patients, {b.size}x{b.size}, {timings['data_s']:.0f} s")

    def datamodule(batch: int) -> ManifestDataModule:
        return ManifestDataModule(
            str(manifest), task="standardize", spatial_dims=2, roi_size=[b.crop, b.crop], num_samples=1, batch_size=batch,
            cache="memory", seed=seed, crop_foreground=b.crop_foreground, num_workers=b.workers,
            persistent_workers=b.workers > 0,
        )  # fmt: skip

    # stage 1 ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    ae = DiffusionCTAutoencoder(
        spatial_dims=2, channels=b.ae_channels, latent_channels=b.latent_channels, norm_num_groups=b.ae_groups,
        skip_connections=b.ae_skip, skip_from_level=b.ae_skip_from,
        shortcuts=b.ae_shortcuts and b.ae_skip, ssim_weight=b.ae_ssim_weight, kl_weight=1e-6, lr=b.ae_lr,
    )  # fmt: skip
    dm1 = datamodule(b.ae_batch)
    tr1 = _trainer(b.ae_steps, b.ae_minutes, dev, output, quick)
    tr1.fit(ae, datamodule=dm1)
    ae_steps_done = int(tr1.global_step)
    ae.calibrate_latent_scale(dm1.train_dataloader(), max_batches=50)
    stage1_dir = output / "models" / "stage1"
    export_model(ae.cpu(), stage1_dir, overwrite=True)
    timings["stage1_s"] = time.perf_counter() - t0
    log(f"[2/4] stage 1 (autoencoder): {ae_steps_done} steps, bs {2 * b.ae_batch}, {timings['stage1_s']:.0f} s, "
        f"latent scale {float(ae.latent_scale):.3f}")  # fmt: skip

    # stage 2 ---------------------------------------------------------------------------------------------
    t0 = time.perf_counter()
    model = DiffusionCT(
        autoencoder=str(stage1_dir), mode="conditional", channels=b.unet_channels, attention_levels=b.unet_attention,
        num_head_channels=b.head_channels, unet_kwargs={"norm_num_groups": b.unet_groups}, prediction="v",
        residual=True, sampler=b.sampler, num_inference_steps=b.sample_steps, lr=b.dm_lr, ema_decay=b.dm_ema_decay,
        seed=seed, decode=b.decode, residual_sigma=b.residual_sigma, regression=b.regression,
        regression_channels=b.regression_channels, regression_lr=b.regression_lr, pixel_shuffle=b.pixel_shuffle,
    )  # fmt: skip
    tr2 = _trainer(b.dm_steps, b.dm_minutes, dev, output, quick)
    tr2.fit(model, datamodule=datamodule(b.dm_batch))
    dm_steps_done = int(tr2.global_step)
    model_dir = output / "models" / "diffusion_ct"
    export_model(model.cpu(), model_dir, overwrite=True)
    timings["stage2_s"] = time.perf_counter() - t0
    log(f"[3/4] stage 2 (conditional latent DDPM, v-pred, residual): {dm_steps_done} steps, bs {b.dm_batch}, "
        f"{timings['stage2_s']:.0f} s -> {model_dir}")  # fmt: skip

    # standardize the held-out patients ------------------------------------------------------------------
    t0 = time.perf_counter()
    model = model.to(dev).eval()
    window = model.hu_window
    gen = torch.Generator().manual_seed(seed)

    def run_dct(x: torch.Tensor) -> torch.Tensor:
        return model.standardize(x, generator=gen)

    other = "latent" if b.decode == "residual" else "residual"

    def run_dct_other(x: torch.Tensor) -> torch.Tensor:  # the other decoding, same seed: an ablation row
        return model.standardize(x, generator=torch.Generator().manual_seed(seed), decode=other)

    # the regression's posterior mean (no DDPM): a reference row
    def run_dct_mean(x: torch.Tensor) -> torch.Tensor:
        return model.standardize(x, mean_only=True)

    def run_ae(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model.autoencoder.reconstruct(x)

    def apply(arr: np.ndarray, fn) -> np.ndarray:
        return apply_to_array(
            arr, fn, spatial_dims=2, hu_window=window, divisible_by=model.divisible_by, device=dev
        )

    entries = _load_test_entries(manifest)
    per: dict[str, dict[str, list]] = {}
    ceiling: dict[Any, dict[str, float]] = {}
    figure_rows = []
    for e in entries:
        proto = str(e.get(keys.PROTOCOL, "source"))
        src = np.asarray(read_nifti(e["source"]).array, dtype=np.float32)
        vol = read_nifti(e["target"])
        ref = np.asarray(vol.array, dtype=np.float32)
        lab = np.asarray(read_nifti(e["label"]).array)
        gen.manual_seed(seed)
        out = apply(src, run_dct)
        out_other = apply(src, run_dct_other)
        out_mean = apply(src, run_dct_mean) if b.regression else None
        ae_out = apply(src, run_ae)
        name = f"{e.get(keys.CASE_ID, 'case')}_{proto}"
        write_nifti(output / "standardized" / f"{name}.nii.gz", out, vol.affine, overwrite=overwrite)
        d = per.setdefault(
            proto,
            {
                "identity": [],
                "passthrough": [],
                "diffusion_ct": [],
                f"diffusion_ct_{other}": [],
                "ref": [],
                "label": [],
            },
        )
        if e.get(keys.CASE_ID) not in ceiling:  # stage-1 ceiling: decode(encode(standard)) vs standard
            ceiling[e.get(keys.CASE_ID)] = image_metrics(apply(ref, run_ae), ref, lab)
        d["identity"].append(src)
        d["passthrough"].append(ae_out)
        d["diffusion_ct"].append(out)
        d[f"diffusion_ct_{other}"].append(out_other)
        if out_mean is not None:
            d.setdefault("diffusion_ct_mean", []).append(out_mean)
        d["ref"].append(ref)
        d["label"].append(lab)
        if len(d["ref"]) == 1:
            figure_rows.append((proto, src, out, ref))
    timings["standardize_s"] = time.perf_counter() - t0

    # metrics ---------------------------------------------------------------------------------------------
    methods = ("identity", "passthrough", "diffusion_ct", f"diffusion_ct_{other}") + (
        ("diffusion_ct_mean",) if b.regression else ()
    )
    results: dict[str, Any] = {}
    for proto, d in sorted(per.items()):
        res = {}
        for m in methods:
            rows = [image_metrics(x, r, lab) for x, r, lab in zip(d[m], d["ref"], d["label"])]
            res[m] = {k: float(np.mean([row[k] for row in rows])) for k in rows[0]}
            res[m]["texture_ccc"] = texture_ccc(d[m], d["ref"], d["label"])
        results[proto] = res
    any_proto = next(iter(per.values()))
    reference = {
        "noise_sd": float(np.mean([_noise(r, lab) for r, lab in zip(any_proto["ref"], any_proto["label"])])),
        "edge_sharpness": float(
            np.mean([_edge(r, lab) for r, lab in zip(any_proto["ref"], any_proto["label"])])
        ),
    }
    _figure(output / "figure.png", figure_rows)
    metrics = {
        "description": "held-out test patients of the built-in dataset vs the standard-protocol scan",
        "standard_protocol": STANDARD,
        "n_test_cases": len({e.get(keys.CASE_ID) for e in entries}),
        "device": str(dev),
        "quick": quick,
        "budget": {**asdict(b), "ae_steps_done": ae_steps_done, "dm_steps_done": dm_steps_done},
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "reference": reference,
        "stage1_ceiling": {
            k: float(np.mean([c[k] for c in ceiling.values()])) for k in next(iter(ceiling.values()))
        },
        "protocols": results,
    }
    write_text_atomic(
        output / "metrics.json", json.dumps(metrics, indent=2, default=_json_default), overwrite=True
    )
    _print_table(metrics, log)
    log(f"[4/4] outputs: {output / 'standardized'}, {output / 'figure.png'}, {output / 'metrics.json'}")
    return metrics


def _noise(ref: np.ndarray, lab: np.ndarray) -> float:
    from medfusion.eval.image import noise_sd

    return noise_sd(ref, _rois(lab)[0])


def _edge(ref: np.ndarray, lab: np.ndarray) -> float:
    from medfusion.eval.image import edge_sharpness

    return edge_sharpness(ref, lab > 0)


def _json_default(o: Any) -> Any:
    if isinstance(o, (np.floating, np.integer)):
        return o.item()
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return str(o)


def _print_table(metrics: dict[str, Any], log) -> None:
    from rich.console import Console
    from rich.table import Table

    ref = metrics["reference"]
    table = Table(
        title=f"DiffusionCT demo: held-out patients vs standard scan (reference noise SD {ref['noise_sd']:.1f} HU, "
        f"edge sharpness {ref['edge_sharpness']:.2f})"
    )
    for col in ("protocol", "method", "PSNR dB", "SSIM", "noise SD HU", "edge", "texture CCC"):
        table.add_column(col)
    for proto, res in metrics["protocols"].items():
        for m, v in res.items():
            table.add_row(
                proto, m, f"{v['psnr']:.2f}", f"{v['ssim']:.4f}", f"{v['noise_sd']:.1f}", f"{v['edge_sharpness']:.2f}",
                f"{v['texture_ccc']:.3f}",
            )  # fmt: skip
    console = Console()
    Console(width=max(console.width, 110)).print(table)  # never truncate method names on 80-column pipes
    c = metrics["stage1_ceiling"]
    log(f"stage-1 ceiling decode(encode(standard)) vs standard: PSNR {c['psnr']:.2f} dB, SSIM {c['ssim']:.4f}, "
        f"noise SD {c['noise_sd']:.1f} HU, edge {c['edge_sharpness']:.2f}")  # fmt: skip
    bud = metrics["budget"]
    log(
        f"budget: stage 1 {bud['ae_steps_done']} steps (bs {2 * bud['ae_batch']}), stage 2 {bud['dm_steps_done']} "
        f"steps (bs {bud['dm_batch']}), device {metrics['device']}, times {metrics['timings_s']}"
    )


def _quiet_third_party() -> None:
    """Silence the notices a CPU user cannot act on, so the demo's own progress and table stay readable."""
    import logging
    import warnings

    logging.getLogger("monai.data.nvimgcodec_pydicom_plugin").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").setLevel(logging.WARNING)
    for message in (
        ".*nvImageCodec",
        ".*LeafSpec.*",
        ".*module\\(s\\) in eval mode.*",
        ".*does not have many workers.*",
    ):
        warnings.filterwarnings("ignore", message=message)
    warnings.filterwarnings("ignore", category=FutureWarning)


def run(args: argparse.Namespace) -> int:
    import sys

    _quiet_third_party()
    try:
        run_demo(args.output, quick=args.quick, device=args.device, seed=args.seed, overwrite=args.overwrite)
    except (FileExistsError, ValueError) as err:
        print(f"medfusion demo: error: {err}", file=sys.stderr)
        return 2
    return 0

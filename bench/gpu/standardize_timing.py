"""Time ``DiffusionCT.standardize`` per 512² slice and per 512² x 300 volume (the demo's CUDA-budget model size).

The model is *untrained* (random weights, ``residual_scale`` set to 1): the compute per call does not depend on
the weights, so this measures what ``medfusion standardize`` costs on a trained model of the same size. Sizes are
the demo's CUDA budget, ``configs/demo/cuda.yaml`` (stage 1 encoder-decoder, stage 2 conditional latent U-Net
with the regression U-Net and the image-grid denoiser, v-prediction, residual, the budget's sampler and steps).

Rows: one slice ``(1, 1, 512, 512)`` through ``standardize`` directly, and a ``512 x 512 x 300`` HU volume through
``medfusion.apps.volume_job.apply_to_array`` (the code path of ``medfusion standardize`` for 2D models: slices in
batches, padding to ``divisible_by``, HU window) at several batch sizes; each in fp32 (what the CLI runs) and under
bf16 autocast (what a faster CLI could run); torch's default TF32 / cuDNN settings, as in the CLI (which sets
none). Warm-up first, ``torch.cuda.synchronize`` around each timed call, median of ``--repeats`` for the slice; peak
memory from ``torch.cuda.max_memory_allocated``. Nothing here is a new method: it times existing code paths.

    python3 bench/gpu/standardize_timing.py --out $OUT/standardize_timing.md          # GPU (run_all.sh step c)
    python3 bench/gpu/standardize_timing.py --model DIR --out $OUT/standardize_trained.md   # an exported model (step i)
    .venv/bin/python bench/gpu/standardize_timing.py --small --out /tmp/st.md         # CPU dry run, tiny sizes
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import numpy as np
import torch


def build_model(small: bool):
    """Untrained DiffusionCT of the demo's CUDA budget (``configs/demo/cuda.yaml``; ``--small``: ``quick.yaml``),
    stage 1 built from its config, as ``load_model`` rebuilds exported models."""
    from medfusion.apps.demo import default_budget, load_budget
    from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, RegressionConfig, SamplingConfig
    from medfusion.models.diffusion_ct_autoencoder import DiffusionCTAutoencoder
    from medfusion.models.export import module_config

    b = load_budget(default_budget(quick=small, cuda=True))
    s1, s2 = b.stage1, b.stage2
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(
        spatial_dims=2, architecture="skip", channels=s1.channels, latent_channels=s1.latent_channels,
        norm_num_groups=s1.norm_groups, skip_from_level=s1.skip_from_level, shortcuts=s1.shortcuts,
    )  # fmt: skip
    model = DiffusionCT(
        autoencoder_config=module_config(ae), mode="conditional", prediction="v", residual=True, ema_decay=0.995,
        denoiser=DenoiserConfig(channels=s2.channels, attention_levels=s2.attention_levels,
                                num_head_channels=s2.head_channels, norm_num_groups=s2.norm_groups),
        regression=RegressionConfig(s2.regression_channels, s2.regression_lr) if s2.regression else None,
        pixel_shuffle=s2.pixel_shuffle,
        sampling=SamplingConfig(sampler=b.sampling.sampler, num_steps=b.sampling.steps, decode=b.sampling.decode),
    )  # fmt: skip
    model.residual_scale.fill_(1.0)  # calibrated on the first training batch in real runs
    return model, b


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _amp(dev: torch.device, bf16: bool):
    if bf16 and dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> float:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else float("nan")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="markdown results file")
    p.add_argument("--small", action="store_true", help="CPU dry run: toy model, 64² x 6 volume, 2 steps")
    p.add_argument("--device", default="auto", help="auto (cuda when present), cpu, cuda")
    p.add_argument("--size", type=int, default=None, help="slice size (default 512; --small 64)")
    p.add_argument("--depth", type=int, default=None, help="volume slices (default 300; --small 6)")
    p.add_argument(
        "--batch-sizes", type=int, nargs="+", default=None, help="volume batch sizes (default 8 32)"
    )
    p.add_argument("--repeats", type=int, default=5, help="timed single-slice calls (median)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16-autocast rows")
    p.add_argument(
        "--model", default=None, help="an exported DiffusionCT folder (default: the untrained model)"
    )
    args = p.parse_args(argv)

    from medfusion.apps.volume_job import apply_to_array, resolve_device
    from medfusion.io.atomic import write_text_atomic

    dev = resolve_device(args.device)
    size = args.size or (64 if args.small else 512)
    depth = args.depth or (6 if args.small else 300)
    batch_sizes = args.batch_sizes or ([2] if args.small else [8, 32])
    if args.model:
        from medfusion.models.export import load_model

        model, b = load_model(args.model), None
    else:
        model, b = build_model(args.small)
    model = model.to(dev).eval()
    n_ae = sum(p.numel() for p in model.autoencoder.parameters())
    n_unet = sum(p.numel() for p in model.net.parameters())
    card = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU"
    modes = [False] if (args.no_bf16 or dev.type != "cuda") else [False, True]
    rng = np.random.default_rng(0)
    if b is not None:
        title = "untrained model of the demo's CUDA-budget size"
        about = (
            f"Model: stage 1 channels {b.stage1.channels}, latent {b.stage1.latent_channels} ch, skip from level "
            f"{b.stage1.skip_from_level} ({n_ae / 1e6:.2f} M params); stage 2 U-Net {b.stage2.channels}, attention "
            f"{b.stage2.attention_levels} ({n_unet / 1e6:.2f} M params); {b.sampling.sampler} {b.sampling.steps} "
            f"steps (= {b.sampling.steps} U-Net calls + 1 encode + 1 decode per batch); divisible_by "
            f"{model.divisible_by}."
        )
    else:
        opts = model.inference_options()
        title = f"exported model {args.model}"
        about = (
            f"Model: `{args.model}` ({n_ae / 1e6:.2f} M autoencoder + {n_unet / 1e6:.2f} M denoiser params), its "
            f"own inference options {opts}; divisible_by {model.divisible_by}."
        )
    lines = [
        f"# DiffusionCT standardize timing ({title})",
        "",
        f"Device: {card}; torch {torch.__version__}. Command: `python3 bench/gpu/standardize_timing.py"
        f"{' --small' if args.small else ''}{f' --model {args.model}' if args.model else ''} --size {size} "
        f"--depth {depth} --batch-sizes {' '.join(map(str, batch_sizes))}`.",
        about,
        "",
        "| case | precision | batch | total s | ms / slice | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)

    def row(case: str, bf16: bool, batch: int, total: float, n: int) -> None:
        prec = "bf16 autocast" if bf16 else "fp32 (torch defaults)" if dev.type == "cuda" else "fp32"
        lines.append(
            f"| {case} | {prec} | {batch} | {total:.3f} | {1000 * total / n:.1f} | {_peak(dev):.2f} |"
        )
        print(lines[-1], flush=True)
        # written after every row: a later timeout keeps what was measured
        write_text_atomic(args.out, "\n".join(lines) + "\n", overwrite=True)

    for bf16 in modes:
        try:
            # one slice, standardize() directly (CPU generator, as the CLI)
            x = torch.from_numpy(rng.uniform(-1, 1, (1, 1, size, size)).astype(np.float32)).to(dev)
            _peak_reset(dev)
            with _amp(dev, bf16):
                for _ in range(2):  # warm-up: cuDNN autotuning, allocator
                    model.standardize(x, generator=torch.Generator().manual_seed(0), mean_only=False)
                times = []
                for i in range(args.repeats):
                    _sync(dev)
                    t0 = time.perf_counter()
                    model.standardize(x, generator=torch.Generator().manual_seed(i), mean_only=False)
                    _sync(dev)
                    times.append(time.perf_counter() - t0)
            row(f"1 slice {size}²", bf16, 1, statistics.median(times), 1)
            # one volume through apply_to_array (the `medfusion standardize` path for 2D models)
            vol = rng.uniform(-1000, 1000, (size, size, depth)).astype(np.float32)
            for batch in batch_sizes:
                gen = {"g": torch.Generator().manual_seed(0)}

                def fn(xb: torch.Tensor, gen=gen) -> torch.Tensor:
                    return model.standardize(xb, generator=gen["g"], mean_only=False)

                _peak_reset(dev)
                with _amp(dev, bf16):
                    apply_to_array(
                        vol[:, :, :batch], fn, divisible_by=model.divisible_by, batch_size=batch, device=dev
                    )
                    _sync(dev)
                    t0 = time.perf_counter()
                    out = apply_to_array(
                        vol, fn, divisible_by=model.divisible_by, batch_size=batch, device=dev
                    )
                    _sync(dev)
                    total = time.perf_counter() - t0
                if out.shape != vol.shape or not np.isfinite(out).all():
                    raise RuntimeError(f"bad output: shape {out.shape}, finite {np.isfinite(out).all()}")
                row(f"volume {size}² x {depth}", bf16, batch, total, depth)
        except (RuntimeError, ValueError, torch.OutOfMemoryError) as err:  # keep the rows already measured
            prec = "bf16 autocast" if bf16 else "fp32"
            lines.append(
                f"| failed | {prec} | | {type(err).__name__}: {str(err).splitlines()[0][:200]} | | |"
            )
            print(lines[-1], flush=True)
            write_text_atomic(args.out, "\n".join(lines) + "\n", overwrite=True)
    lines += [
        "",
        "Volume rows include the HU -> [-1, 1] window, host <-> device copies and padding (apply_to_array); "
        "the single-slice row is the model call alone. Inputs are uniform noise: timing only"
        + (", with untrained weights." if b is not None else "."),
    ]
    write_text_atomic(args.out, "\n".join(lines) + "\n", overwrite=True)
    print(lines[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

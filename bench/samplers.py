"""Error vs NFE of every sampler and of the Time-Shift wrapper on the analytic Gaussian oracle, and DeepCache's wall
time on a small MONAI U-Net (CPU, seconds to a minute).

Data x0 ~ N(MU, S²) per voxel; the "network" is the exact MMSE denoiser, so the only error left is the solver's
discretisation error. Deterministic samplers are compared with the exact probability-flow-ODE end point from their
own start point (RMS over voxels); every sampler (DDPM included, which is stochastic and has no ODE reference) is
also scored by its sample standard deviation vs the target S (MMSE shrinkage at low NFE makes samples
under-dispersed). Columns are at equal network evaluations (NFE): PLMS uses NFE - 1 steps, F-PNDM the most steps
whose NFE fits (its pseudo Runge-Kutta start costs 9 extra), "—" where none fits.

``--trained STEPS`` also trains a small U-Net on brain-phantom slices and measures every sampler, Time-Shift and
DeepCache against a converged ODE solution of that network (quality vs NFE and wall time on a real network).

DeepCache: wall time of DDIM on an untrained (randomly perturbed) ``DiffusionUNet`` at cache intervals 1, 2, 3, 5,
and the RMS change of the sample vs interval 1 (a speed measurement; quality needs a trained model).

    .venv/bin/python bench/samplers.py                      # prints markdown tables
    .venv/bin/python bench/samplers.py --out bench/results/samplers_table.md --overwrite
"""

from __future__ import annotations

import argparse
import math
import time
from functools import partial

import numpy as np
import torch

from medfusion.diffusion.dpm_v3 import compute_ems
from medfusion.diffusion.samplers import SAMPLERS, network_evaluations, sample_time_shift
from medfusion.diffusion.schedules import NoiseSchedule, timesteps
from medfusion.io.atomic import write_text_atomic

MU, S = 0.5, 0.3
TIME_SHIFT = {
    "window": 10,
    "cutoff": 300,
}  # the authors' F-PNDM example uses w 5, c 550; DPM-Solver w 30, c 300


def gaussian_eps_model(schedule: NoiseSchedule):
    ab = schedule.alphas_cumprod

    def model(x, t, cond=None):
        shape = (-1, *([1] * (x.ndim - 1)))
        a, s = ab[t].sqrt().view(shape), (1 - ab[t]).sqrt().view(shape)
        return (s * (x.double() - a * MU) / (a**2 * S**2 + s**2)).to(x.dtype)

    return model


def exact_endpoint(x: torch.Tensor, ab: torch.Tensor, t0: int) -> torch.Tensor:
    a0, s0 = math.sqrt(ab[t0]), math.sqrt(1 - ab[t0])
    return MU + S * (x - a0 * MU) / math.sqrt(a0**2 * S**2 + s0**2)


def steps_for(name: str, nfe: int) -> int | None:
    """The most steps of ``name`` whose network evaluations fit in ``nfe`` (None if none)."""
    fits = [n for n in range(1, nfe + 1) if network_evaluations(name, n) <= nfe]
    return max(fits) if fits else None


def _runners() -> dict[str, tuple[str, object]]:
    """Column name -> (registered sampler giving the NFE rule, callable)."""
    runs: dict[str, tuple[str, object]] = {name: (name, fn) for name, fn in SAMPLERS.items()}
    sch = NoiseSchedule.create("linear")  # DPM-Solver-v3's statistics of the exact Gaussian model, estimated
    data = MU + S * torch.randn(1024, 1, 256, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    stats = compute_ems(gaussian_eps_model(sch), data, sch, timesteps(100, "logsnr", schedule=sch))
    runs["dpm_v3"] = ("dpm_v3", partial(SAMPLERS["dpm_v3"], stats=stats))
    for base in ("ddim", "dpmpp_2m", "pndm"):

        def ts_run(model, x, ts, base=base, **kw):
            return sample_time_shift(model, x, ts, base=base, **TIME_SHIFT, **kw)

        runs[f"ts_{base}"] = (base, ts_run)
    return runs


def run(nfes: list[int], spacings: list[str], voxels: int, seed: int) -> tuple[str, dict]:
    sch = NoiseSchedule.create("linear")
    model = gaussian_eps_model(sch)
    x = torch.randn(1, 1, voxels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    runs = _runners()
    lines, results = [], {}
    for spacing in spacings:
        lines += [
            f"\n**spacing = {spacing}** — RMS error vs exact ODE end point (sample std; target {S}) at equal NFE\n",
            "| NFE | " + " | ".join(runs) + " |",
            "|---|" + "---|" * len(runs),
        ]
        for nfe in nfes:
            cells = []
            for col, (rule, fn) in runs.items():
                n = steps_for(rule, nfe)
                if n is None:
                    cells.append("—")
                    continue
                ts = timesteps(n, spacing, schedule=sch)
                ref = exact_endpoint(x, sch.alphas_cumprod, int(ts[0]))
                out = fn(model, x.clone(), ts, schedule=sch, generator=torch.Generator().manual_seed(seed))
                std = float(out.std())
                if col == "ddpm":
                    cells.append(f"— ({std:.3f})")
                else:
                    err = float((out - ref).pow(2).mean().sqrt())
                    results[(spacing, col, nfe)] = err
                    cells.append(f"{err:.2e} ({std:.3f})")
            lines.append(f"| {nfe} | " + " | ".join(cells) + " |")
        orders = []
        for col in runs:
            ns = [n for n in nfes if n >= 10 and (spacing, col, n) in results]
            if col != "ddpm" and len(ns) >= 2:
                e = [results[(spacing, col, n)] for n in ns]
                orders.append(f"{col} {-np.polyfit(np.log(ns), np.log(e), 1)[0]:.2f}")
        lines.append(f"\nEmpirical order (slope of log err vs log NFE, NFE ≥ 10): {', '.join(orders)}")
    return "\n".join(lines), results


def deepcache_timing(size: int, steps: int, intervals: list[int], seed: int) -> str:
    """Wall time of DDIM ``steps`` on a 2D DiffusionUNet (32, 64, 128) at several cache intervals."""
    from medfusion.nets.deepcache import deep_cache
    from medfusion.nets.unet import DiffusionUNet

    torch.manual_seed(seed)
    net = DiffusionUNet(
        2, 1, 1, channels=(32, 64, 128), attention_levels=(False, False, True), num_res_blocks=2
    )
    with torch.no_grad():
        for p in net.parameters():  # MONAI zero-initialises the output convolution
            p.add_(0.02 * torch.randn_like(p))
    net.eval()
    sch = NoiseSchedule.create("linear")
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(seed))
    ts = timesteps(steps, "trailing", schedule=sch)
    rows = [
        "| cache interval | wall time (s) | speed-up | deep (full) calls | RMS change vs interval 1 |",
        "|---|---|---|---|---|",
    ]
    ref, base = None, None
    for k in intervals:
        with torch.no_grad(), deep_cache(net, k) as cached:
            t0 = time.perf_counter()
            out = SAMPLERS["ddim"](net, x, ts, schedule=sch, prediction="v")
            dt = time.perf_counter() - t0
        full = cached[0].full_calls if cached else steps
        ref = out if ref is None else ref
        base = dt if base is None else base
        rows.append(
            f"| {k} | {dt:.2f} | {base / dt:.2f}× | {full} / {steps} | {float((out - ref).pow(2).mean().sqrt()):.3f} |"
        )
    return (
        f"\n**DeepCache** — DDIM {steps} steps, DiffusionUNet 2D channels (32, 64, 128), 2 res blocks, attention on the "
        f"last level, {size}² input, batch 1, untrained weights, CPU, {torch.get_num_threads()} thread(s)\n\n"
        + "\n".join(rows)
    )


def train_tiny(num_images: int, size: int, steps: int, seed: int):
    """A small ``DiffusionUNet`` (v-prediction, linear betas) trained on central slices of the package's brain MR
    phantom (intensities ~[0, 1] mapped to [-1, 1]); CPU, a few minutes."""
    from medfusion.data.brain import brain_mr_phantom
    from medfusion.diffusion.gaussian import diffusion_loss, draw_timesteps, q_sample
    from medfusion.nets.unet import DiffusionUNet

    data = torch.stack(
        [torch.from_numpy(brain_mr_phantom((size, size), seed=i).hu) for i in range(num_images)]
    )
    data = (data[:, None].float() * 2 - 1).clamp(-1, 1)
    torch.manual_seed(seed)
    net = DiffusionUNet(
        2, 1, 1, channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1
    )
    sch = NoiseSchedule.create("linear")
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x0 = data[torch.randint(0, num_images, (16,), generator=g)]
        x0 = torch.where(torch.rand(16, 1, 1, 1, generator=g) < 0.5, x0, x0.flip(-1))
        t, noise = draw_timesteps(16, 1000, generator=g), torch.randn(x0.shape, generator=g)
        loss = diffusion_loss(net(q_sample(x0, t, noise, sch), t), x0, noise, t, sch, "v")
        opt.zero_grad()
        loss.backward()
        opt.step()
    return net.eval(), sch, float(loss.detach()), data


def trained_table(nfes: list[int], num_images: int, size: int, steps: int, seed: int) -> str:
    """RMS distance of each sampler's sample to a converged ODE solution (DPM-Solver++(2M), 100 logSNR steps) from
    the same start noise, on the trained tiny model; DeepCache and Time-Shift rows with wall times."""
    from medfusion.nets.deepcache import deep_cache

    t0 = time.perf_counter()
    net, sch, loss, data = train_tiny(num_images, size, steps, seed)
    with torch.no_grad():  # DPM-Solver-v3's statistics from the training images (paper: from training data)
        stats = compute_ems(net, data, sch, timesteps(100, "logsnr", schedule=sch), prediction="v",
                            generator=torch.Generator().manual_seed(seed))  # fmt: skip
    train_s = time.perf_counter() - t0
    x = torch.randn(4, 1, size, size, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        ref = SAMPLERS["dpmpp_2m"](
            net, x, timesteps(100, "logsnr", schedule=sch), schedule=sch, prediction="v"
        )
    runs = {name: (name, fn, 1) for name, fn in SAMPLERS.items() if name != "ddpm"}
    runs["dpm_v3"] = ("dpm_v3", partial(SAMPLERS["dpm_v3"], stats=stats), 1)
    for base in ("ddim", "dpmpp_2m", "plms"):
        runs[f"ts_{base}"] = (
            base,
            lambda m, x_, ts, base=base, **kw: sample_time_shift(m, x_, ts, base=base, **TIME_SHIFT, **kw),
            1,
        )
    for k in (2, 3):
        runs[f"dpmpp_2m+cache{k}"] = ("dpmpp_2m", SAMPLERS["dpmpp_2m"], k)
        runs[f"plms+cache{k}"] = ("plms", SAMPLERS["plms"], k)
    lines = ["| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---|" * len(nfes)]
    for col, (rule, fn, k) in runs.items():
        cells = []
        for nfe in nfes:
            n = steps_for(rule, nfe)
            if n is None:
                cells.append("—")
                continue
            ts = timesteps(n, "trailing", schedule=sch)
            with torch.no_grad(), deep_cache(net, k):
                start = time.perf_counter()
                out = fn(net, x, ts, schedule=sch, prediction="v")
                dt = time.perf_counter() - start
            cells.append(f"{float((out - ref).pow(2).mean().sqrt()):.3f} ({dt:.1f} s)")
        lines.append(f"| {col} | " + " | ".join(cells) + " |")
    return (
        f"\n**Trained tiny model** — DiffusionUNet 2D (32, 64, 64), v-prediction, {steps} AdamW steps (batch 16, final "
        f"loss {loss:.3f}, {train_s:.0f} s) on {num_images} brain-phantom slices of {size}²; 4 samples from one seed; "
        f"cells: RMS distance (in [-1, 1] units) to DPM-Solver++(2M) with 100 logSNR steps from the same noise "
        f"(wall time of the 4 samples); trailing steps; time shift {TIME_SHIFT}.\n\n" + "\n".join(lines)
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 5, 10, 20, 40, 80])
    p.add_argument("--spacings", nargs="+", default=["trailing", "logsnr"])
    p.add_argument("--voxels", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache-size", type=int, default=64, help="DeepCache timing: input size (0 = skip)")
    p.add_argument("--cache-steps", type=int, default=20)
    p.add_argument("--cache-intervals", type=int, nargs="+", default=[1, 2, 3, 5])
    p.add_argument(
        "--trained", type=int, default=0, help="also train a tiny model for this many steps (0 = skip)"
    )
    p.add_argument("--trained-images", type=int, default=24)
    p.add_argument("--trained-size", type=int, default=32)
    p.add_argument("--out", default=None, help="also write the tables (markdown) here")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    table, _ = run(args.nfe, args.spacings, args.voxels, args.seed)
    text = (
        f"Gaussian oracle N({MU}, {S}²), linear betas (1e-4..0.02, T=1000), {args.voxels} voxels, seed {args.seed}, "
        f"CPU, float64; time shift {TIME_SHIFT} (paper's rule, data variance 0); {time.perf_counter() - t0:.1f} s.\n"
        f"{table}\n"
    )
    if args.cache_size > 0:
        text += deepcache_timing(args.cache_size, args.cache_steps, args.cache_intervals, args.seed) + "\n"
    if args.trained > 0:
        text += (
            trained_table(args.nfe, args.trained_images, args.trained_size, args.trained, args.seed) + "\n"
        )
    print(text)
    if args.out:
        write_text_atomic(args.out, text, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

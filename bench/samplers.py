"""Error vs NFE of every sampler on the analytic Gaussian oracle (CPU, seconds).

Data x0 ~ N(MU, S²) per voxel; the "network" is the exact MMSE denoiser, so the only error left is the solver's
discretisation error (samplers_downstream.md §1.7 b). Deterministic samplers are compared with the exact
probability-flow-ODE end point from their own start point (RMS over voxels); every sampler (DDPM included, which is
stochastic and has no ODE reference) is also scored by its sample standard deviation vs the target S (MMSE shrinkage
at low NFE makes samples under-dispersed).

    .venv/bin/python bench/samplers.py                      # prints a markdown table
    .venv/bin/python bench/samplers.py --out bench/results/samplers_table.md --overwrite
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from medfusion.diffusion.samplers import SAMPLERS
from medfusion.diffusion.schedules import NoiseSchedule, timesteps
from medfusion.io.atomic import write_text_atomic

MU, S = 0.5, 0.3


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


def run(nfes: list[int], spacings: list[str], voxels: int, seed: int) -> tuple[str, dict]:
    sch = NoiseSchedule.create("linear")
    model = gaussian_eps_model(sch)
    x = torch.randn(1, 1, voxels, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    lines, results = [], {}
    for spacing in spacings:
        lines += [
            f"\n**spacing = {spacing}** — RMS error vs exact ODE end point (sample std; target {S})\n",
            "| NFE | " + " | ".join(SAMPLERS) + " |",
            "|---|" + "---|" * len(SAMPLERS),
        ]
        for n in nfes:
            ts = timesteps(n, spacing, schedule=sch)
            ref = exact_endpoint(x, sch.alphas_cumprod, int(ts[0]))
            cells = []
            for name, fn in SAMPLERS.items():
                out = fn(model, x.clone(), ts, schedule=sch, generator=torch.Generator().manual_seed(seed))
                std = float(out.std())
                if name == "ddpm":
                    cells.append(f"— ({std:.3f})")
                else:
                    err = float((out - ref).pow(2).mean().sqrt())
                    results[(spacing, name, n)] = err
                    cells.append(f"{err:.2e} ({std:.3f})")
            lines.append(f"| {n} | " + " | ".join(cells) + " |")
        orders = []
        for name in SAMPLERS:
            if name == "ddpm":
                continue
            e = [results[(spacing, name, n)] for n in nfes if n >= 10]
            ns = [n for n in nfes if n >= 10]
            orders.append(f"{name} {-np.polyfit(np.log(ns), np.log(e), 1)[0]:.2f}")
        lines.append(f"\nEmpirical order (slope of log err vs log NFE, NFE ≥ 10): {', '.join(orders)}")
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--nfe", type=int, nargs="+", default=[1, 5, 10, 20, 40, 80])
    p.add_argument("--spacings", nargs="+", default=["trailing", "logsnr"])
    p.add_argument("--voxels", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="also write the table (markdown) here")
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    table, _ = run(args.nfe, args.spacings, args.voxels, args.seed)
    text = (
        f"Gaussian oracle N({MU}, {S}²), linear betas (1e-4..0.02, T=1000), {args.voxels} voxels, seed {args.seed}, "
        f"CPU, float64; {time.perf_counter() - t0:.1f} s.\n{table}\n"
    )
    print(text)
    if args.out:
        write_text_atomic(args.out, text, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""DRDM benchmark: forward-process statistics (spec drdm.md §1.2 table), baseline comparison, transform throughput.

    .venv/bin/python bench/drdm.py --out /tmp/drdm_raw.md [--quick]

Sections:
1. Forward process: mean / max |Phi_t| (% of image size, max averaged over the batch) and folding % (det J <= 0)
   at t = 10..79 for 2D N=128 (consistent rescale), 2D N=256 with the official (legacy) rescale, and 3D N=128.
2. Random DRDM field (forward process only, T' = 40/48) vs MONAI Rand2DElasticd tuned to a comparable mean
   displacement, on a 128^2 image: displacement and folding.
3. Throughput of RandDRDMDeformd (forward-process baseline; with an untrained recovery net for timing only).
4. ``--train-minutes M``: train DRDM on built-in 2D phantom slices (64^2, CPU, plain loop over ``DRDM.losses``) for
   M minutes, then on held-out test patients compare, per T' and number of recovery steps, the generated field
   with the random starting field: displacement scale, folding % (whole image / inside the body) and label Dice
   of the deformed labels vs the originals.

    .venv/bin/python bench/drdm.py --only-train --train-minutes 10 --out /tmp/drdm_train_raw.md
"""

from __future__ import annotations

import argparse
import platform
import time

import numpy as np
import torch

from medfusion.diffusion.deformation import DeformationDiffusion
from medfusion.fields import displacement_scale, folding_fraction
from medfusion.nets.drdm import DRDMRecoveryNet
from medfusion.transforms.drdm import RandDRDMDeformd


def forward_table(levels, quick):
    rows = []
    cases = [("2D N=128", (128, 128), False, 4), ("2D N=256 legacy", (256, 256), True, 4)]
    cases.append(("3D N=128", (64,) * 3 if quick else (128,) * 3, False, 1 if quick else 2))
    for name, shape, legacy, batch in cases:
        dd = DeformationDiffusion(legacy_scale=legacy)
        for t in levels:
            g = torch.Generator().manual_seed(t)
            t0 = time.perf_counter()
            f = dd.fields(torch.full((batch,), t), shape, with_psi=True, generator=g)
            dt = time.perf_counter() - t0
            s, sp = displacement_scale(f.phi), displacement_scale(f.psi)
            rows.append(
                (
                    name,
                    t,
                    s.mean.mean().item(),
                    s.max.mean().item(),
                    100 * folding_fraction(f.phi).mean().item(),
                    sp.mean.mean().item(),
                    sp.max.mean().item(),
                    dt / batch,
                )
            )
            print(rows[-1], flush=True)
    return rows


def elastic_vs_drdm():
    from monai.transforms import Rand2DElasticd

    n = 128
    yy, xx = np.mgrid[:n, :n]
    img = ((yy - 64) ** 2 + (xx - 64) ** 2 < 40**2).astype(np.float32)[None]
    rows = []
    for t in (40, 48):
        tf = RandDRDMDeformd(["image"], t_range=(t, t), ddf_key="ddf")
        stats = []
        for seed in range(8):
            tf.set_random_state(seed)
            d = tf({"image": torch.from_numpy(img)})
            s = displacement_scale(d["ddf"][None])
            stats.append((s.mean.item(), s.max.item(), 100 * d["ddf_folding"]))
        rows.append((f"DRDM forward only, T'={t}", *np.mean(stats, 0)))
    # MONAI elastic: a displacement field is recovered by warping a coordinate image
    coords = np.stack(np.mgrid[:n, :n]).astype(np.float32)
    for spacing, mag in ((20, (4, 4)), (20, (8, 8)), (30, (10, 10))):
        el = Rand2DElasticd(
            ["c0", "c1"],
            spacing=(spacing, spacing),
            magnitude_range=mag,
            prob=1.0,
            mode="bilinear",
            padding_mode="border",
        )
        stats = []
        for seed in range(8):
            el.set_random_state(seed)
            out = el({"c0": coords[0:1], "c1": coords[1:2]})
            warped = np.concatenate([np.asarray(out["c0"]), np.asarray(out["c1"])])
            u = torch.from_numpy(warped - coords)[None]
            inner = u[..., 4:-4, 4:-4]
            s = displacement_scale(inner)
            stats.append((s.mean.item(), s.max.item(), 100 * folding_fraction(inner).item()))
        rows.append((f"MONAI Rand2DElasticd spacing={spacing} magnitude={mag}", *np.mean(stats, 0)))
    return rows


def throughput(quick):
    rows = []
    for nd, n in ((2, 128), (3, 64)):
        sample = {"image": torch.rand(1, *[n] * nd), "label": (torch.rand(1, *[n] * nd) > 0.5).long()}
        for label, net, steps in (
            ("forward only", None, None),
            ("untrained net, 4 steps", DRDMRecoveryNet(nd), 4),
        ):
            if quick and nd == 3 and net is not None:
                continue
            tf = RandDRDMDeformd(["image", "label"], t_range=(40, 48), recovery_net=net, recovery_steps=steps)
            tf.set_random_state(0)
            reps = 3 if nd == 3 else 10
            t0 = time.perf_counter()
            for _ in range(reps):
                tf(sample)
            rows.append((f"{nd}D {n}^{nd} {label}", reps / (time.perf_counter() - t0)))
            print(rows[-1], flush=True)
    return rows


def train_and_evaluate(minutes: float, size: int = 64, batch: int = 8, lr: float = 5e-4):
    from medfusion.data.builtin import make_dataset
    from medfusion.data.manifest import load_manifest
    from medfusion.eval.registration import dice_per_label
    from medfusion.io.nifti import read_nifti
    from medfusion.models.drdm import DRDM

    manifests = make_dataset(
        "/tmp/drdm_bench_data",
        n_patients=24,
        dim=2,
        size=size,
        protocols=["standard", "smooth"],
        progress=False,
    )
    man = load_manifest(manifests["segment"], allow_outside=True)

    def load(split):
        imgs, labs = [], []
        for e in man.split(split):
            hu = np.asarray(read_nifti(e["image"]).array, dtype=np.float32).reshape(size, size)
            imgs.append(np.clip((hu + 1000) / 2000, 0, 1))
            labs.append(np.asarray(read_nifti(e["label"]).array).reshape(size, size).astype(np.int64))
        return torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(labs))[:, None]

    x_tr, _ = load("training")
    x_te, l_te = load("test")
    torch.manual_seed(0)
    model = DRDM(spatial_dims=2, lr=lr)
    opt = torch.optim.Adam(model.recovery_net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    t_end, steps, losses = time.time() + 60 * minutes, 0, []
    while time.time() < t_end:
        idx = torch.randint(0, len(x_tr), (batch,), generator=gen)
        xb = x_tr[idx]
        k = int(torch.randint(0, 4, (1,), generator=gen))
        xb = torch.rot90(xb, k, dims=(2, 3))
        if torch.rand(1, generator=gen).item() < 0.5:
            xb = xb.flip(2)
        loss = model.losses(xb, generator=gen)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        steps += 1
        losses.append(loss.total.item())
        if steps % 50 == 0:
            print(f"step {steps} loss {np.mean(losses[-50:]):.4f}", flush=True)
    model.eval()
    rows = []
    body = x_te > 0.3  # HU > -400
    for t_start in (40, 48):
        for n_steps in (4, 8, 16, None):
            agg = []
            for seed in range(3):
                out = model.sample(
                    x_te,
                    t_start=t_start,
                    steps=n_steps,
                    label=l_te,
                    generator=torch.Generator().manual_seed(seed),
                )
                for name, ddf in (("random", out.random_ddf), ("DRDM", out.ddf)):
                    if name == "random" and n_steps != 4:
                        continue
                    from medfusion.fields import warp_labels

                    lab = warp_labels(l_te, ddf)
                    dice = np.mean(
                        [
                            np.mean(list(dice_per_label(lab[i : i + 1], l_te[i : i + 1]).values()))
                            for i in range(len(lab))
                        ]
                    )
                    s = displacement_scale(ddf)
                    agg.append(
                        (
                            name,
                            s.mean.mean().item(),
                            s.max.mean().item(),
                            100 * folding_fraction(ddf).mean().item(),
                            100 * folding_fraction(ddf, body).mean().item(),
                            dice,
                        )
                    )
            for name in ("random", "DRDM"):
                vals = [a[1:] for a in agg if a[0] == name]
                if vals:
                    label = f"{name} T'={t_start}" + (
                        "" if name == "random" else f" steps={n_steps or t_start}"
                    )
                    rows.append((label, *np.mean(vals, 0)))
                    print(rows[-1], flush=True)
    return steps, float(np.mean(losses[:20])), float(np.mean(losses[-50:])), len(x_tr), len(x_te), rows


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/drdm_raw.md")
    p.add_argument("--quick", action="store_true", help="3D at 64^3 and fewer levels")
    p.add_argument("--train-minutes", type=float, default=0.0)
    p.add_argument("--only-train", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(2)
    if a.only_train:
        steps, l0, l1, ntr, nte, rows = train_and_evaluate(a.train_minutes)
        lines = [
            f"# DRDM short CPU training: {steps} steps, batch 8, 64^2, Adam 5e-4, {a.train_minutes} min, "
            f"{torch.get_num_threads()} threads; loss {l0:.3f} -> {l1:.3f}; {ntr} train / {nte} test slices",
            "",
            "| field | mean % | max % | folding % | folding in body % | label Dice vs original |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.3f} |" for r in rows
        ]
        from pathlib import Path

        Path(a.out).write_text("\n".join(lines) + "\n")
        print("\n".join(lines))
        return
    levels = [10, 48, 79] if a.quick else [10, 20, 30, 48, 64, 79]
    lines = [
        f"# DRDM bench ({platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads)",
        "",
        "## Forward process",
        "",
        "| case | t | mean % | max % | folding % | psi mean % | psi max % | s/sample |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in forward_table(levels, a.quick):
        lines.append(
            f"| {r[0]} | {r[1]} | {r[2]:.2f} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.2f} | {r[6]:.2f} | {r[7]:.2f} |"
        )
    lines += [
        "",
        "## Random DRDM field vs MONAI elastic (128^2, 8 seeds)",
        "",
        "| field | mean % | max % | folding % |",
        "|---|---|---|---|",
    ]
    for r in elastic_vs_drdm():
        lines.append(f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]:.3f} |")
    lines += ["", "## Transform throughput (CPU)", "", "| case | samples/s |", "|---|---|"]
    for r in throughput(a.quick):
        lines.append(f"| {r[0]} | {r[1]:.2f} |")
    text = "\n".join(lines) + "\n"
    from pathlib import Path

    Path(a.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()

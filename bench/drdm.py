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


def _builtin_slices(size: int, n_patients: int = 60):
    """Built-in standard-protocol phantom slices in [0, 1] (HU -1000..1000) and labels, per split."""
    from medfusion.data.builtin import FORMAT_VERSION, make_dataset
    from medfusion.data.manifest import load_manifest
    from medfusion.io.nifti import read_nifti

    # the cache folder names the data format: a folder from an older format would be refused by make_dataset
    manifests = make_dataset(
        f"/tmp/drdm_bench_data_v{FORMAT_VERSION}_{size}_{n_patients}", n_patients=n_patients, dim=2, size=size,
        protocols=["standard", "low_dose"], progress=False,
    )  # fmt: skip
    man = load_manifest(manifests["segment"], allow_outside=True)

    def load(splits):
        imgs, labs = [], []
        for split in splits:
            for e in man.split(split):
                hu = np.asarray(read_nifti(e["image"]).array, dtype=np.float32).reshape(size, size)
                imgs.append(np.clip((hu + 1000) / 2000, 0, 1))
                labs.append(np.asarray(read_nifti(e["label"]).array).reshape(size, size).astype(np.int64))
        return torch.from_numpy(np.stack(imgs))[:, None], torch.from_numpy(np.stack(labs))[:, None]

    return load(["training"]), load(["test", "validation"])


def train(
    steps: int, size: int, batch: int, lr: float, save: str, every: int = 1000, device: str = "cpu",
    max_minutes: float = 0.0,
) -> dict:  # fmt: skip
    """Plain loop over ``DRDM.losses`` (spec §3: Adam, no scheduler, no EMA); weights saved every ``every`` steps.

    ``device``: where the recovery net runs (the random fields are drawn on the CPU generator either way);
    ``max_minutes`` > 0: stop (and save) after the first step past that wall time (GPU time guard).
    """
    from pathlib import Path

    from medfusion.models.drdm import DRDM

    (x_tr, _), _ = _builtin_slices(size)
    torch.manual_seed(0)
    model = DRDM(spatial_dims=2, lr=lr).to(device)
    opt = torch.optim.Adam(model.recovery_net.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    Path(save).mkdir(parents=True, exist_ok=True)
    t0, losses, log = time.time(), [], []
    for step in range(1, steps + 1):
        xb = x_tr[torch.randint(0, len(x_tr), (batch,), generator=gen)].to(device)
        xb = torch.rot90(xb, int(torch.randint(0, 4, (1,), generator=gen)), dims=(2, 3))
        if torch.rand(1, generator=gen).item() < 0.5:
            xb = xb.flip(2)
        loss = model.losses(xb, generator=gen)
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        losses.append(loss.total.item())
        if step % 100 == 0:
            log.append((step, float(np.mean(losses[-100:])), time.time() - t0))
            print(f"step {step} loss {log[-1][1]:.4f} {log[-1][2]:.0f} s", flush=True)
        stop = max_minutes > 0 and time.time() - t0 > 60 * max_minutes
        if step % every == 0 or step == steps or stop:
            torch.save(model.recovery_net.state_dict(), Path(save) / f"step_{step:06d}.pt")
        if stop:
            break
    return {"steps": step, "train_slices": len(x_tr), "minutes": (time.time() - t0) / 60, "log": log}


def _dice(lab: torch.Tensor, ref: torch.Tensor) -> float:
    from medfusion.eval.registration import dice_per_label

    return float(
        np.mean(
            [np.mean(list(dice_per_label(lab[i : i + 1], ref[i : i + 1]).values())) for i in range(len(lab))]
        )
    )


def evaluate(
    ckpt: str | None, size: int, t_starts=(40, 48, 64), step_list=(2, 4, 8, 16, None), seeds=3, device: str = "cpu"
):  # fmt: skip
    """Rows (name, mean %, p95 %, max %, folding %, folding in body %, Dice) on the held-out slices.

    ``device``: where DRDM sampling runs (fields are moved back to the CPU for the statistics).
    """
    from monai.transforms import Rand2DElasticd

    from medfusion.fields import warp_labels
    from medfusion.models.drdm import DRDM

    _, (x_te, l_te) = _builtin_slices(size)
    model = DRDM(spatial_dims=2)
    if ckpt:
        model.recovery_net.load_state_dict(torch.load(ckpt, weights_only=True, map_location="cpu"))
    model.to(device).eval()
    body = x_te > 0.3  # HU > -400

    def stats(ddf, lab):
        s = displacement_scale(ddf)
        return (s.mean.mean().item(), s.p95.mean().item(), s.max.mean().item(),
                100 * folding_fraction(ddf).mean().item(), 100 * folding_fraction(ddf, body).mean().item(),
                _dice(lab, l_te))  # fmt: skip

    rows = []
    for t_start in t_starts:
        for n_steps in step_list:
            agg = {"random": [], "DRDM": []}
            for seed in range(seeds):
                t0 = time.perf_counter()
                with torch.no_grad():
                    out = model.sample(x_te.to(device), t_start=t_start, steps=n_steps, label=l_te.to(device),
                                       generator=torch.Generator().manual_seed(seed))  # fmt: skip
                    ddf, random_ddf = out.ddf.cpu(), out.random_ddf.cpu()
                dt = (time.perf_counter() - t0) / len(x_te)
                agg["DRDM"].append((*stats(ddf, warp_labels(l_te, ddf)), dt))
                agg["random"].append((*stats(random_ddf, warp_labels(l_te, random_ddf)), 0.0))
            if n_steps == step_list[0]:
                rows.append((f"random field T'={t_start}", *np.mean(agg["random"], 0)))
            rows.append((f"DRDM T'={t_start}, {n_steps or t_start} steps", *np.mean(agg["DRDM"], 0)))
            print(rows[-1], flush=True)
    # MONAI's B-spline elastic deformation at comparable displacement (field recovered from coordinate images)
    n = size
    coords = torch.from_numpy(np.stack(np.mgrid[:n, :n]).astype(np.float32))
    for spacing, mag in ((n // 6, 1.5), (n // 6, 3.0), (n // 4, 5.0)):
        el = Rand2DElasticd(["c0", "c1", "img", "lab"], spacing=(spacing, spacing), magnitude_range=(mag, mag),
                            prob=1.0, mode=["bilinear", "bilinear", "bilinear", "nearest"], padding_mode="border")  # fmt: skip
        agg = []
        for seed in range(seeds):
            el.set_random_state(seed)
            ddfs, labs = [], []
            for i in range(len(x_te)):
                o = el({"c0": coords[0:1], "c1": coords[1:2], "img": x_te[i], "lab": l_te[i].float()})
                ddfs.append(torch.cat([torch.as_tensor(o["c0"]), torch.as_tensor(o["c1"])]) - coords)
                labs.append(torch.as_tensor(o["lab"]).round().long())
            agg.append((*stats(torch.stack(ddfs), torch.stack(labs)), 0.0))
        rows.append((f"MONAI Rand2DElasticd spacing={spacing} magnitude={mag}", *np.mean(agg, 0)))
        print(rows[-1], flush=True)
    return rows, len(x_te)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/drdm_raw.md")
    p.add_argument("--quick", action="store_true", help="3D at 64^3 and fewer levels")
    p.add_argument(
        "--train-steps", type=int, default=0, help="train DRDM for N steps (section 4), save to --save"
    )
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--save", default="/tmp/drdm_train")
    p.add_argument("--evaluate", default=None, help="evaluate a saved recovery net ('' = untrained) and exit")
    p.add_argument("--device", default="cpu", help="training / evaluation device (cpu, cuda)")
    p.add_argument("--train-minutes", type=float, default=0.0, help="training time guard (0 = none)")
    a = p.parse_args()
    if a.train_steps:
        info = train(
            a.train_steps, a.size, a.batch, a.lr, a.save, device=a.device, max_minutes=a.train_minutes
        )
        print(info)
        return
    if a.evaluate is not None:
        rows, n_te = evaluate(a.evaluate or None, a.size, device=a.device)
        lines = [
            f"Checkpoint `{a.evaluate or '(untrained)'}`, {n_te} held-out slices ({a.size}^2), 3 seeds per row; "
            "scale = |u| in % of the image size (mean, 95th percentile, max); folding = % of voxels with det J <= 0.",
            "",
            "| field | mean % | p95 % | max % | folding % | folding in body % | label Dice vs original | s / slice |",
            "|---|---|---|---|---|---|---|---|",
        ]
        lines += [f"| {r[0]} | {r[1]:.2f} | {r[2]:.1f} | {r[3]:.1f} | {r[4]:.3f} | {r[5]:.3f} | {r[6]:.3f} | {r[7]:.3f} |"
                  for r in rows]  # fmt: skip
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

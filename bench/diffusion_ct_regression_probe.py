"""Probe: the DiffusionCT regression U-Net alone, on the latent grid or on the image grid.

Trains only the regression part of ``DiffusionCT(regression=...)`` (``GatedUNet``: MONAI ``UNet``, output gated from
zero) on the frozen stage 1 of a previous ``bench/diffusion_ct.py`` run, and scores ``D(z_src + mu / r)`` with
residual decoding (``+ x - D(E(x))``) and plain latent decoding on its 12 test patients (PSNR dB / noise SD HU per
protocol). It isolates what the network grid does to a per-pixel task: with the lossless 16-channel f = 4 latent a
64-channel network on the latent grid has 4 channels per pixel. Usage::

    python bench/diffusion_ct_regression_probe.py --run /tmp/s5/reg --lr 1e-3 --steps 3000 --loss mse \
        --channels 64 128 256 --pixel-shuffle 0
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--run", required=True, help="--out folder of a bench/diffusion_ct.py run (data/, stage1/)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--loss", choices=["mse", "l1"], default="mse")
    p.add_argument("--channels", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--pixel-shuffle", type=int, default=0)
    return p.parse_args(argv)


def train_regression(args, ae, manifest: Path) -> tuple[torch.nn.Module, float, float]:
    """(regression net, residual scale r = 1 / std(z_std - z_src), training seconds)."""
    from medfusion import keys
    from medfusion.data.datamodule import ManifestDataModule
    from medfusion.nets.latent_grid import grid_channels, on_grid
    from medfusion.nets.unet import GatedUNet

    dm = ManifestDataModule(str(manifest), task="standardize", spatial_dims=2, roi_size=[64, 64], batch_size=8,
                            cache="memory", seed=0)  # fmt: skip
    dm.setup("fit")
    torch.manual_seed(0)
    c = grid_channels(int(ae.latent_channels), 2, args.pixel_shuffle)
    reg = on_grid(GatedUNet(2, c, tuple(args.channels)), args.pixel_shuffle)
    opt = torch.optim.AdamW(reg.parameters(), lr=args.lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, args.steps, eta_min=0.05 * args.lr)
    loss_fn = F.mse_loss if args.loss == "mse" else F.l1_loss
    steps, scale, t0 = 0, None, time.perf_counter()
    while steps < args.steps:
        for b in dm.train_dataloader():
            with torch.no_grad():
                zs, _ = ae.encode_latent(b[keys.SOURCE])
                zt, _ = ae.encode_latent(b[keys.TARGET])
                if scale is None:  # r = 1 / std(z_std - z_src), as DiffusionCT calibrates it
                    scale = float((zt - zs).std()) ** -1
            loss = loss_fn(reg(zs), (zt - zs) * scale)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            steps += 1
            if steps >= args.steps:
                break
    return reg.eval(), float(scale), time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    import lightning as L

    from medfusion.apps.volume_job import apply_to_array
    from medfusion.data.manifest import load_manifest
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.eval.ct_protocol import CTProtocol, read_case
    from medfusion.models.export import load_model

    args = parse_args(argv)
    run = Path(args.run)
    L.seed_everything(0, verbose=False)
    ae = load_model(run / "stage1").eval()
    manifest = run / "data" / "manifests" / "standardize.json"
    reg, scale, train_s = train_regression(args, ae, manifest)

    def mean_latent(x: torch.Tensor) -> torch.Tensor:
        z, sk = ae.encode_latent(x)
        return ae.decode_latent(z + reg(z) / scale, sk)

    def mean_residual(x: torch.Tensor) -> torch.Tensor:
        z, sk = ae.encode_latent(x)
        return mean_latent(x) + x - ae.decode_latent(z, sk)

    protocol = CTProtocol.for_label_ids(LABEL_IDS)
    res: dict[str, dict[str, list]] = {}
    with torch.no_grad():
        for e in load_manifest(manifest).split("test"):
            c = read_case(e)
            for name, fn in (("residual decoding", mean_residual), ("D(z)", mean_latent)):
                y = apply_to_array(c.source, fn, spatial_dims=2, divisible_by=16, device="cpu", batch_size=32)
                m = protocol.image_metrics(y, c.reference, c.label)
                res.setdefault(name, {}).setdefault(c.protocol, []).append((m["psnr"], m["noise_sd"]))
    print(
        f"regression alone: lr {args.lr:g}, {args.steps} steps (bs 8), {args.loss}, channels {tuple(args.channels)}, "
        f"pixel shuffle {args.pixel_shuffle}, train {train_s:.0f} s"
    )
    for name, d in res.items():
        per = {k: (np.mean([a for a, _ in v]), np.mean([b for _, b in v])) for k, v in sorted(d.items())}
        cells = " ".join(f"{k} {a:.2f}/{b:.1f}" for k, (a, b) in per.items())
        print(f"{name}: {cells} mean {np.mean([a for a, _ in per.values()]):.2f}")


if __name__ == "__main__":
    main()

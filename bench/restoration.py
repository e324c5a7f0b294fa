"""Restoration head-to-head: identity, supervised U-Net, RDDM (2/5/10 steps), DiffIR, DiffusionCT.

    .venv/bin/python bench/restoration.py --task lowdose   # low-dose CT denoising (built-in phantoms)
    .venv/bin/python bench/restoration.py --task kernel    # CT kernel/dose conversion (the standardization pairs)
    .venv/bin/python bench/restoration.py --task sr        # MR 4x super-resolution (nilearn's MNI152, offline)

Tasks:

- ``lowdose``: the built-in ``restore`` manifest, low_dose -> standard (same kernel, same anatomy).
- ``kernel``: the built-in ``standardize`` manifest, every non-standard protocol (sharp, smooth, low_dose, thick,
  sharp_low_dose) -> standard: the DiffusionCT task, so DiffusionCT (trained by :func:`medfusion.apps.demo.run_demo`
  with the CPU budget ``configs/demo/cpu.yaml`` on the same training split) gets a row too.
- ``sr``: brain T1 "patients" (:func:`medfusion.data.brain.brain_mr_phantom`, seeded warps + bias field), axial
  slices cropped to 96 x 112; the degraded input is the slice averaged over 4 x 4 blocks plus Gaussian noise (1 % of
  the range), resampled back onto the target grid (bilinear) before the network sees it, as the issue asks.

Every learned method trains for a fixed number of optimiser steps (``--rddm-steps`` etc., so the budget does not
depend on machine load; the wall time is reported beside it) on random ``--crop``² crops of the training slices,
batch ``--batch``, then restores the full held-out (test + validation split) slices. Metrics against the target:
PSNR and SSIM (data range = the intensity window), noise SD inside an eroded uniform region (CT: liver, HU; MR:
white matter, % of the range), edge sharpness (max slope of the edge-spread function across the body / brain
boundary; larger is sharper), parameters, network evaluations (NFE) and the time to restore one 256² slice. The
table and the exact budget are written to ``--results`` (markdown).
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

CT_WINDOW = (-1000.0, 1000.0)
TASK_TITLES = {
    "lowdose": "low-dose CT denoising (built-in 2D phantoms)",
    "kernel": "CT kernel/dose conversion to the standard protocol (built-in 2D phantoms)",
    "sr": "MR 4x super-resolution (brain T1 from nilearn's MNI152, 2D axial slices)",
}


# ---------------------------------------------------------------------------------------------------- data
def load_ct_split(manifest: Path, task: str, splits: tuple[str, ...]):
    """Source/target slices in [-1, 1], label maps and protocol names of the given splits of a built-in manifest."""
    import nibabel as nib

    from medfusion import keys
    from medfusion.data.manifest import load_manifest
    from medfusion.data.pipelines import hu_to_unit

    man = load_manifest(manifest, task=task)
    src, tgt, lab, proto = [], [], [], []

    def rd(path: str) -> np.ndarray:
        return np.asarray(nib.load(path).get_fdata(), dtype=np.float32)

    for split in splits:
        for e in man.split(split):
            src.append(hu_to_unit(rd(e[keys.SOURCE]), CT_WINDOW))
            tgt.append(hu_to_unit(rd(e[keys.TARGET]), CT_WINDOW))
            lab.append(rd(e[keys.LABEL]).astype(np.int32))
            proto.append(str(e.get(keys.PROTOCOL, "source")))
    to = lambda xs: torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))  # noqa: E731
    return to(src), to(tgt), np.stack(lab), proto


def make_sr_data(n_patients: int, seed: int, factor: int = 4, noise: float = 0.01):
    """Brain MR slices: ``{split: (source, target, labels, protocols)}`` with a patient-level split (70/15/15)."""
    import torch.nn.functional as F

    from medfusion.data.brain import available, brain_mr_phantom
    from medfusion.data.builtin import split_cases

    if not available():
        raise SystemExit(
            "--task sr needs nilearn (pip install medfusion[data]); it ships the MNI152 template"
        )
    cases = [f"brain_{i:03d}" for i in range(n_patients)]
    splits = split_cases(cases, (0.7, 0.15, 0.15), seed)
    rng = np.random.default_rng(seed)
    out = {}
    for split, ids in splits.items():
        src, tgt, lab = [], [], []
        for c in ids:
            ph = brain_mr_phantom(seed=seed * 1000 + int(c.split("_")[1]), noise=0.0)
            vol, labels = ph.hu, ph.labels  # (99, 117, 95) at 2 mm, intensities ~[0, 1]
            for k in range(30, 71, 5):
                hr = np.clip(vol[1:97, 2:114, k], 0.0, 1.0) * 2 - 1  # 96 x 112, [-1, 1]
                t = torch.from_numpy(np.ascontiguousarray(hr))[None, None]
                lr = F.avg_pool2d(t, factor)
                lr = lr + torch.from_numpy(rng.normal(0.0, 2 * noise, lr.shape).astype(np.float32))
                up = F.interpolate(lr, size=hr.shape, mode="bilinear", align_corners=False)
                src.append(up[0])
                tgt.append(t[0])
                lab.append(labels[1:97, 2:114, k].astype(np.int32))
        out[split] = (torch.stack(src), torch.stack(tgt), np.stack(lab), ["4x"] * len(src))
    return out


def crops(src: torch.Tensor, tgt: torch.Tensor, n: int, size: int, g: torch.Generator):
    idx = torch.randint(0, src.shape[0], (n,), generator=g)
    h, w = src.shape[-2:]
    ys = torch.randint(0, h - size + 1, (n,), generator=g)
    xs = torch.randint(0, w - size + 1, (n,), generator=g)
    s = torch.stack([src[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs)])
    t = torch.stack([tgt[i, :, y : y + size, x : x + size] for i, y, x in zip(idx, ys, xs)])
    flip = torch.rand(n, generator=g) < 0.5  # random h-flip as upstream
    s[flip], t[flip] = s[flip].flip(-1), t[flip].flip(-1)
    return s, t


def train_loop(step_fn, steps: int, log: list, name: str) -> dict:
    t0, losses = time.time(), []
    for i in range(steps):
        losses.append(float(step_fn(i)))
        if (i + 1) % max(1, steps // 5) == 0:
            print(
                f"  {name} step {i + 1}/{steps} loss {np.mean(losses[-50:]):.4f} ({time.time() - t0:.0f} s)",
                flush=True,
            )
    info = {
        "steps": steps,
        "minutes": round((time.time() - t0) / 60, 2),
        "final_loss": float(np.mean(losses[-50:])) if losses else float("nan"),
    }
    log.append((name, info))
    print(name, info, flush=True)
    return info


class AtTimeZero(nn.Module):
    """A :class:`medfusion.nets.unet.DiffusionUNet` used as a plain network, ``net(x, t=0)``."""

    def __init__(self, **unet):
        super().__init__()
        from medfusion.nets.unet import DiffusionUNet

        self.net = DiffusionUNet(spatial_dims=2, in_channels=1, out_channels=1, **unet)

    def forward(self, x):
        return self.net(x, torch.zeros(x.shape[0], dtype=torch.long, device=x.device))


# ---------------------------------------------------------------------------------------------------- metrics
def metrics(out_u: torch.Tensor, ref_u: torch.Tensor, labels: np.ndarray, task: str) -> dict:
    """Per-slice PSNR / SSIM / noise SD / edge sharpness, averaged (NaN-aware) over slices."""
    return _average(per_slice(out_u, ref_u, labels, task))


def per_slice(out_u: torch.Tensor, ref_u: torch.Tensor, labels: np.ndarray, task: str) -> list[dict]:
    from scipy.ndimage import binary_erosion

    from medfusion.data.pipelines import unit_to_hu
    from medfusion.eval.image import edge_sharpness, noise_sd, psnr, ssim

    rows = []
    for o, r, lab in zip(out_u[:, 0].numpy(), ref_u[:, 0].numpy(), labels):
        if task == "sr":  # MR: intensities in % of the [0, 1] range; uniform ROI = eroded white matter
            o, r, rng = (o + 1) * 50, (r + 1) * 50, 100.0
            roi = binary_erosion(lab == 3, iterations=1)
        else:
            from medfusion.data.phantoms import LABEL_IDS

            o, r, rng = unit_to_hu(o, CT_WINDOW), unit_to_hu(r, CT_WINDOW), float(CT_WINDOW[1] - CT_WINDOW[0])
            roi = binary_erosion(lab == LABEL_IDS["liver"], iterations=2)
        rows.append(
            dict(
                psnr=psnr(o, r, data_range=rng),
                ssim=ssim(o, r, data_range=rng),
                noise=noise_sd(o, roi) if roi.sum() > 10 else float("nan"),
                edge=edge_sharpness(o, lab > 0),
            )
        )
    return rows


def _average(rows: list[dict]) -> dict:
    return {k: float(np.nanmean([r[k] for r in rows])) for k in rows[0]}


def texture(
    out_u: torch.Tensor, ref_u: torch.Tensor, labels: np.ndarray, protos: list[str], task: str
) -> float:
    """CT only: texture-feature CCC against the target across held-out patients (median over features,
    :meth:`medfusion.eval.ct_protocol.CTProtocol.texture_ccc`), per source protocol, averaged over protocols."""
    from medfusion.data.phantoms import LABEL_IDS
    from medfusion.data.pipelines import unit_to_hu
    from medfusion.eval.ct_protocol import CTProtocol

    if task == "sr":
        return float("nan")
    protocol = CTProtocol.for_label_ids(LABEL_IDS)
    o = [unit_to_hu(a, CT_WINDOW) for a in out_u[:, 0].numpy()]
    r = [unit_to_hu(a, CT_WINDOW) for a in ref_u[:, 0].numpy()]
    vals = []
    for pr in sorted(set(protos)):
        idx = [i for i, q in enumerate(protos) if q == pr]
        vals.append(protocol.texture_ccc([o[i] for i in idx], [r[i] for i in idx], [labels[i] for i in idx]))
    return float(np.nanmean(vals))


def time_256(fn, reps: int = 2) -> float:
    x = torch.rand(1, 1, 256, 256) * 2 - 1
    fn(x)  # warm-up
    t0 = time.time()
    for _ in range(reps):
        fn(x)
    return (time.time() - t0) / reps


def batched(fn, x: torch.Tensor, size: int = 16) -> torch.Tensor:
    return torch.cat([fn(x[i : i + size]) for i in range(0, x.shape[0], size)])


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=sorted(TASK_TITLES), default="lowdose")
    ap.add_argument("--out", default=None, help="work folder (default /tmp/bench_restore_<task>)")
    ap.add_argument("--results", default=None, help="markdown output (default bench/results/restoration_<task>.md)")
    ap.add_argument("--patients", type=int, default=40)
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--crop", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--rddm-steps", type=int, default=1200)
    ap.add_argument("--unet-steps", type=int, default=1200)
    ap.add_argument("--s1-steps", type=int, default=800)
    ap.add_argument("--s2-steps", type=int, default=800, help="first third CPEN_S2 + denoiser, then joint")
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-diffusionct", action="store_true", help="kernel task: skip the DiffusionCT row")
    ap.add_argument("--dct-steps", type=int, nargs=2, default=None, metavar=("AE", "DM"),
                    help="kernel task: DiffusionCT stage-1/stage-2 steps (default: the demo's CPU budget)")  # fmt: skip
    return ap.parse_args(argv)


def load_data(args, out: Path) -> dict[str, Any]:
    """Training and held-out (test + validation) tensors in [-1, 1], labels, protocols and the report's data line."""
    if args.task == "sr":
        data = make_sr_data(args.patients, args.seed)
        held = [data[k] for k in ("test", "validation") if k in data and len(data[k][0])]
        d = {"train": data["training"][:2], "test": (torch.cat([h[0] for h in held]), torch.cat([h[1] for h in held]),
                                                     np.concatenate([h[2] for h in held]), sum((h[3] for h in held), []))}  # fmt: skip
        d["line"] = (
            f"Data: {args.patients} brain T1 patients (`brain_mr_phantom(seed=i, noise=0)`, 2 mm), 9 axial slices each "
            f"(k = 30..70), cropped to 96 x 112; split by patient 70/15/15; {d['train'][0].shape[0]} training slices, "
            f"{d['test'][0].shape[0]} held-out slices (test + validation patients). Degradation: 4 x 4 block average + "
            f"Gaussian noise (SD 1 % of the range), bilinear back to 96 x 112."
        )
        return d
    from medfusion.data.builtin import make_dataset

    man = make_dataset(out / "builtin2d", n_patients=args.patients, dim=2, size=args.size, seed=args.seed, progress=False)
    mtask = "restore" if args.task == "lowdose" else "standardize"
    d = {"train": load_ct_split(man[mtask], mtask, ("training",))[:2],
         "test": load_ct_split(man[mtask], mtask, ("test", "validation")), "manifest": man["standardize"]}  # fmt: skip
    what = "low_dose -> standard, same kernel" if args.task == "lowdose" else "each non-standard protocol -> standard"
    d["line"] = (
        f"Data: `make_dataset(n_patients={args.patients}, dim=2, size={args.size}, seed={args.seed})`, manifest "
        f"`{mtask}` ({what}); {d['train'][0].shape[0]} training pairs, {d['test'][0].shape[0]} held-out pairs (test + "
        f"validation patients), full {args.size}² slices, HU window {CT_WINDOW}."
    )
    return d


def step_fn(opt, loss_of, clip_params=None):
    """One optimiser step of ``loss_of()``; returns the loss value."""

    def step(i):
        loss = loss_of(i)
        opt.zero_grad()
        loss.backward()
        if clip_params is not None:
            torch.nn.utils.clip_grad_norm_(clip_params, 1.0)
        opt.step()
        return loss.item()

    return step


def train_models(args, batch, dev, out: Path, log: list) -> dict[str, Any]:
    """RDDM (SM-Res-N, two nets, L1, sum_scale 0.01), the supervised U-Net (L1), DiffIR stage 1 then stage 2."""
    from medfusion.models.diffir import DiffIRStage1, DiffIRStage2
    from medfusion.models.options import UNetConfig
    from medfusion.models.rddm import RDDM, ResidualScheduleConfig
    from medfusion.models.supervised import SupervisedRestorer
    from medfusion.nets.diffir import CPENConfig, DIRformerConfig

    unet = dict(channels=(32, 64, 64), attention_levels=(False, False, True), num_head_channels=32)
    rddm = RDDM(spatial_dims=2, unet=UNetConfig(**unet), schedule=ResidualScheduleConfig(sum_scale=0.01), lr=args.lr,
                ema_decay=0.995, ema_every=1).to(dev)  # fmt: skip
    rddm_opt = rddm.configure_optimizers()

    def rddm_step(i):
        loss = step_fn(rddm_opt, lambda i: rddm.loss(batch()), rddm.nets.parameters())(i)
        rddm.ema.update_parameters(rddm.nets)
        return loss

    train_loop(rddm_step, args.rddm_steps, log, "RDDM")
    sup = SupervisedRestorer(rezero=False, lr=args.lr, adam_betas=(0.9, 0.99), net=AtTimeZero(**unet)).to(dev)
    train_loop(step_fn(sup.configure_optimizers(), lambda i: sup.loss(batch())), args.unet_steps, log, "U-Net")
    dirformer = DIRformerConfig(dim=16, num_blocks=(1, 2, 2, 2), num_refinement_blocks=1, heads=(1, 2, 2, 4))
    cpen = CPENConfig(downscale=4, n_feats=32, n_encoder_res=2)
    s1 = DiffIRStage1(spatial_dims=2, lr=args.lr, ema_decay=None, dirformer=dirformer, cpen=cpen).to(dev)
    train_loop(step_fn(s1.configure_optimizers(), lambda i: s1.loss(batch())), args.s1_steps, log, "DiffIR stage 1")
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": s1.state_dict()}, out / "diffir_s1.ckpt")
    s2 = DiffIRStage2(stage1=str(out / "diffir_s1.ckpt"), spatial_dims=2, lr=args.lr, lr_encoder=args.lr,
                      ema_decay=None, dirformer=dirformer, cpen=cpen).to(dev)  # fmt: skip
    s2.train()
    opt_e, opt_g = s2.configure_optimizers()
    phase1 = args.s2_steps // 3  # first third: CPEN_S2 + denoiser against the stage-1 IPR only

    def s2_step(i):
        phase = 1 if i < phase1 else 2
        return step_fn(opt_e if phase == 1 else opt_g, lambda i: s2.losses(batch(), phase)["total"])(i)

    train_loop(s2_step, args.s2_steps, log, "DiffIR stage 2 (1/3 phase 1, 2/3 joint)")
    return {"rddm": rddm.eval(), "sup": sup.eval(), "s1": s1.eval(), "s2": s2.eval()}


def train_diffusion_ct(args, out: Path, manifest: str, dev, log: list):
    """The demo pipeline (CPU budget) on the same data and training split; refuses a split that leaks."""
    import dataclasses

    from medfusion import keys
    from medfusion.apps.demo import default_budget, load_budget, run_demo
    from medfusion.data.manifest import load_manifest
    from medfusion.models.export import load_model

    t0 = time.time()
    b = load_budget(default_budget(quick=False, cuda=False))
    b = dataclasses.replace(b, data=dataclasses.replace(b.data, patients=args.patients, size=args.size))
    if args.dct_steps:
        b = dataclasses.replace(b, stage1=dataclasses.replace(b.stage1, steps=args.dct_steps[0]),
                                stage2=dataclasses.replace(b.stage2, steps=args.dct_steps[1]))  # fmt: skip
    dct_dir = out / "diffusion_ct"
    info = run_demo(dct_dir, seed=args.seed, overwrite=True, budget=b)
    ours = load_manifest(manifest, task="standardize")
    theirs = load_manifest(dct_dir / "data" / "manifests" / "standardize.json", task="standardize")
    case = lambda m, s: {e[keys.CASE_ID] for e in m.split(s)}  # noqa: E731
    if case(theirs, "training") & (case(ours, "test") | case(ours, "validation")):
        raise SystemExit("DiffusionCT training split overlaps the held-out patients; refusing to score it")
    bud = info["budget"]
    log.append((f"DiffusionCT (stage 1 {bud['ae_steps_done']} x {2 * b.stage1.batch}, stage 2 {bud['dm_steps_done']} "
                f"x {b.stage2.batch}; `run_demo` CPU budget)",
                {"steps": bud["ae_steps_done"] + bud["dm_steps_done"], "minutes": round((time.time() - t0) / 60, 2),
                 "final_loss": float("nan")}))  # fmt: skip
    return load_model(dct_dir / "models" / "diffusion_ct").to(dev).eval()


def score_rows(args, m: dict[str, Any], dct, test, dev) -> list:
    """(name, per-slice metrics, texture CCC, params, NFE, seconds per 256² slice) per method."""
    te_s, te_t, te_l, te_p = test
    nparams = lambda mod: sum(p.numel() for p in mod.parameters())  # noqa: E731

    def score(out_u: torch.Tensor):
        return per_slice(out_u, te_t, te_l, args.task), texture(out_u, te_t, te_l, te_p, args.task)

    def on_dev(fn):
        return lambda x: fn(x.to(dev)).cpu()

    rows = [("identity (degraded input)", *score(te_s), 0, 0, 0.0)]
    rows.append(("supervised U-Net (L1)", *score(batched(on_dev(m["sup"].restore), te_s)), nparams(m["sup"]), 1,
                 time_256(m["sup"].restore)))  # fmt: skip
    for steps in (2, 5, 10):
        for use_ema in (False, True):

            def f(x, steps=steps, use_ema=use_ema):
                gen = torch.Generator().manual_seed(0)
                return m["rddm"].sample(x.to(dev), num_steps=steps, generator=gen, use_ema=use_ema).cpu()

            rows.append((f"RDDM, {steps} steps{' (EMA)' if use_ema else ''}", *score(batched(f, te_s)),
                         nparams(m["rddm"].nets), 2 * steps, time_256(f) if not use_ema else float("nan")))  # fmt: skip
    s1, s2 = m["s1"], m["s2"]

    def fd(x):
        return s2.sample(x.to(dev), generator=torch.Generator().manual_seed(0)).cpu()

    s2_params = nparams(s2.dirformer) + nparams(s2.cpen_s2) + nparams(s2.denoiser)
    rows.append(("DiffIR (4 prior steps)", *score(batched(fd, te_s)), s2_params, "1 DIRformer + 4 MLP + CPEN", time_256(fd)))
    oracle = torch.cat([s1.sample(te_s[i : i + 16].to(dev), te_t[i : i + 16].to(dev), use_ema=False).cpu()
                        for i in range(0, te_s.shape[0], 16)])  # fmt: skip
    rows.append(("DiffIR stage 1 (oracle IPR from the target; upper bound)", *score(oracle), nparams(s1), 1, float("nan")))
    if dct is not None:
        gen = torch.Generator().manual_seed(args.seed)
        fdct = on_dev(lambda x: dct.restore(x, generator=gen))
        rows.append(("DiffusionCT stage-1 passthrough dec(enc(x))", *score(batched(on_dev(dct.autoencoder.reconstruct), te_s)),
                     nparams(dct.autoencoder), 1, float("nan")))  # fmt: skip
        steps = dct.inference_options()["num_steps"]
        rows.append((f"DiffusionCT conditional ({dct.describe()})", *score(batched(fdct, te_s)),
                     nparams(dct.autoencoder) + nparams(dct.net), f"{steps} U-Net + enc + dec", time_256(fdct)))  # fmt: skip
    return rows


def write_report(args, rows, log, test, data_line: str, results: str, dev, minutes: float) -> None:
    from medfusion.io.atomic import write_text_atomic

    te_t, te_l, te_p = test[1], test[2], test[3]
    unit = "% of range" if args.task == "sr" else "HU"
    cmd = (f".venv/bin/python bench/restoration.py --task {args.task} --patients {args.patients} --size {args.size} "
           f"--crop {args.crop} --batch {args.batch} --rddm-steps {args.rddm_steps} --unet-steps {args.unet_steps} "
           f"--s1-steps {args.s1_steps} --s2-steps {args.s2_steps} --lr {args.lr} --device {args.device}")  # fmt: skip
    lines = [f"# Restoration benchmark: {TASK_TITLES[args.task]}", "", f"Command: `{cmd}` ({minutes:.0f} min wall in all).",
             "", data_line, f"Device: {dev} ({platform.processor() or platform.machine()}, torch threads "
             f"{torch.get_num_threads()}); CPU timings are for this 2-core VM.", "",
             f"Training budget (fixed optimiser steps; random {args.crop}² crops, h-flip, Adam lr {args.lr}):", "",
             "| model | steps | batch | crop | minutes | final train loss |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name, info in log:
        lines.append(f"| {name} | {info['steps']} | {args.batch} | {args.crop}² | {info['minutes']} | {info['final_loss']:.4f} |")
    lines += ["", f"| method | PSNR (dB) | SSIM | noise SD ({unit}) | edge sharpness (1/px) | texture CCC | params | NFE "
              f"| s / 256² slice ({dev.type}) |", "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, per, tex, p, nfe, sec in rows:
        m = _average(per)
        lines.append(f"| {name} | {m['psnr']:.2f} | {m['ssim']:.4f} | {m['noise']:.1f} | {m['edge']:.3f} | {tex:.3f} | "
                     f"{p:,} | {nfe} | {sec:.3f} |")  # fmt: skip
    ref = metrics(te_t, te_t, te_l, args.task)
    lines += ["", "Texture CCC (CT tasks): median over the texture features of their concordance with the target across "
              "the held-out patients, per source protocol, averaged over protocols (1 = the target's texture).",
              f"Reference (the target itself): noise SD {ref['noise']:.1f} {unit}, edge sharpness {ref['edge']:.3f}."]  # fmt: skip
    protos = sorted(set(te_p))
    if len(protos) > 1:
        lines += ["", "PSNR (dB) per source protocol:", "", "| method | " + " | ".join(protos) + " |", "|---|" + "---|" * len(protos)]
        for name, per, *_ in rows:
            cells = [np.mean([r["psnr"] for r, q in zip(per, te_p) if q == pr]) for pr in protos]
            lines.append(f"| {name} | " + " | ".join(f"{c:.2f}" for c in cells) + " |")
    lines += ["", "RDDM NFE counts both networks (two U-Nets per step). RDDM and the U-Net share the backbone (`DiffusionUNet` "
              "channels (32, 64, 64), attention on level 3); RDDM: SM-Res-N (two networks), L1, β̄_T² = 0.01, grad clip 1, "
              "deterministic sampler (η = 0); rows with (EMA) use the 0.995 EMA (updated every step) of the weights, the "
              "others the raw weights. DiffIR: DIRformer dim 16, blocks (1,2,2,2), CPEN 32 features (IPR 128), "
              "x0-prediction prior diffusion T = 4, β 0.1 → 0.99; evaluated with raw weights."]  # fmt: skip
    write_text_atomic(results, "\n".join(lines) + "\n", overwrite=True)
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    from medfusion import keys
    from medfusion.data.builtin import FORMAT_VERSION

    args = parse_args(argv)
    # the default folder names the data format: one from an older format would be refused by make_dataset
    out = Path(args.out or f"/tmp/bench_restore_{args.task}_v{FORMAT_VERSION}")
    results = args.results or f"bench/results/restoration_{args.task}.md"
    torch.manual_seed(args.seed)
    dev = torch.device(args.device)
    t_start = time.time()
    data = load_data(args, out)
    print(data["line"], flush=True)
    g = torch.Generator().manual_seed(args.seed)
    tr_s, tr_t = data["train"]

    def batch():
        s, t = crops(tr_s, tr_t, args.batch, args.crop, g)
        return {keys.SOURCE: s.to(dev), keys.TARGET: t.to(dev)}

    log: list = []
    models = train_models(args, batch, dev, out, log)
    dct = None
    if args.task == "kernel" and not args.no_diffusionct:
        dct = train_diffusion_ct(args, out, data["manifest"], dev, log)
    torch.set_grad_enabled(False)
    rows = score_rows(args, models, dct, data["test"], dev)
    write_report(args, rows, log, data["test"], data["line"], results, dev, (time.time() - t_start) / 60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

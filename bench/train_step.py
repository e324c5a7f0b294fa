"""Training-step throughput and peak memory: our path vs MONAI's tutorial default, same network, same run.

* ``ours``: :class:`medfusion.nets.unet.DiffusionUNet` (MONAI ``DiffusionModelUNet`` with SDPA attention) under
  bf16 autocast (:func:`medfusion.nets.unet.autocast_context`), fused AdamW, no GradScaler.
* ``monai_fp16``: the MONAI tutorials' recipe — ``DiffusionModelUNet`` with its default attention
  (``use_flash_attention=False``), fp16 autocast + ``GradScaler``.
* ``monai_fp32``: default attention in fp32 (TF32 on), the anchor's runnable baseline when fp16 runs out of memory.

One step = forward (ε-prediction on q_sample'd data), MSE, backward, optimizer step. Median over ``--steps`` timed
steps after ``--warmup``; peak memory from ``torch.cuda.max_memory_allocated``. Ratios are from one run.

    .venv/bin/python bench/train_step.py                 # CUDA: 2D 256² (b 8) and 3D 64³ (b 4); skips on CPU
    .venv/bin/python bench/train_step.py --small         # CPU-sized shapes (32², 16³) to check the script runs
    .venv/bin/python bench/train_step.py --out bench/results/train_step_h100.md --overwrite
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from dataclasses import dataclass

import torch

from medfusion.diffusion.gaussian import q_sample
from medfusion.diffusion.schedules import NoiseSchedule
from medfusion.io.atomic import write_text_atomic
from medfusion.nets.unet import DiffusionUNet, autocast_context


@dataclass
class Case:
    name: str
    spatial_dims: int
    size: int
    batch: int
    channels: tuple[int, ...]
    attention_levels: tuple[bool, ...]
    num_head_channels: int
    num_res_blocks: int = 1


BIG = [
    # MONAI 2D DDPM tutorial net (gpu_anchor.md): 18.5M params
    Case("2D 256² b8", 2, 256, 8, (128, 256, 256), (False, True, True), 256),
    # 3D net of gpu_anchor.md: ch (64,128,256), attention at the lowest level
    Case("3D 64³ b4", 3, 64, 4, (64, 128, 256), (False, False, True), 256),  # 28.8M params
]
SMALL = [
    Case("2D 32² b2", 2, 32, 2, (32, 64, 64), (False, True, True), 32),
    Case("3D 16³ b1", 3, 16, 1, (32, 64, 64), (False, False, True), 32),
]


def build(case: Case, mode: str, device: torch.device) -> torch.nn.Module:
    if mode == "ours":
        net = DiffusionUNet(
            case.spatial_dims, 1, 1, channels=case.channels, attention_levels=case.attention_levels,
            num_res_blocks=case.num_res_blocks, num_head_channels=case.num_head_channels,
        )  # fmt: skip
    else:
        from monai.networks.nets import DiffusionModelUNet

        net = DiffusionModelUNet(
            spatial_dims=case.spatial_dims, in_channels=1, out_channels=1, channels=case.channels,
            attention_levels=case.attention_levels, num_res_blocks=case.num_res_blocks,
            num_head_channels=case.num_head_channels,
        )  # fmt: skip
    return net.to(device)


def step_fn(case: Case, mode: str, device: torch.device):
    torch.manual_seed(0)
    net = build(case, mode, device)
    cuda = device.type == "cuda"
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=cuda)
    sch = NoiseSchedule.create().to(device)
    x0 = torch.randn(case.batch, 1, *([case.size] * case.spatial_dims), device=device)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and mode == "monai_fp16")
    if mode == "ours":
        ctx = lambda: autocast_context(device)  # noqa: E731
    elif mode == "monai_fp16" and cuda:
        ctx = lambda: torch.autocast("cuda", dtype=torch.float16)  # noqa: E731
    else:
        ctx = contextlib.nullcontext

    def step() -> None:
        t = torch.randint(0, 1000, (case.batch,), device=device)
        noise = torch.randn_like(x0)
        with ctx():
            out = net(q_sample(x0, t, noise, sch), t)
            loss = torch.nn.functional.mse_loss(out.float(), noise)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    n_params = sum(p.numel() for p in net.parameters())
    return step, n_params


def measure(case: Case, mode: str, device: torch.device, warmup: int, steps: int) -> dict:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        step, n_params = step_fn(case, mode, device)
        for _ in range(warmup):
            step()
        times = []
        for _ in range(steps):
            if cuda:
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    except torch.OutOfMemoryError:
        return {"status": "OOM"}
    ms = 1000 * statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    return {"status": "ok", "ms": ms, "sps": case.batch / ms * 1000, "gib": peak, "params": n_params / 1e6}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--small", action="store_true", help="CPU-sized shapes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None)
    p.add_argument("--overwrite", action="store_true")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    if not cuda and not args.small:
        print("CUDA not available: skipping the 2D 256² / 3D 64³ cases (run with --small for CPU shapes).")
        return 0
    device = torch.device("cuda" if cuda else "cpu")
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    card = torch.cuda.get_device_name(device) if cuda else "CPU"
    cases = SMALL if args.small else BIG
    note = (
        ""
        if cuda
        else " On CPU there is no autocast/GradScaler: all modes run fp32 (only attention differs)."
    )
    lines = [
        f"Device: {card}; torch {torch.__version__}; warmup {args.warmup}, median of {args.steps} steps.{note}",
        "",
        "| case | mode | params (M) | step ms | samples/s | peak GiB |",
        "|---|---|---|---|---|---|",
    ]
    ratios = []
    for case in cases:
        res = {
            m: measure(case, m, device, args.warmup, args.steps) for m in ("ours", "monai_fp16", "monai_fp32")
        }
        for mode, r in res.items():
            if r["status"] != "ok":
                lines.append(f"| {case.name} | {mode} | | {r['status']} | | |")
            else:
                lines.append(
                    f"| {case.name} | {mode} | {r['params']:.1f} | {r['ms']:.1f} | {r['sps']:.1f} | {r['gib']:.2f} |"
                )
        ok = [m for m in ("monai_fp16", "monai_fp32") if res[m]["status"] == "ok"]
        if res["ours"]["status"] == "ok" and ok:
            base = ok[0]
            ratios.append(
                f"{case.name}: ours is {res[base]['ms'] / res['ours']['ms']:.2f}x faster than {base}"
                + (f", memory {res['ours']['gib']:.1f} vs {res[base]['gib']:.1f} GiB" if cuda else "")
            )
        print("\n".join(lines[-3:]), flush=True)
    text = "\n".join(lines + [""] + ratios) + "\n"
    print(text)
    if args.out:
        write_text_atomic(args.out, text, overwrite=args.overwrite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`.venv/bin/python bench/dpm_v3_tiny.py 200` (~9 min on one CPU thread): DPM-Solver-v3 on the bench's trained tiny model (bench/samplers.py train_tiny): RMS distance to a converged ODE
solution (DPM-Solver++(2M), 200 logSNR steps) from the same noise, at equal NFE."""

import os
import sys
import time
import warnings

import torch

from medfusion.data.brain import brain_mr_phantom
from medfusion.diffusion.dpm_v3 import compute_ems, degenerate_ems, load_ems, save_ems
from medfusion.diffusion.samplers import SAMPLERS
from medfusion.diffusion.schedules import NoiseSchedule, timesteps
from medfusion.nets.unet import DiffusionUNet

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from samplers import train_tiny  # noqa: E402  (the bench module beside this file)

warnings.simplefilter("ignore")
steps = int(sys.argv[1]) if len(sys.argv) > 1 else 300


cache = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"dpm_v3_tiny{steps}.pt")
if os.path.exists(cache):
    net = DiffusionUNet(
        2, 1, 1, channels=(32, 64, 64), attention_levels=(False, False, True), num_res_blocks=1
    )
    net.load_state_dict(torch.load(cache, weights_only=True))
    net.eval()
    sch = NoiseSchedule.create("linear")
    print("loaded", cache)
else:
    t0 = time.perf_counter()
    net, sch, loss, _ = train_tiny(16, 32, steps, 0)
    torch.save(net.state_dict(), cache)
    print(f"trained {steps} steps, loss {loss:.3f}, {time.perf_counter() - t0:.0f} s", flush=True)
data = torch.stack([torch.from_numpy(brain_mr_phantom((32, 32), seed=i).hu) for i in range(16)])
data = (data[:, None].float() * 2 - 1).clamp(-1, 1)

t0 = time.perf_counter()
if os.path.exists(cache + ".ems"):
    ems = load_ems(cache + ".ems")
else:
    with torch.no_grad():
        ems = compute_ems(
            net,
            data,
            sch,
            timesteps(100, "logsnr", schedule=sch),
            prediction="v",
            generator=torch.Generator().manual_seed(0),
        )
    save_ems(ems, cache + ".ems")
print(
    f"EMS (100 logSNR grid points, 16 training slices, 1 probe): {time.perf_counter() - t0:.0f} s", flush=True
)
x = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(1))
with torch.no_grad():
    ref = SAMPLERS["dpmpp_2m"](net, x, timesteps(200, "logsnr", schedule=sch), schedule=sch, prediction="v")
runs = {
    "ddim": (SAMPLERS["ddim"], {}),
    "dpmpp_2m": (SAMPLERS["dpmpp_2m"], {}),
    "dpmpp_3m": (SAMPLERS["dpmpp_3m"], {}),
    "unipc": (SAMPLERS["unipc"], {}),
    "deis": (SAMPLERS["deis"], {}),
    "dpm_v3 (EMS)": (SAMPLERS["dpm_v3"], {"stats": ems}),
    "dpm_v3 (EMS, no corrector)": (SAMPLERS["dpm_v3"], {"stats": ems, "corrector": False}),
    "dpm_v3 (EMS, order 2)": (SAMPLERS["dpm_v3"], {"stats": ems, "order": 2}),
    "dpm_v3 (l=1,s=b=0)": (SAMPLERS["dpm_v3"], {"stats": degenerate_ems(sch)}),
}
for spacing in ("logsnr", "trailing"):
    print(f"\nspacing {spacing}: RMS distance to the converged ODE solution ([-1, 1] units)\n")
    print("| sampler | NFE 5 | NFE 10 | NFE 20 |\n|---|---|---|---|")
    for name, (fn, kw) in runs.items():
        cells = []
        for n in (5, 10, 20):
            with torch.no_grad():
                out = fn(net, x, timesteps(n, spacing, schedule=sch), schedule=sch, prediction="v", **kw)
            cells.append(f"{float((out - ref).pow(2).mean().sqrt()):.4f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)

"""DPM-Solver-v3's empirical model statistics (EMS) for a trained diffusion module, stored with its export.

DPM-Solver-v3 (Zheng et al., NeurIPS 2023; :mod:`medfusion.diffusion.dpm_v3`) needs statistics of the trained
network computed once from training data. For a module that exposes

* ``diffusion_sample(batch) -> (x0, cond)``: the clean sample its DDPM learns and the condition, for a training
  batch (DiffusionCT: the scaled latent residual or latent, and the source latent);
* ``averaged(use_ema) -> nn.Module`` (the network sampled with), ``schedule`` and ``hparams.prediction``,

:func:`model_ems` estimates them on training batches and :func:`compute_model_ems` writes them next to an exported
model as ``dpm_v3_stats.safetensors``; :func:`medfusion.models.export.load_model` then loads them into
``module.dpm_v3_stats``, where ``sampler="dpm_v3"`` finds them. The batches are the ones training used, e.g.
``ManifestDataModule(...).train_dataloader()`` with the training config's data section (the manifest's training
split).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from medfusion.diffusion.dpm_v3 import EMS, Reduce, compute_ems, save_ems

STATS_FILE = "dpm_v3_stats.safetensors"

__all__ = ["STATS_FILE", "compute_model_ems", "model_ems"]


def _to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


@torch.no_grad()
def model_ems(
    module: Any,
    batches: Iterable[dict[str, Any]],
    *,
    num_batches: int | None = None,
    grid_steps: int = 100,
    num_probes: int = 1,
    reduce: Reduce = "channel",
    use_ema: bool = True,
    seed: int = 0,
) -> EMS:
    """EMS of ``module``'s (EMA) network on training ``batches`` (dicts as its ``training_step`` reads them).

    Args:
        num_batches: use at most this many batches (None = all); the diffusion samples are kept in memory.
        grid_steps: timesteps of the statistics grid, uniform in log-SNR over [0, T-1] (the official code uses
            250-1200 points on its λ grid; between points the statistics are interpolated linearly in λ).
        num_probes, reduce: as :func:`medfusion.diffusion.dpm_v3.compute_ems`.
        seed: seed of the forward noise and the Jacobian probes.
    """
    from medfusion.diffusion.schedules import timesteps

    if not hasattr(module, "diffusion_sample"):
        raise ValueError(
            f"{type(module).__name__} has no diffusion_sample(batch): DPM-Solver-v3 does not apply"
        )
    module.eval()
    device = next(module.parameters()).device
    data = []
    for i, batch in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        data.append(module.diffusion_sample(_to(batch, device)))
    if not data:
        raise ValueError("no training batches given")
    schedule = module.schedule
    grid = timesteps(min(grid_steps, schedule.num_train_timesteps), "logsnr", schedule=schedule)
    return compute_ems(
        module.averaged(use_ema), data, schedule, grid, prediction=module.hparams.prediction, reduce=reduce,
        num_probes=num_probes, generator=torch.Generator().manual_seed(seed),
    )  # fmt: skip


def compute_model_ems(
    path: str | Path, batches: Iterable[dict[str, Any]], *, overwrite: bool = False, **options: Any
) -> Path:
    """Load the exported model folder ``path``, estimate its EMS on ``batches`` (:func:`model_ems` ``options``) and
    write them to ``path / dpm_v3_stats.safetensors`` (atomic; an existing file only with ``overwrite``)."""
    from medfusion.io.atomic import check_not_overwriting
    from medfusion.models.export import CONFIG, load_model

    folder = Path(path)
    if not (folder / CONFIG).is_file():
        raise ValueError(f"{folder} is not an exported model folder (no {CONFIG}); export it first")
    check_not_overwriting(folder / STATS_FILE, overwrite)
    module = load_model(folder)
    return save_ems(model_ems(module, batches, **options), folder / STATS_FILE, overwrite=overwrite)

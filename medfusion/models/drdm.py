"""DRDM: Deformation-Recovery Diffusion Model (Zheng et al., "Deformation-Recovery Diffusion Model (DRDM): Instance
Deformation for Image Manipulation and Synthesis", arXiv 2407.07295, 2024).

Training (paper Algorithm 1): draw ``I_0`` and ``t ~ U{0..T-1}``, draw the forward fields ``Phi_t, psi_t``
(``medfusion.diffusion.deformation``), form ``I_t = warp(I_0, Phi_t)`` and train the recovery net
``r = D_theta(I_t, t)`` to invert ``psi_t`` with ``L_dist + L_ang + 10 L_reg`` (paper Fig. 4).
Deviations from the official code (docs/methods/drdm.md): ``L_reg`` uses a true Jacobian penalty
``ReLU(-det(I + grad r))`` (the official "negdetj" term is not a Jacobian determinant), and the 2D forward process
uses the geometrically consistent rescale (``legacy_scale=False``; the official 2D-256 code doubles displacements).

Sampling (Algorithm 2, :meth:`DRDM.sample`): start at level ``T'`` with ``phi = Phi_{T'}``, recover with
``recovery_steps`` network calls (``None``: the paper's ``T'`` steps; ``k``: ``k`` strided levels;
``legacy_sampler=True``: the official 80 steps), re-warping the originals every step. The generated
deformation ``phi`` is in voxels, ``(B, D, *spatial)``, array-axis order, pull convention.

Validation logs the loss at random levels, and the folding rate (% of voxels with det J <= 0) and the
displacement scale (mean / max |u| in % of image size) of fields generated from ``val_t_start``.

Batch keys read: ``image`` (``medfusion.keys.IMAGE``, ``(B, C, *spatial)``, first channel used; any intensity
range, the net min-max normalises its input); ``label`` (optional, ``(B, 1, *spatial)``) in ``predict_step``.
Randomness: every training step draws its timesteps and fields from the per-step CPU generator of
:class:`~medfusion.models.base.MedfusionModule`, seeded from (``seed``, rank, global step, micro-batch): DDP ranks
draw different fields, and a run resumed from a checkpoint draws the same fields as the uninterrupted run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.diffusion.deformation import (
    DeformationDiffusion,
    RecoveryResult,
    recover,
    recovery_losses,
    recovery_schedule,
)
from medfusion.fields import displacement_scale, folding_fraction
from medfusion.fields.warp import LabelMode, PaddingMode
from medfusion.models.base import MedfusionModule
from medfusion.nets.drdm import DRDMRecoveryNet

_PADDING = ("zeros", "border", "reflection")


class DRDM(MedfusionModule):
    """DRDM training and sampling for 2D and 3D images.

    Args:
        recovery_net: ``D_theta(x, t) -> r`` (voxels); default ``DRDMRecoveryNet(spatial_dims, recursion=recursion)``.
            An injected net is not part of the exported config: exports rebuild the default net.
        spatial_dims: 2 or 3.
        recursion: K of the default recovery net (2).
        timesteps: T (80).
        sigma, ctl_size, noise_ratio, crop_rate, legacy_scale: forward process (``DeformationDiffusion``).
        loss_padding: padding of ``r o (id + psi)`` in the loss (official: zeros for 2D cmr, border for 3D lct).
        sampler_padding: padding when accumulating ``phi`` in the sampler (same official split).
        loss_weights: (dist, ang, reg) = (1, 1, 10); ``jacobian_weight``: factor of the Jacobian term in reg (2).
        lr: Adam learning rate (1e-4, no scheduler, as the official code).
        val_t_start: ``T'`` of the fields generated in validation; ``val_recovery_steps``: their recovery steps.
        val_num_samples: how many images of each validation batch are sampled (sampling is the costly part).
        seed: base seed of the per-step training generators (a resumed run keeps its checkpoint's seed).
    """

    def __init__(
        self,
        recovery_net: nn.Module | None = None,
        spatial_dims: int = 2,
        recursion: int = 2,
        timesteps: int = 80,
        sigma: float = 4e-5,
        ctl_size: int = 64,
        noise_ratio: float = 0.08,
        crop_rate: float = 2.0,
        legacy_scale: bool = False,
        loss_padding: PaddingMode = "border",
        sampler_padding: PaddingMode = "border",
        loss_weights: tuple[float, float, float] = (1.0, 1.0, 10.0),
        jacobian_weight: float = 2.0,
        lr: float = 1e-4,
        val_t_start: int = 40,
        val_recovery_steps: int | None = 10,
        val_num_samples: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__(seed=seed)  # the per-step generators derive from this seed, not the global one
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value in (("loss_padding", loss_padding), ("sampler_padding", sampler_padding)):
            if value not in _PADDING:
                raise ValueError(f"{name}={value!r} is not valid; choose one of {', '.join(_PADDING)}")
        if not 1 <= val_t_start <= timesteps:
            raise ValueError(f"val_t_start must lie in [1, {timesteps}], got {val_t_start}")
        if len(loss_weights) != 3:
            raise ValueError(f"loss_weights must be (dist, ang, reg), got {loss_weights}")
        self.save_hyperparameters(ignore=["recovery_net"])
        self.recovery_net = recovery_net or DRDMRecoveryNet(
            spatial_dims, recursion=recursion, time_steps=timesteps
        )
        self.process = DeformationDiffusion(
            timesteps=timesteps,
            sigma=sigma,
            ctl_size=ctl_size,
            noise_ratio=noise_ratio,
            crop_rate=crop_rate,
            legacy_scale=legacy_scale,
        )

    # --- training ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        return self.recovery_net(x, t)

    def losses(self, image: Tensor, generator: torch.Generator | None = None):
        """Algorithm 1 on a batch ``image`` (B, C, *spatial): returns ``RecoveryLoss`` (total, dist, ang, grad, jacobian)."""
        x0 = image[:, :1].float()
        t = torch.randint(0, self.hparams.timesteps, (x0.shape[0],), generator=generator).to(x0.device)
        xt, fields = self.process.q_sample(x0, t, generator=generator)
        r = self.recovery_net(xt, t)
        return recovery_losses(
            r,
            fields.psi,
            padding_mode=self.hparams.loss_padding,
            weights=tuple(self.hparams.loss_weights),
            jacobian_weight=self.hparams.jacobian_weight,
        )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        image = batch[keys.IMAGE]
        loss = self.losses(image, generator=self.step_generator(batch_idx))
        bs = image.shape[0]
        self.log("train/loss", loss.total, prog_bar=True, batch_size=bs)
        self.log_dict(
            {
                "train/dist": loss.dist,
                "train/ang": loss.ang,
                "train/grad": loss.grad,
                "train/negjac": loss.jacobian,
            },
            batch_size=bs,
        )
        return loss.total

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        image = batch[keys.IMAGE]
        bs = image.shape[0]
        gen = torch.Generator().manual_seed(int(self.hparams.seed) + 7919 * batch_idx)
        loss = self.losses(image, generator=gen)
        self.log("val/loss", loss.total, batch_size=bs, sync_dist=True)
        n = min(bs, int(self.hparams.val_num_samples))
        if n < 1:
            return
        out = self.sample(
            image[:n], t_start=self.hparams.val_t_start, steps=self.hparams.val_recovery_steps, generator=gen
        )
        scale = displacement_scale(out.ddf)
        random_scale = displacement_scale(out.random_ddf)
        metrics = {
            "val/folding_pct": folding_fraction(out.ddf).mean() * 100,
            "val/disp_mean_pct": scale.mean.mean(),
            "val/disp_max_pct": scale.max.mean(),
            "val/random_folding_pct": folding_fraction(out.random_ddf).mean() * 100,
            "val/random_disp_mean_pct": random_scale.mean.mean(),
        }
        self.log_dict(metrics, batch_size=n, sync_dist=True)

    # --- sampling (Algorithm 2) -------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        image: Tensor,
        t_start: int = 40,
        steps: int | None = None,
        *,
        label: Tensor | None = None,
        label_mode: LabelMode = "nearest",
        legacy_sampler: bool = False,
        generator: torch.Generator | None = None,
        ddf: Tensor | None = None,
    ) -> RecoveryResult:
        """Generate deformations of ``image`` (B, C, *spatial) from level ``t_start`` (``T'``).

        ``steps``: recovery network calls (None = ``T'``); ``ddf``: a given starting field instead of
        ``Phi_{T'}``; ``label`` (B, 1, *spatial) is warped with the same field. Deterministic given the
        generator (or ``ddf``).
        """
        was_training = self.recovery_net.training
        self.recovery_net.eval()
        try:
            if ddf is None:
                t = torch.full((image.shape[0],), int(t_start))
                ddf = self.process.fields(
                    t, image.shape[2:], with_psi=False, generator=generator, device=image.device
                ).phi
            schedule = recovery_schedule(
                int(t_start), steps, legacy=legacy_sampler, timesteps=self.hparams.timesteps
            )
            return recover(
                lambda x, tt: self.recovery_net(x[:, :1], tt),
                image.float(),
                ddf.float(),
                schedule,
                label=label,
                label_mode=label_mode,
                padding_mode=self.hparams.sampler_padding,
            )
        finally:
            self.recovery_net.train(was_training)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> RecoveryResult:
        gen = torch.Generator().manual_seed(int(self.hparams.seed) + batch_idx)
        return self.sample(
            batch[keys.IMAGE],
            t_start=self.hparams.val_t_start,
            steps=self.hparams.val_recovery_steps,
            label=batch.get(keys.LABEL),
            generator=gen,
        )

    def configure_optimizers(self):
        return torch.optim.Adam(self.recovery_net.parameters(), lr=self.hparams.lr)

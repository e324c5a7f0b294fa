"""RDDM for image restoration (Liu et al., "Residual Denoising Diffusion Models", CVPR 2024) as a LightningModule.

Batch keys: ``keys.SOURCE`` = degraded input ``I_in`` and ``keys.TARGET`` = clean ``I_0``, both ``(B, C, *spatial)``
normalised to [-1, 1]. The residual ``I_res = I_in - I_0`` and the noise are diffused with the sum-constrained
schedule of :mod:`medfusion.diffusion.residual` (``I_t = I_0 + ᾱ_t·I_res + β̄_t·ε``); the degraded image is
concatenated to ``I_t`` as condition (``net(I_t, t, cond=I_in)``).

Networks (``layout``):

* ``two_nets`` (default; the official restoration experiment, ``UnetRes(share_encoder=0)``): one U-Net predicts
  ``Î_res`` and a second, independent one ``ε̂`` from the same input and the same integer ``t``;
* ``one_net``: a single U-Net with ``NUM_HEADS·C`` output channels. **Not a paper layout** (a medfusion variant,
  cheaper by half); single-head objectives (``res``, ``noise``) always use one network.

Training (official experiment 2): L1 summed over heads (each the per-sample-mean), ``t ~ U{0..T-1}``,
Adam(8e-5, β=(0.9, 0.99)), gradient clipping 1.0 (``trainer.gradient_clip_val`` in the YAML), EMA 0.995 updated
every 10 steps. Sampling: S-step deterministic sampler (η = 0) from ``I_T = I_in + β̄_T·z`` with ``Î_res``/``Î_0``
clipped to ``clip``. 3D volumes larger than ``sw_roi_size`` run MONAI's ``SlidingWindowInferer`` *inside every
sampling step* (both heads predicted over the whole volume, blended, then the global update), with the start noise
drawn once per volume, so overlapping windows cannot drift apart.

Networks are built from the typed init args (:class:`medfusion.nets.unet.DiffusionUNet`) so that
``medfusion.models.export.load_model`` can rebuild a trained model from its hyper-parameters; ``res_net`` /
``noise_net`` may be injected instead (tests, custom backbones; such a model is not rebuildable from YAML alone).

Training randomness (``t`` and ``ε``) comes from a fresh generator per step on the data's device, seeded from
(experiment seed, rank, global step, micro-batch) (:mod:`medfusion.models._rng`; the experiment seed is
``torch.initial_seed()`` when the module is built, i.e. ``seed_everything``'s): ranks draw different noise and a run
resumed from a checkpoint draws the same noise as the uninterrupted one (user_asks §0.12). The EMA is an
``AveragedModel`` inside the module, so the checkpoint's ``state_dict`` holds both the raw (``nets.*``) and the EMA
(``ema.module.*``) weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import lightning as L
import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.diffusion import residual as R
from medfusion.models._rng import StepRNG, StepRNGHooks

LAYOUTS = ("two_nets", "one_net")
LOSS_TYPES = ("l1", "l2")


class RDDM(StepRNGHooks, L.LightningModule):
    """Residual denoising diffusion restorer (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C (source and target).
        objective: ``res_noise`` (SM-Res-N, official restoration default), ``res`` (SM-Res, ε derived),
            ``noise`` (SM-N) or ``x0_noise``.
        layout: ``two_nets`` (paper) or ``one_net`` (variant, see module docstring).
        channels, attention_levels, num_res_blocks, num_head_channels, unet_kwargs: the U-Net(s).
        num_train_timesteps: T (1000 upstream; the sampling step count is a test-time choice).
        alpha_shape, beta_shape, schedule_ratio: schedule shapes (``residual.schedule_weights``).
        sum_scale: ``β̄_T²``: 0.01 for restoration (official default with a condition), 1 for generation-like tasks.
        num_sampling_steps: S, default for :meth:`sample`.
        eta: sampler stochasticity (η enters the variance linearly; 0 = official restoration setting).
        clip: clamp bound for ``Î_res`` and ``Î_0`` during sampling (1.0 = official [-1, 1]; None = off; widen it
            for residuals larger than half the range, e.g. metal artefacts).
        loss_type: ``l1`` (official restoration) or ``l2``.
        lr, adam_betas: Adam.
        ema_decay, ema_every: EMA of the networks (None = off), updated every ``ema_every`` optimiser steps.
        sw_roi_size, sw_batch_size, sw_overlap: sliding-window inference for volumes larger than ``sw_roi_size``.
        val_num_samples: images sampled on validation batch 0 for PSNR; val_seed: seed of validation noise.
        hu_window: intensity window (HU) the data were mapped to [-1, 1] with (used by ``medfusion restore``).
        res_net, noise_net: optional injected networks with ``forward(x, t, cond)``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        objective: R.Objective = "res_noise",
        layout: Literal["two_nets", "one_net"] = "two_nets",
        channels: Sequence[int] = (32, 64, 64),
        attention_levels: Sequence[bool] = (False, False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        unet_kwargs: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        alpha_shape: R.WeightShape = "linear_decreasing",
        beta_shape: R.WeightShape = "linear_increasing",
        schedule_ratio: float = 1.0,
        sum_scale: float = 0.01,
        num_sampling_steps: int = 5,
        eta: float = 0.0,
        clip: float | None = 1.0,
        loss_type: Literal["l1", "l2"] = "l1",
        lr: float = 8e-5,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.995,
        ema_every: int = 10,
        sw_roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        val_num_samples: int = 2,
        val_seed: int = 0,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        res_net: nn.Module | None = None,
        noise_net: nn.Module | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if objective not in R.NUM_HEADS:
            raise ValueError(f"objective={objective!r}; choose one of {', '.join(R.NUM_HEADS)}")
        if layout not in LAYOUTS:
            raise ValueError(f"layout={layout!r}; choose one of {', '.join(LAYOUTS)}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type={loss_type!r}; choose one of {', '.join(LOSS_TYPES)}")
        if sw_roi_size is not None and len(sw_roi_size) != spatial_dims:
            raise ValueError(f"sw_roi_size needs {spatial_dims} values, got {sw_roi_size}")
        self.save_hyperparameters(ignore=["res_net", "noise_net"])
        self._injected = {k for k, v in (("res_net", res_net), ("noise_net", noise_net)) if v is not None}
        self.n_heads = R.NUM_HEADS[objective]
        self.two_nets = self.n_heads == 2 and layout == "two_nets"
        out_first = in_channels if (self.two_nets or self.n_heads == 1) else self.n_heads * in_channels

        def build(out_channels: int) -> nn.Module:
            from medfusion.nets.unet import DiffusionUNet

            return DiffusionUNet(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=out_channels,
                cond_channels=in_channels,
                channels=tuple(channels),
                attention_levels=tuple(attention_levels),
                num_res_blocks=num_res_blocks,
                num_head_channels=num_head_channels,
                **(unet_kwargs or {}),
            )

        nets = {"res": res_net if res_net is not None else build(out_first)}
        if self.two_nets:
            nets["noise"] = noise_net if noise_net is not None else build(in_channels)
        elif noise_net is not None:
            raise ValueError(
                f"noise_net is only used with layout='two_nets' and a two-head objective, not {objective!r}"
            )
        self.nets = nn.ModuleDict(nets)
        self.schedule = R.residual_schedule(
            num_train_timesteps, alpha_shape, beta_shape, sum_scale=sum_scale, ratio=schedule_ratio
        )
        self.ema: nn.Module | None = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel

            from medfusion.models.callbacks import EMAAvgFn

            self.ema = AveragedModel(self.nets, multi_avg_fn=EMAAvgFn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        self._ema_step = 0  # optimiser step of the last EMA update
        self._train_rng = StepRNG()  # base seed = the experiment's seed_everything seed

    # ------------------------------------------------------------------------------------------- network
    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def hu_window(self) -> tuple[float, float]:
        return tuple(self.hparams.hu_window)  # type: ignore[return-value]

    @property
    def divisible_by(self) -> int:
        """Spatial sizes (or ``sw_roi_size``) must be multiples of this (U-Net downsampling)."""
        return 2 ** (len(self.hparams.channels) - 1) if "res_net" not in self._injected else 1

    def _nets(self, use_ema: bool) -> nn.ModuleDict:
        if use_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module  # type: ignore[return-value]
        return self.nets

    def heads(self, x_t: Tensor, t: Tensor, x_in: Tensor, use_ema: bool = False) -> Tensor:
        """Network output ``(B, n_heads·C, *spatial)`` for state ``x_t`` at code indices ``t`` (B,)."""
        nets = self._nets(use_ema)
        out = nets["res"](x_t, t, x_in)
        if self.two_nets:
            out = torch.cat([out, nets["noise"](x_t, t, x_in)], dim=1)
        return out

    def _model_fn(self, use_ema: bool, spatial: Sequence[int]) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``model(x_t, t, x_in)`` for the sampler; sliding windows inside every step when the image exceeds the ROI."""
        roi = self.hparams.sw_roi_size
        if roi is None or all(s <= r for s, r in zip(spatial, roi)):
            return lambda x_t, t, x_in: self.heads(x_t, t, x_in, use_ema)
        from monai.inferers import SlidingWindowInferer

        inferer = SlidingWindowInferer(
            roi_size=tuple(roi),
            sw_batch_size=self.hparams.sw_batch_size,
            overlap=self.hparams.sw_overlap,
            mode="gaussian",
        )
        c = self.hparams.in_channels

        def model(x_t: Tensor, t: Tensor, x_in: Tensor) -> Tensor:
            t0 = int(t[0])  # one timestep for the whole batch while sampling

            def window(w: Tensor) -> Tensor:
                tw = torch.full((w.shape[0],), t0, device=w.device, dtype=torch.long)
                return self.heads(w[:, :c], tw, w[:, c:], use_ema)

            return inferer(torch.cat([x_t, x_in], dim=1), window)

        return model

    # ------------------------------------------------------------------------------------------- training
    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Σ over heads of the per-sample-mean L1 (or L2) between heads and ``loss_targets`` (official ``p_losses``)."""
        x0, x_in = batch[keys.TARGET], batch[keys.SOURCE]
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, self.schedule.num_timesteps, (x0.shape[0],), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        x_t = R.q_sample(x0, x_in, t, self.schedule, noise)
        out = self.heads(x_t, t, x_in)
        target = R.loss_targets(self.hparams.objective, x0, x_in, noise)
        err = (out - target).abs() if self.hparams.loss_type == "l1" else (out - target) ** 2
        per_head = [e.flatten(1).mean(1).mean() for e in err.chunk(self.n_heads, dim=1)]
        return torch.stack(per_head).sum()

    def on_train_start(self) -> None:
        if self.trainer.world_size > 1:  # different noise and timesteps on every rank
            torch.manual_seed((int(torch.initial_seed()) + 7919 * self.global_rank) % 2**64)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        gen = self._train_rng.generator(self, batch_idx, batch[keys.TARGET].device)
        loss = self.loss(batch, generator=gen)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.SOURCE].shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the weights change (Lightning calls this once per optimiser step, also under gradient
        # accumulation) and before any on_train_batch_end callback: ModelCheckpoint writes there, so a checkpoint of
        # step k holds the EMA of step k and a resumed run continues the same average (user_asks §0.12)
        step = self.global_step + 1  # global_step counts the step just taken only after this hook returns
        if self.ema is not None and step > self._ema_step and step % self.hparams.ema_every == 0:
            self._ema_step = step
            self.ema.update_parameters(self.nets)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch[keys.SOURCE].shape[0]
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        self.log("val/loss", self.loss(batch, generator=gen), batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.global_rank == 0 and self.hparams.val_num_samples > 0:
            n = min(self.hparams.val_num_samples, bs)
            out = self.sample(
                batch[keys.SOURCE][:n], generator=torch.Generator().manual_seed(self.hparams.val_seed)
            )
            mse = ((out - batch[keys.TARGET][:n]) ** 2).flatten(1).mean(1).clamp_min(1e-12)
            psnr = (10 * torch.log10(4.0 / mse)).mean()  # data range 2 ([-1, 1])
            self.log("val/psnr", psnr, prog_bar=True, rank_zero_only=True, batch_size=n)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.sample(
            batch[keys.SOURCE], generator=torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        )

    def configure_optimizers(self):
        return torch.optim.Adam(
            self.nets.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas)
        )

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def sample(
        self,
        x_in: Tensor,
        *,
        num_steps: int | None = None,
        eta: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        callback: Callable[[int, Tensor, R.ResidualPrediction], None] | None = None,
    ) -> Tensor:
        """Restore ``x_in`` (B, C, *spatial) in [-1, 1] with S = ``num_steps`` network calls (per network).

        ``generator`` (CPU) makes the result reproducible; EMA weights are used once averaged.
        """
        sched = self.schedule.to(x_in.device)
        return R.sample_rddm(
            self._model_fn(use_ema, x_in.shape[2:]),
            x_in,
            sched,
            num_steps or self.hparams.num_sampling_steps,
            objective=self.hparams.objective,
            eta=self.hparams.eta if eta is None else eta,
            clip=R.clip_range(self.hparams.clip),
            generator=generator,
            callback=callback,
        )

    def restore(self, images: Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
        """Same as :meth:`sample` (the shared entry point of ``medfusion restore``)."""
        return self.sample(images, generator=generator, **kwargs)

    @property
    def nfe_per_sample(self) -> int:
        """Network evaluations per restored image at the default step count."""
        return self.hparams.num_sampling_steps * len(self.nets)

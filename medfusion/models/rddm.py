"""RDDM for image restoration (Liu et al., "Residual Denoising Diffusion Models", CVPR 2024) as a LightningModule.

Batch keys: ``keys.SOURCE`` = degraded input ``I_in`` and ``keys.TARGET`` = clean ``I_0``, both ``(B, C, *spatial)``
normalised to [-1, 1]. The residual ``I_res = I_in - I_0`` and the noise are diffused with the sum-constrained
schedule of :mod:`medfusion.diffusion.residual` (the marginal ``I_t = I_0 + ᾱ_t·I_res + β̄_t·ε``); the degraded
image is concatenated to ``I_t`` as condition (``net(I_t, t, cond=I_in)``).

Networks (``layout``): ``two_nets`` (the paper's restoration setting, official ``UnetRes(share_encoder=0)``): one
U-Net predicts ``Î_res`` and a second, independent one ``ε̂`` from the same input and the same integer ``t``;
``one_net``: one U-Net with ``NUM_HEADS·C`` output channels (not a paper layout: half the cost). Single-head
objectives (``res``, ``noise``) always use one network. The U-Nets are :class:`medfusion.nets.unet.DiffusionUNet`
built from :class:`~medfusion.models.options.UNetConfig` (so an export rebuilds them), or injected.

Training (the official restoration experiment): L1 summed over heads (each the per-sample mean),
``t ~ U{0..T-1}``, Adam, EMA of the networks every ``ema_every`` optimiser steps. Sampling (the paper's generalised DDIM step with η):
S deterministic steps (η = 0) from ``I_T = I_in + β̄_T·z``, ``Î_res`` and ``Î_0`` clipped to ``clip``. With a
sliding window (3D volumes larger than ``roi_size``) MONAI's ``SlidingWindowInferer`` runs *inside every sampling
step* (both heads predicted over the whole volume, blended, then one global update) from one start noise per
volume, so overlapping windows cannot drift apart.

:meth:`RDDM.restore` is the inference contract of :class:`medfusion.models.base.Restorer` (options ``num_steps``,
``eta``, ``sw_batch_size``, ``overlap``); :meth:`RDDM.sample` is the same with the paper's names.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.diffusion import residual as R
from medfusion.eval.image import batch_mean, psnr
from medfusion.models.base import MedfusionModule
from medfusion.models.options import (
    SlidingWindow,
    UNetConfig,
    check_roi_size,
    config_of,
    regroup,
    run_windows,
    store_plain,
)

LAYOUTS = ("two_nets", "one_net")
LOSS_TYPES = ("l1", "l2")


@dataclass
class ResidualScheduleConfig:
    """The sum-constrained coefficient schedule (:func:`medfusion.diffusion.residual.residual_schedule`).

    Args:
        num_train_timesteps: T (1000 upstream; the sampling step count is chosen at test time).
        alpha_shape, beta_shape: shapes of the α and β² weights (``residual.schedule_weights``).
        ratio: shape parameter of the weights (1 = the official linear ones).
        sum_scale: ``β̄_T²``: 0.01 for restoration (the official default with a condition), 1 for generation.
    """

    num_train_timesteps: int = 1000
    alpha_shape: R.WeightShape = "linear_decreasing"
    beta_shape: R.WeightShape = "linear_increasing"
    ratio: float = 1.0
    sum_scale: float = 0.01

    def build(self) -> R.ResidualSchedule:
        return R.residual_schedule(
            self.num_train_timesteps,
            self.alpha_shape,
            self.beta_shape,
            sum_scale=self.sum_scale,
            ratio=self.ratio,
        )


# flat init args of medfusion 0.1 -> (group, key in the group)
_LEGACY = {
    "channels": ("unet", "channels"),
    "attention_levels": ("unet", "attention_levels"),
    "num_res_blocks": ("unet", "num_res_blocks"),
    "num_head_channels": ("unet", "num_head_channels"),
    "num_train_timesteps": ("schedule", "num_train_timesteps"),
    "alpha_shape": ("schedule", "alpha_shape"),
    "beta_shape": ("schedule", "beta_shape"),
    "schedule_ratio": ("schedule", "ratio"),
    "sum_scale": ("schedule", "sum_scale"),
    "sw_roi_size": ("sliding_window", "roi_size"),
    "sw_batch_size": ("sliding_window", "batch_size"),
    "sw_overlap": ("sliding_window", "overlap"),
}


class RDDM(MedfusionModule):
    """Residual denoising diffusion restorer (see the module docstring).

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels C (source and target).
        objective: ``res_noise`` (SM-Res-N, the official restoration default), ``res`` (SM-Res, ε derived),
            ``noise`` (SM-N) or ``x0_noise``.
        layout: ``two_nets`` (paper) or ``one_net`` (see the module docstring).
        unet: widths and blocks of the U-Net(s) (ignored for an injected network).
        schedule: the coefficient schedule.
        num_sampling_steps: S, the default of ``num_steps`` in :meth:`sample` / :meth:`restore`.
        eta: default sampler stochasticity (η enters the variance linearly; 0 = the official restoration setting).
        clip: clamp bound for ``Î_res`` and ``Î_0`` during sampling (1.0 = [-1, 1] as upstream; None = off; widen
            it for residuals larger than half the range, e.g. metal artefacts).
        loss_type: ``l1`` (official restoration) or ``l2``.
        lr, adam_betas: Adam.
        ema_decay, ema_every: EMA of the networks (None = off), updated every ``ema_every`` optimiser steps.
        sliding_window: default window size (None: whole inputs), windows per call and overlap of inference.
        val_num_samples: images sampled on validation batch 0 for PSNR; val_seed: seed of validation noise.
        hu_window: HU window the data were mapped to [-1, 1] with (used by ``medfusion restore``).
        res_net, noise_net: injected networks ``forward(x, t, cond)`` (not part of exported configs).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        objective: R.Objective = "res_noise",
        layout: Literal["two_nets", "one_net"] = "two_nets",
        unet: UNetConfig = UNetConfig(),
        schedule: ResidualScheduleConfig = ResidualScheduleConfig(),
        num_sampling_steps: int = 5,
        eta: float = 0.0,
        clip: float | None = 1.0,
        loss_type: Literal["l1", "l2"] = "l1",
        lr: float = 8e-5,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.995,
        ema_every: int = 10,
        sliding_window: SlidingWindow = SlidingWindow(),
        val_num_samples: int = 2,
        val_seed: int = 0,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        res_net: nn.Module | None = None,
        noise_net: nn.Module | None = None,
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        for name, value, valid in (
            ("objective", objective, tuple(R.NUM_HEADS)),
            ("layout", layout, LAYOUTS),
            ("loss_type", loss_type, LOSS_TYPES),
        ):
            if value not in valid:
                raise ValueError(f"{name}={value!r}; choose one of {', '.join(valid)}")
        if num_sampling_steps < 1:
            raise ValueError(f"num_sampling_steps must be >= 1, got {num_sampling_steps}")
        self.unet_config = config_of(UNetConfig, unet, "unet")
        schedule_config = config_of(ResidualScheduleConfig, schedule, "schedule")
        self.window = config_of(SlidingWindow, sliding_window, "sliding_window")
        if self.window.roi_size is not None and len(self.window.roi_size) != spatial_dims:
            raise ValueError(
                f"sliding_window.roi_size needs {spatial_dims} values, got {self.window.roi_size}"
            )
        self.save_hyperparameters(ignore=["res_net", "noise_net"])
        store_plain(self.hparams, unet=self.unet_config, schedule=schedule_config, sliding_window=self.window)
        self._injected = res_net is not None
        self.n_heads = R.NUM_HEADS[objective]
        self.two_nets = self.n_heads == 2 and layout == "two_nets"
        if noise_net is not None and not self.two_nets:
            raise ValueError(
                f"noise_net is only used with layout='two_nets' and a two-head objective, not {objective!r}"
            )
        out_first = in_channels if (self.two_nets or self.n_heads == 1) else self.n_heads * in_channels
        build = self.unet_config.build
        nets = {"res": res_net or build(spatial_dims, in_channels, out_first, cond_channels=in_channels)}
        if self.two_nets:
            nets["noise"] = noise_net or build(
                spatial_dims, in_channels, in_channels, cond_channels=in_channels
            )
        self.nets = nn.ModuleDict(nets)
        self.schedule = schedule_config.build()
        self.init_ema(ema_decay, "nets", every=ema_every)

    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """medfusion 0.1 exports had flat U-Net, schedule and sliding-window arguments: regroup them."""
        args = regroup(init_args, _LEGACY, cls.__name__)
        unet_kwargs = args.pop("unet_kwargs", None)
        if unet_kwargs:
            args["unet"] = {**(args.get("unet") or {}), **unet_kwargs}
        return args

    # ------------------------------------------------------------------------------------------- network
    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def divisible_by(self) -> int:
        """Spatial sizes (and window sizes) must be multiples of this (U-Net downsampling)."""
        return 1 if self._injected else self.unet_config.divisible_by

    def heads(self, x_t: Tensor, t: Tensor, x_in: Tensor, use_ema: bool = False) -> Tensor:
        """Network output ``(B, n_heads·C, *spatial)`` for state ``x_t`` at code indices ``t`` (B,)."""
        nets = self.averaged(use_ema)
        out = nets["res"](x_t, t, x_in)
        if self.two_nets:
            out = torch.cat([out, nets["noise"](x_t, t, x_in)], dim=1)
        return out

    def _model_fn(self, use_ema: bool, window: SlidingWindow) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
        """``model(x_t, t, x_in)`` for the sampler, by sliding windows inside every step when ``window`` is set."""
        c = self.hparams.in_channels

        def model(x_t: Tensor, t: Tensor, x_in: Tensor) -> Tensor:
            t0 = int(t[0])  # one timestep for the whole batch while sampling

            def heads(w: Tensor) -> Tensor:
                tw = torch.full((w.shape[0],), t0, device=w.device, dtype=torch.long)
                return self.heads(w[:, :c], tw, w[:, c:], use_ema)

            x = torch.cat([x_t, x_in], dim=1)
            return run_windows(heads, x, window.roi_size, window.batch_size, window.overlap)

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

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch, generator=self.step_generator(batch_idx, batch[keys.TARGET].device))
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.SOURCE].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch[keys.SOURCE].shape[0]
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        self.log("val/loss", self.loss(batch, generator=gen), batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.global_rank == 0 and self.hparams.val_num_samples > 0:
            n = min(self.hparams.val_num_samples, bs)
            out = self.sample(
                batch[keys.SOURCE][:n], generator=torch.Generator().manual_seed(self.hparams.val_seed)
            )
            value = batch_mean(psnr, out.clamp(-1, 1), batch[keys.TARGET][:n], 2.0)
            self.log("val/psnr", value, prog_bar=True, rank_zero_only=True, batch_size=n)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        return self.sample(batch[keys.SOURCE], generator=gen)

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
        window: SlidingWindow | None = None,
        callback: Callable[[int, Tensor, R.ResidualPrediction], None] | None = None,
    ) -> Tensor:
        """Restore ``x_in`` ``(B, C, *spatial)`` in [-1, 1] with S = ``num_steps`` network calls (per network).

        ``generator`` (CPU) makes the result reproducible; EMA weights are used once averaged; ``window``: the
        sliding window (default: the ``sliding_window`` hyper-parameter).
        """
        return R.sample_rddm(
            self._model_fn(use_ema, self.window if window is None else window),
            x_in,
            self.schedule.to(x_in.device),
            num_steps or self.hparams.num_sampling_steps,
            objective=self.hparams.objective,
            eta=self.hparams.eta if eta is None else eta,
            clip=R.clip_range(self.hparams.clip),
            generator=generator,
            callback=callback,
        )

    def inference_options(self) -> dict[str, Any]:
        return {
            "num_steps": int(self.hparams.num_sampling_steps),
            "eta": float(self.hparams.eta),
            "sw_batch_size": self.window.batch_size,
            "overlap": self.window.overlap,
        }

    def check_options(self, **options: Any) -> None:
        valid = self.inference_options()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"RDDM takes no option {', '.join(unknown)}; valid: {', '.join(valid)}")
        steps = options.get("num_steps", 1)
        if not 1 <= steps <= self.schedule.num_timesteps:
            raise ValueError(f"num_steps must be in 1..{self.schedule.num_timesteps}, got {steps}")
        if options.get("eta", 0.0) < 0:
            raise ValueError(f"eta must be >= 0, got {options['eta']}")
        SlidingWindow(None, options.get("sw_batch_size", 1), options.get("overlap", 0.0))

    def describe(self, **options: Any) -> str:
        opts = {**self.inference_options(), **options}
        eta = f", eta {opts['eta']:g}" if opts["eta"] else ""
        return f"RDDM restoration, {opts['num_steps']} steps{eta}"

    def restore(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        roi_size: Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """:class:`~medfusion.models.base.Restorer` contract: :meth:`sample` with the options as call arguments.

        ``roi_size``: sliding-window size (None: the model's ``sliding_window.roi_size``).
        """
        self.check_options(**options)
        check_roi_size(roi_size, self.spatial_dims, self.divisible_by)
        opts = {**self.inference_options(), **options}
        window = SlidingWindow(
            tuple(roi_size) if roi_size is not None else self.window.roi_size,
            opts["sw_batch_size"],
            opts["overlap"],
        )
        return self.sample(
            images, num_steps=opts["num_steps"], eta=opts["eta"], generator=generator, window=window
        )

    @property
    def nfe_per_sample(self) -> int:
        """Network evaluations per restored image at the default step count."""
        return self.hparams.num_sampling_steps * len(self.nets)

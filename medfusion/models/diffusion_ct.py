"""DiffusionCT stage 2: a latent DDPM that maps CT of any protocol to the standard protocol, with the stage-1
encoder-decoder (:mod:`medfusion.models.diffusion_ct_autoencoder`) frozen (Selim et al., "DiffusionCT: Latent
Diffusion Model for CT Image Standardization", arXiv 2301.08815; "Latent Diffusion Model for Medical Image
Standardization and Enhancement", arXiv 2310.05237).

The DDPM (Ho et al. 2020, "Denoising Diffusion Probabilistic Models": forward process eq. 4, loss eq. 14; here with
``v``-, ``epsilon``- or ``x0``-prediction and the schedules of :mod:`medfusion.diffusion`) runs on the scaled stage-1
latent ``z = s mu`` (Rombach et al. 2022, "High-Resolution Image Synthesis with Latent Diffusion Models"). Two modes:

* ``conditional`` (paired data, the paper's): the denoiser sees the noised sample concatenated with the source
  latent ``z_src``. With ``residual=True`` the diffused quantity is ``x0 = r (z_std - z_src)``, the latent change,
  with its own scale ``r = 1 / std(z_std - z_src)`` calibrated on the first training batch (buffer
  ``residual_scale``); else ``x0 = z_std``.
* ``translate`` (unpaired: standard scans only, under ``target`` or ``image``): an unconditional DDPM on standard
  latents; at inference the source latent is noised to ``t_start = strength (T - 1)`` with ``q(x_t | x_0)`` (eq. 4)
  and denoised from there (SDEdit, Meng et al. 2022, "SDEdit: Guided Image Synthesis and Editing with Stochastic
  Differential Equations"). ``strength = 0`` returns the plain reconstruction.

Regression (``regression``, conditional residual mode; after CorrDiff, Mardani et al. 2025, "Residual corrective
diffusion modeling for km-scale atmospheric downscaling", arXiv 2309.15214): a gated regression U-Net ``mu``
(:class:`medfusion.nets.unet.GatedUNet`) learns the conditional mean ``E[r (z_std - z_src) | z_src]`` with an MSE
loss and the DDPM diffuses what is left, ``x0 = r (z_std - z_src) - mu(z_src)``; sampling returns
``z_src + (x0 + mu) / r``. Unlike CorrDiff, which trains ``mu`` first and freezes it, both nets train in the same
step (the DDPM's target uses ``mu`` detached), so the method stays one stage. ``mean_only`` decodes
``z_src + mu / r``, the posterior-mean estimate (no sampled texture).

Image grid (``pixel_shuffle = k``): the denoiser and the regression U-Net run on the ``2^k`` times finer grid
(:class:`medfusion.nets.latent_grid.ImageGrid`: channel-to-space in, space-to-channel out). With DC-AE's lossless
shortcut latent (Chen et al., "Deep Compression Autoencoder for Efficient High-Resolution Diffusion Models", ICLR
2025) and ``k = log2 f`` they see the image grid; the diffusion itself stays in the latent.

Decoding (``decode``): ``"latent"`` returns ``D(z_hat)`` (the paper); ``"residual"`` returns
``D(z_hat) + G_sigma * (x - D(E(x)))``: the autoencoder's error on the input (low-passed by a Gaussian of
``residual_sigma`` pixels when > 0) is added back, so an unchanged latent returns the input exactly and what the
latent cannot represent is kept from the input rather than replaced.

Inference is the :class:`medfusion.models.base.Restorer` contract (:meth:`DiffusionCT.restore`); 3D sliding windows
share one initial latent noise field (:mod:`medfusion.models.sliding`). Sampling uses
:func:`medfusion.diffusion.samplers.sample` with the EMA copy of the denoiser, optionally through DeepCache
(``cache_interval``, :mod:`medfusion.nets.deepcache`) and the Time-Shift sampler (``time_shift``,
:mod:`medfusion.diffusion.time_shift`); docs/samplers.md.

Batch keys read: ``source`` and ``target`` (conditional), ``target`` or ``image`` (translate), ``(B, 1, *spatial)``
in [-1, 1]. Options and the measurements behind them: docs/methods/diffusion_ct.md.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion import keys
from medfusion.diffusion.gaussian import Prediction
from medfusion.diffusion.schedules import BetaSchedule
from medfusion.models._diffusion_ct_legacy import upgrade_v01_stage2_config, upgrade_v01_stage2_state
from medfusion.models.base import MedfusionModule, cosine_schedule
from medfusion.models.diffusion_ct_autoencoder import AdversarialConfig, DiffusionCTAutoencoder
from medfusion.models.diffusion_ct_config import (
    MODES,
    OPTIONS,
    DenoiserConfig,
    Mode,
    RegressionConfig,
    SamplingConfig,
    check_choice,
)
from medfusion.models.export import module_config
from medfusion.nets.autoencoder import Encoded

__all__ = [
    "AdversarialConfig", "DenoiserConfig", "DiffusionCT", "DiffusionCTAutoencoder", "Encoded", "RegressionConfig",
    "SamplingConfig",
]  # fmt: skip

def _config(cls: type, value: Any) -> Any:
    """A config dataclass from itself, a mapping of its fields (exported configs) or None."""
    return cls(**value) if isinstance(value, dict) else value


class DiffusionCT(MedfusionModule):
    """DiffusionCT stage 2: latent DDPM with the stage-1 encoder-decoder frozen (module docstring).

    Args:
        autoencoder: path of the trained :class:`DiffusionCTAutoencoder`: a Lightning ``.ckpt`` or an export folder
            (:func:`medfusion.models.export.export_model`). Loaded without pickle and frozen.
        mode: ``"conditional"`` (paired source / target) or ``"translate"`` (standard scans only; SDEdit).
        denoiser: the denoising U-Net (:class:`DenoiserConfig`).
        schedule: noise schedule kind; ``num_train_timesteps``: T.
        prediction: the network's target (``epsilon``, ``v``, ``x0``).
        min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023), None = off.
        residual: conditional mode: diffuse ``r (z_std - z_src)`` instead of ``z_std``.
        regression: conditional residual mode: the regression U-Net (:class:`RegressionConfig`), None = off.
        pixel_shuffle: ``k``: the denoiser and the regression run on the ``2^k`` finer grid (``ImageGrid``).
        sampling: defaults of :meth:`restore`'s options (:class:`SamplingConfig`).
        lr, weight_decay: AdamW; ``ema_decay``: decay of the EMA copy used for sampling (None = no EMA).
        val_num_samples: images standardized per validation epoch on rank 0 for PSNR / SSIM (0 = none).
        seed: seed of validation sampling.
        autoencoder_config: ``{"class_path", "init_args"}`` of stage 1; filled in automatically, so that a
            checkpoint or export of this model rebuilds stage 1 from its own weights (the path is then not needed).

    The config dataclasses also accept a mapping of their fields (as exported ``config.yaml`` files hold them).
    """

    def __init__(
        self,
        autoencoder: str | None = None,
        mode: Mode = "conditional",
        denoiser: DenoiserConfig = DenoiserConfig(),
        schedule: BetaSchedule = "linear",
        num_train_timesteps: int = 1000,
        prediction: Prediction = "v",
        min_snr_gamma: float | None = None,
        residual: bool = True,
        regression: RegressionConfig | None = None,
        pixel_shuffle: int = 0,
        sampling: SamplingConfig = SamplingConfig(),
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.999,
        val_num_samples: int = 4,
        seed: int = 0,
        autoencoder_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        from medfusion.diffusion.gaussian import PREDICTIONS
        from medfusion.diffusion.schedules import BETA_SCHEDULES, NoiseSchedule

        check_choice("mode", mode, MODES)
        check_choice("prediction", prediction, PREDICTIONS)
        check_choice("schedule", schedule, BETA_SCHEDULES)
        self.save_hyperparameters()
        self.denoiser = _config(DenoiserConfig, denoiser)
        self.regression = _config(RegressionConfig, regression)
        self.sampling = _config(SamplingConfig, sampling)
        if self.regression is not None and not (mode == "conditional" and residual):
            raise ValueError(
                "regression needs mode='conditional' and residual=True (it learns the mean of z_std - z_src)"
            )
        if self.sampling.mean_only and self.regression is None:
            raise ValueError("sampling.mean_only needs a model trained with a regression (regression=...)")
        for name in ("denoiser", "regression", "sampling"):  # YAML-plain hyper-parameters (export, checkpoints)
            value = getattr(self, name)
            self.hparams[name] = None if value is None else asdict(value)
        self.autoencoder = self._stage1(autoencoder, autoencoder_config)
        self.hparams["autoencoder_config"] = module_config(self.autoencoder)
        self.spatial_dims = int(self.autoencoder.hparams.spatial_dims)
        self.net, self.regressor = self._networks(mode, pixel_shuffle)
        self.schedule = NoiseSchedule.create(kind=schedule, num_train_timesteps=num_train_timesteps)
        self.init_ema(ema_decay, "net")
        # r = 1 / std(z_std - z_src): calibrated on the first training batch (0 = not yet)
        self.register_buffer("residual_scale", torch.zeros(()))
        # DPM-Solver-v3's statistics of these weights (medfusion.models.dpm_v3_stats; set by load_model)
        self.dpm_v3_stats: Any = None

    @staticmethod
    def _stage1(path: str | None, config: dict[str, Any] | None) -> DiffusionCTAutoencoder:
        from medfusion.models.export import build_from_config, load_model

        if config is not None:
            ae = build_from_config(config)
        elif path is not None:
            ae = load_model(path)
        else:
            raise ValueError("DiffusionCT needs the trained stage 1: pass autoencoder=PATH (.ckpt or export folder)")
        if not isinstance(ae, DiffusionCTAutoencoder):
            raise ValueError(f"autoencoder must be a DiffusionCTAutoencoder, got {type(ae).__name__}")
        ae.requires_grad_(False)
        return ae.eval()

    def _networks(self, mode: str, k: int) -> tuple[nn.Module, nn.Module | None]:
        """The denoiser and the regression U-Net (or None), on the latent grid or the ``2^k`` finer one."""
        from medfusion.nets.latent_grid import grid_channels, on_grid
        from medfusion.nets.unet import DiffusionUNet, GatedUNet

        c = grid_channels(self.autoencoder.latent_channels, self.spatial_dims, k)
        d = self.denoiser
        unet = DiffusionUNet(
            spatial_dims=self.spatial_dims, in_channels=c, out_channels=c, cond_channels=c if mode == "conditional" else 0,
            channels=tuple(d.channels), attention_levels=tuple(d.attention_levels), num_res_blocks=d.num_res_blocks,
            num_head_channels=d.num_head_channels, norm_num_groups=d.norm_num_groups, resblock_updown=d.resblock_updown,
        )  # fmt: skip
        if self.regression is None:
            return on_grid(unet, k), None
        return on_grid(unet, k), on_grid(GatedUNet(self.spatial_dims, c, self.regression.channels), k)

    # -------------------------------------------------------------------------------- properties
    def train(self, mode: bool = True):  # the frozen stage 1 always stays in eval mode
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def hu_window(self) -> tuple[float, float] | None:
        """HU window of the training data (the stage-1 autoencoder's)."""
        return self.autoencoder.hu_window

    @property
    def uses_residual(self) -> bool:
        return self.hparams.mode == "conditional" and bool(self.hparams.residual)

    @property
    def divisible_by(self) -> int:
        """Input spatial sizes must be multiples of this (autoencoder and U-Net downsampling)."""
        levels = len(self.denoiser.channels)
        if self.regression is not None:
            levels = max(levels, len(self.regression.channels))
        # the networks run on a 2^k finer grid than the latent (pixel_shuffle = k)
        return self.autoencoder.downsample_factor * 2 ** max(0, levels - 1 - self.hparams.pixel_shuffle)

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the latent of images ``(B, C, *spatial)`` (spatial sizes multiples of :attr:`divisible_by`)."""
        f = self.autoencoder.downsample_factor
        c = self.autoencoder.latent_channels
        return (int(image_shape[0]), c, *(int(s) // f for s in image_shape[2:]))

    # -------------------------------------------------------------------------------- training
    def _training_images(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        """``(source, standard)`` images of a batch. Conditional mode needs pairs (``source`` + ``target``); translate
        mode needs only standard-protocol scans, under ``target`` (a paired manifest) or ``image`` (an ``image``-task
        manifest of standard scans, the unpaired case), and returns ``source = None``."""
        if self.hparams.mode == "translate":
            for k in (keys.TARGET, keys.IMAGE):
                if k in batch:
                    return None, batch[k]
            raise ValueError(
                f"translate mode trains on standard-protocol scans under {keys.TARGET!r} or {keys.IMAGE!r}; "
                f"the batch has {sorted(batch)}"
            )
        if keys.SOURCE not in batch or keys.TARGET not in batch:
            raise ValueError(
                f"conditional mode trains on pairs ({keys.SOURCE!r} + {keys.TARGET!r}, a standardize manifest); "
                f"the batch has {sorted(batch)}; for standard scans alone use mode='translate'"
            )
        return batch[keys.SOURCE], batch[keys.TARGET]

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        src, tgt = self._training_images(batch)
        z_tgt, _ = self.autoencoder.encode_latent(tgt)
        z_src = None if src is None else self.autoencoder.encode_latent(src)[0]
        return z_src, z_tgt

    @torch.no_grad()
    def _calibrate_residual(self, z_src: Tensor, z_tgt: Tensor) -> None:
        """``r = 1 / std(z_std - z_src)`` over the batch, its variance averaged over DDP ranks (one value)."""
        var = (z_tgt - z_src).detach().float().var()
        trainer = self._trainer  # None outside Lightning
        if trainer is not None and trainer.world_size > 1:
            var = trainer.strategy.reduce(var, reduce_op="mean")
        self.residual_scale.copy_(var.clamp_min(1e-12).rsqrt())

    @torch.no_grad()
    def diffusion_sample(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor | None]:
        """The clean sample ``x0`` the DDPM learns on a training batch and its condition (for DPM-Solver-v3's
        statistics, :mod:`medfusion.models.dpm_v3_stats`)."""
        if self.uses_residual and self.residual_scale <= 0:
            raise RuntimeError("residual_scale is not calibrated: train the model (or call loss() on a batch) first")
        z_src, z_tgt = self._latents(batch)
        mean = self.regressor(z_src) if self.regressor is not None else None
        return self.diffusion_target(z_src, z_tgt, mean)

    def diffusion_target(
        self, z_src: Tensor | None, z_tgt: Tensor, mean: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Clean sample ``x0`` that the DDPM models and its condition, per mode (module docstring); ``mean`` is the
        regression U-Net's output, subtracted from the scaled residual."""
        if self.hparams.mode == "translate":
            return z_tgt, None
        if self.uses_residual:
            x0 = (z_tgt - z_src) * self.residual_scale
            return (x0 if mean is None else x0 - mean), z_src
        return z_tgt, z_src

    def losses(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(diffusion, regression)`` losses on one batch: the DDPM loss (Ho et al. 2020, eq. 14, for the
        ``prediction`` target) and the regression U-Net's MSE to the scaled residual (0 without regression)."""
        from medfusion.diffusion.gaussian import diffusion_loss, q_sample

        hp = self.hparams
        z_src, z_tgt = self._latents(batch)
        if self.uses_residual and self.residual_scale <= 0:
            self._calibrate_residual(z_src, z_tgt)
        reg_loss, mean = z_tgt.new_zeros(()), None
        if self.regressor is not None:
            mean = self.regressor(z_src)
            reg_loss = F.mse_loss(mean, (z_tgt - z_src) * self.residual_scale)
            mean = mean.detach()  # the DDPM's target does not train the regression (CorrDiff)
        x0, cond = self.diffusion_target(z_src, z_tgt, mean)
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(0, hp.num_train_timesteps, (x0.shape[0],), generator=generator, device=dev)
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        out = self.net(q_sample(x0, t, noise, self.schedule), t, cond)
        dm_loss = diffusion_loss(
            out, x0, noise, t, self.schedule, hp.prediction, min_snr_gamma=hp.min_snr_gamma
        )
        return dm_loss, reg_loss

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Training objective on one batch: the sum of :meth:`losses`."""
        return sum(self.losses(batch, generator))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = self._training_images(batch)[1]
        dm_loss, reg_loss = self.losses(batch, generator=self.step_generator(batch_idx, x.device))
        self.log("train/loss", dm_loss + reg_loss, prog_bar=True, batch_size=x.shape[0])
        if self.regressor is not None:
            self.log("train/regression_loss", reg_loss, batch_size=x.shape[0])
        return dm_loss + reg_loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from medfusion.eval.image import batch_mean, psnr, ssim

        bs = self._training_images(batch)[1].shape[0]
        gen = torch.Generator().manual_seed(self.hparams.seed + batch_idx)
        self.log("val/loss", self.loss(batch, generator=gen), batch_size=bs, sync_dist=True)
        paired = keys.SOURCE in batch and keys.TARGET in batch  # unpaired translate data: no PSNR to report
        if paired and batch_idx == 0 and self.global_rank == 0 and self.hparams.val_num_samples > 0:
            n = min(self.hparams.val_num_samples, bs)
            gen = torch.Generator().manual_seed(self.hparams.seed)
            out = self.standardize(batch[keys.SOURCE][:n], generator=gen).clamp(-1, 1)
            ref = batch[keys.TARGET][:n]
            self.log("val/psnr", batch_mean(psnr, out, ref, 2.0), prog_bar=True, rank_zero_only=True, batch_size=n)
            self.log("val/ssim", batch_mean(ssim, out, ref, 2.0), rank_zero_only=True, batch_size=n)

    def configure_optimizers(self):
        groups: list[dict[str, Any]] = [{"params": list(self.net.parameters())}]
        if self.regressor is not None:
            groups.append({"params": list(self.regressor.parameters()), "lr": self.regression.lr or self.hparams.lr})
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return cosine_schedule(self, opt)

    # -------------------------------------------------------------------------------- inference contract
    def inference_options(self) -> dict[str, Any]:
        """The options of :meth:`restore` this model takes, with its defaults."""
        s = self.sampling
        opts: dict[str, Any] = {
            "num_steps": s.num_steps, "sampler": s.sampler, "cache_interval": s.cache_interval, "time_shift": s.time_shift,
        }  # fmt: skip
        if self.hparams.mode == "translate":
            opts["strength"] = s.strength
        opts.update(decode=s.decode, residual_sigma=s.residual_sigma)
        if self.regressor is not None:
            opts["mean_only"] = s.mean_only
        opts.update(sw_batch_size=s.sw_batch_size, overlap=s.overlap)
        return opts

    def check_options(self, **options: Any) -> None:
        """``ValueError`` for an option this model cannot take (unknown, out of range, or not for this model)."""
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"unknown DiffusionCT option(s) {unknown}; valid: {', '.join(self.inference_options())}")
        if options.get("strength") is not None and self.hparams.mode != "translate":
            raise ValueError(f"strength applies to translate-mode models only; this is a {self.hparams.mode} model")
        if options.get("mean_only") and self.regressor is None:
            raise ValueError("mean_only=True needs a model trained with a regression (regression=...)")
        given = {k: v for k, v in options.items() if v is not None and k != "mean_only"}
        SamplingConfig(**{**asdict(self.sampling), **given})  # range and name checks of every value
        if (options.get("sampler") or self.sampling.sampler) == "dpm_v3" and self.dpm_v3_stats is None:
            raise ValueError(
                "sampler dpm_v3 needs the model's statistics: compute them with "
                "medfusion.models.dpm_v3_stats.compute_model_ems(export_folder, training_batches)"
            )

    def describe(self, **options: Any) -> str:
        """One provenance line, e.g. ``DiffusionCT standardization, dpmpp_2m 20 steps, residual decoding``."""
        o = {**self.inference_options(), **{k: v for k, v in options.items() if v is not None}}
        if o.get("mean_only"):
            how = "regression mean (no sampling)"
        else:
            how = f"{o['sampler']} {o['num_steps']} steps" + (
                f", strength {o['strength']:g}" if "strength" in o else ""
            )
            how += f", DeepCache every {o['cache_interval']}" if o["cache_interval"] > 1 else ""
            how += f", time shift window {o['time_shift']}" if o["time_shift"] > 0 else ""
        return f"DiffusionCT standardization, {how}, {o['decode']} decoding"

    def restore(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        roi_size: Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """:class:`medfusion.models.base.Restorer`: standardized ``images`` (same shape and range).

        Without ``roi_size`` the whole input is one call of :meth:`standardize`. With it, windows of that size
        (multiples of :attr:`divisible_by`) are standardized and blended (:func:`medfusion.models.sliding.sliding_windows`),
        all starting from crops of one latent noise field drawn from ``generator`` for the whole input.
        """
        from medfusion.models.sliding import sliding_windows

        self.check_options(**options)
        sw_batch_size = options.pop("sw_batch_size", None) or self.sampling.sw_batch_size
        overlap = options.pop("overlap", None)
        overlap = self.sampling.overlap if overlap is None else overlap
        if roi_size is None:
            return self.standardize(images, generator=generator, **options)
        field = self._noise(self.latent_shape(images.shape), generator, images.device, images.dtype)

        def window(x: Tensor, noise: Tensor | None) -> Tensor:
            return self.standardize(x, generator=generator, noise=noise, **options)

        return sliding_windows(
            images, roi_size, window, multiple=self.divisible_by, sw_batch_size=sw_batch_size, overlap=overlap,
            field=field, factor=self.autoencoder.downsample_factor,
        )  # fmt: skip

    @staticmethod
    def _noise(shape: Sequence[int], generator: torch.Generator | None, device: Any, dtype: Any) -> Tensor:
        """Standard normal noise, drawn on the CPU when a (CPU) generator is given, on ``device`` otherwise."""
        dev = "cpu" if generator is not None else device
        return torch.randn(tuple(shape), generator=generator, device=dev).to(device, dtype)

    @torch.no_grad()
    def standardize(
        self,
        images: Tensor,
        *,
        num_steps: int | None = None,
        sampler: str | None = None,
        strength: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        decode: str | None = None,
        residual_sigma: float | None = None,
        mean_only: bool | None = None,
        noise: Tensor | None = None,
        cache_interval: int | None = None,
        time_shift: int | None = None,
    ) -> Tensor:
        """Standardize ``images`` ``(B, 1, *spatial)`` in [-1, 1] (spatial sizes multiples of :attr:`divisible_by`).

        Options left None take the model's :class:`SamplingConfig` defaults; ``generator`` (CPU) makes the result
        reproducible. ``noise`` (the source latent's shape, :meth:`latent_shape`) replaces the sampler's initial
        noise draw (translate mode: the noise of ``q(x_t | x_0)``); :meth:`restore` passes crops of one field to
        overlapping windows. ``mean_only`` (regression models): decode the regression's mean, no DDPM (None: the
        model's default, :attr:`SamplingConfig.mean_only`).
        ``cache_interval`` (DeepCache) and ``time_shift`` (window) as in :class:`SamplingConfig`.
        """
        self.check_options(
            num_steps=num_steps, sampler=sampler, strength=strength, decode=decode, residual_sigma=residual_sigma,
            mean_only=mean_only, cache_interval=cache_interval, time_shift=time_shift,
        )  # fmt: skip
        if images.ndim != self.spatial_dims + 2 or any(s % self.divisible_by for s in images.shape[2:]):
            raise ValueError(
                f"expected (B, C, *spatial) with {self.spatial_dims} spatial sizes that are multiples of "
                f"{self.divisible_by}, got shape {tuple(images.shape)}"
            )
        s = self.sampling
        was_training = self.training
        self.eval()
        x = images.to(self.device, self.dtype)
        z_src, skips = self.autoencoder.encode_latent(x)
        if noise is not None and tuple(noise.shape) != tuple(z_src.shape):
            raise ValueError(f"noise must have the latent's shape {tuple(z_src.shape)}, got {tuple(noise.shape)}")
        first = noise.to(z_src.device, z_src.dtype) if noise is not None else None
        steps = num_steps or s.num_steps
        how = {
            "sampler": sampler or s.sampler, "cache_interval": cache_interval or s.cache_interval,
            "time_shift": s.time_shift if time_shift is None else time_shift,
        }  # fmt: skip
        if self.hparams.mode == "translate":
            how_far = s.strength if strength is None else strength
            z = self._translate(z_src, steps, how, how_far, generator, first, use_ema)
        else:
            mean = s.mean_only if mean_only is None else mean_only
            z = self._conditional(z_src, steps, how, generator, first, mean, use_ema)
        sigma = s.residual_sigma if residual_sigma is None else residual_sigma
        out = self._decode(x, z, z_src, skips, decode or s.decode, sigma)
        self.train(was_training)
        return out

    def _sample(self, x_t: Tensor, ts: Tensor, how: dict, cond: Tensor | None, generator, use_ema: bool) -> Tensor:
        """Run the sampler ``how["sampler"]`` on the (EMA) denoiser, through DeepCache and the Time-Shift wrapper
        when ``how["cache_interval"] > 1`` / ``how["time_shift"] > 0``."""
        from medfusion.diffusion.samplers import sample
        from medfusion.diffusion.time_shift import time_shift_model
        from medfusion.nets.deepcache import deep_cache

        net, s, prediction = self.averaged(use_ema), self.sampling, self.hparams.prediction
        model = net
        if how["time_shift"] > 0:
            model = time_shift_model(
                net, self.schedule, prediction=prediction, window=how["time_shift"], cutoff=s.time_shift_cutoff,
                data_variance=s.time_shift_variance,
            )  # fmt: skip
        extra = {"stats": self.dpm_v3_stats} if how["sampler"] == "dpm_v3" else {}
        with deep_cache(net, how["cache_interval"]):
            return sample(
                how["sampler"], model, x_t, ts, schedule=self.schedule, prediction=prediction, cond=cond,
                generator=generator, **extra,
            )  # fmt: skip

    def _translate(self, z_src, steps, how, strength, generator, first, use_ema) -> Tensor:
        """SDEdit: noise ``z_src`` to ``t_start = round(strength (T - 1))`` (eq. 4) and denoise from there in at most
        ``t_start + 1`` steps; ``t_start = 0`` returns ``z_src``."""
        from medfusion.diffusion.gaussian import q_sample
        from medfusion.diffusion.schedules import timesteps

        T = self.hparams.num_train_timesteps
        t_start = int(round(strength * (T - 1)))
        if t_start <= 0:
            return z_src
        spacing = self.sampling.timestep_spacing
        ts = timesteps(min(steps, t_start + 1), spacing, T, t_start=t_start, schedule=self.schedule).to(z_src.device)
        t0 = torch.full((z_src.shape[0],), int(ts[0]), device=z_src.device, dtype=torch.long)
        eps = first if first is not None else self._noise(z_src.shape, generator, z_src.device, z_src.dtype)
        return self._sample(q_sample(z_src, t0, eps, self.schedule), ts, how, None, generator, use_ema)

    def _conditional(self, z_src, steps, how, generator, first, mean_only, use_ema) -> Tensor:
        """The DDPM's sample ``x0`` given ``z_src`` (plus the regression's mean) mapped back to a latent."""
        from medfusion.diffusion.schedules import timesteps

        if self.uses_residual and self.residual_scale <= 0:
            raise RuntimeError("residual_scale is not calibrated: train the model (or call loss() on a batch) first")
        mean = self.regressor(z_src) if self.regressor is not None else None
        if mean_only:
            x0 = mean
        else:
            ts = timesteps(steps, self.sampling.timestep_spacing, schedule=self.schedule).to(z_src.device)
            start = first if first is not None else self._noise(z_src.shape, generator, z_src.device, z_src.dtype)
            x0 = self._sample(start, ts, how, z_src, generator, use_ema)
            x0 = x0 if mean is None else x0 + mean
        return z_src + x0 / self.residual_scale if self.uses_residual else x0

    def _decode(self, x: Tensor, z: Tensor, z_src: Tensor, skips, how: str, sigma: float) -> Tensor:
        """``D(z)`` (latent) or ``D(z) + G_sigma * (x - D(z_src))`` (residual; ``sigma = 0``: no low-pass)."""
        out = self.autoencoder.decode_latent(z, skips)
        if how == "latent":
            return out
        error = x - self.autoencoder.decode_latent(z_src, skips)
        if sigma > 0:
            from monai.networks.layers import GaussianFilter

            error = GaussianFilter(self.spatial_dims, sigma).to(error.device)(error)
        return out + error

    def forward(self, images: Tensor) -> Tensor:
        return self.standardize(images)

    # -------------------------------------------------------------------------------- old exports
    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """Flat init args of medfusion 0.1 -> the grouped ones (``ValueError`` for removed options in use)."""
        return upgrade_v01_stage2_config(init_args)

    def upgrade_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """0.1 weights: stage 1's keys as :meth:`DiffusionCTAutoencoder.upgrade_state_dict`, and with
        ``pixel_shuffle`` the networks inside their :class:`~medfusion.nets.latent_grid.ImageGrid` (``.net.``)."""
        return upgrade_v01_stage2_state(self, state)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "state_dict" in checkpoint:  # resuming a 0.1 run: Lightning loads the weights after this hook
            checkpoint["state_dict"] = self.upgrade_state_dict(checkpoint["state_dict"])

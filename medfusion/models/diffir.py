"""DiffIR for image restoration (Xia et al., "DiffIR: Efficient Diffusion Model for Image Restoration", ICCV 2023).

Two LightningModules, one per training stage (both read ``keys.SOURCE`` = degraded LQ and ``keys.TARGET`` = GT,
``(B, C, *spatial)`` in [-1, 1]; upstream uses [0, 1], the networks are range-agnostic):

* :class:`DiffIRStage1` (DiffIR_S1, paper §3.2): ``Z = CPEN_S1(LQ, GT)`` (the IPR, a ``4·n_feats`` vector) modulates
  a :class:`~medfusion.nets.diffir.DIRformer`; ``L1(DIRformer(LQ, Z), GT)``. A stage-1 model needs the GT: it is
  the teacher, not a restorer.
* :class:`DiffIRStage2` (DiffIR_S2, §3.3): ``D = CPEN_S2(LQ)``; a 4-step x0-predicting diffusion over the IPR
  (:mod:`medfusion.diffusion.prior`) estimates ``Ẑ ≈ Z``; ``Î = DIRformer(LQ, Ẑ)``. Initialised from the stage-1
  checkpoint (``torch.load(weights_only=True)``, EMA weights preferred as upstream's ``params_ema``): the DIRformer
  weights are copied, CPEN_S1 is kept frozen in eval mode as the teacher that recomputes ``Z`` every iteration;
  CPEN_S2 and the denoiser start random. Two phases (upstream ``DiffIR_S2_model.py``): while ``global_step <
  encoder_steps`` only CPEN_S2 + denoiser step on ``L_diff = L1(Ẑ, Z)`` (the DIRformer is untouched); afterwards
  every stage-2 parameter steps on ``L_rec + L_diff``. The KD-KL term upstream only logs and is not
  part of the loss.

Inference uses only stage-2 parts: CPEN_S2, 4 denoiser MLP calls and one DIRformer pass. Inputs larger than the
sliding window are processed by MONAI's sliding-window inferer; each window gets its own Ẑ (the IPR is one global
vector per input), blended with Gaussian weights. :meth:`DiffIRStage2.restore` is the inference contract of
:class:`medfusion.models.base.Restorer` (options ``sw_batch_size``, ``overlap``).

Training randomness: stage 1 draws none; stage 2 draws the IPR noise ``ε`` from the per-step generator of
:class:`~medfusion.models.base.MedfusionModule`. Both keep an EMA of their trained networks (``ema.module.*``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from medfusion import keys
from medfusion.diffusion import prior as P
from medfusion.eval.image import batch_mean, psnr
from medfusion.models.base import MedfusionModule
from medfusion.models.options import (
    SlidingWindow,
    check_roi_size,
    config_of,
    regroup,
    run_windows,
    store_plain,
)
from medfusion.nets.diffir import CPENConfig, DIRformerConfig, IPRDenoiser


@dataclass
class PriorConfig:
    """The stage-2 IPR diffusion (:func:`medfusion.diffusion.prior.prior_schedule`) and its denoiser MLP.

    Args:
        timesteps: T of the IPR diffusion (4 upstream).
        linear_start, linear_end: β range of its linear schedule (0.1, 0.99 upstream).
        denoise_layers: hidden layers of the denoiser MLP (1 upstream).
    """

    timesteps: int = 4
    linear_start: float = 0.1
    linear_end: float = 0.99
    denoise_layers: int = 1


# flat init args of medfusion 0.1 -> (group, key in the group)
_LEGACY_NETS = {
    **{
        k: ("dirformer", k)
        for k in ("dim", "num_blocks", "num_refinement_blocks", "heads", "ffn_expansion_factor")
    },
    "bias": ("dirformer", "bias"),
    "norm_type": ("dirformer", "norm_type"),
    "cpen_downscale": ("cpen", "downscale"),
    "n_feats": ("cpen", "n_feats"),
    "n_encoder_res": ("cpen", "n_encoder_res"),
    "sw_roi_size": ("sliding_window", "roi_size"),
    "sw_batch_size": ("sliding_window", "batch_size"),
    "sw_overlap": ("sliding_window", "overlap"),
}
_LEGACY_PRIOR = {
    "prior_timesteps": ("prior", "timesteps"),
    "linear_start": ("prior", "linear_start"),
    "linear_end": ("prior", "linear_end"),
    "n_denoise_layers": ("prior", "denoise_layers"),
}


def _options(module: Any, spatial_dims: int, dirformer: Any, cpen: Any, sliding_window: Any) -> None:
    """Typed option groups on ``module`` (``dirformer_config``, ``cpen_config``, ``window``), checked."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    module.dirformer_config = config_of(DIRformerConfig, dirformer, "dirformer")
    module.cpen_config = config_of(CPENConfig, cpen, "cpen")
    module.window = config_of(SlidingWindow, sliding_window, "sliding_window")
    roi = module.window.roi_size
    if roi is not None and len(roi) != spatial_dims:
        raise ValueError(f"sliding_window.roi_size needs {spatial_dims} values, got {roi}")


def _divisible_by(cpen: CPENConfig) -> int:
    """Spatial sizes must be multiples of this (three 2x downsamplings and the CPEN unshuffle)."""
    return math.lcm(8, int(cpen.downscale))


class DiffIRStage1(MedfusionModule):
    """DiffIR_S1: CPEN_S1 + DIRformer trained jointly with L1 (needs GT at inference: the stage-2 teacher).

    Args:
        spatial_dims, in_channels: 2D/3D and image channels.
        dirformer: the DIRformer's widths and blocks (:class:`~medfusion.nets.diffir.DIRformerConfig`).
        cpen: the prior extraction network (:class:`~medfusion.nets.diffir.CPENConfig`; IPR of ``4·n_feats``).
        lr, adam_betas: Adam (upstream 2e-4, (0.9, 0.99) for SR; deblurring uses (0.9, 0.999)).
        ema_decay: EMA of all trainable weights (0.999 upstream; None = off).
        sliding_window: window of validation / :meth:`sample` for large volumes (None: whole inputs).
        val_num_samples: images restored on validation batch 0 for PSNR.
        hu_window: HU window mapped to [-1, 1] (used by ``medfusion restore``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dirformer: DIRformerConfig = DIRformerConfig(),
        cpen: CPENConfig = CPENConfig(),
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.999,
        sliding_window: SlidingWindow = SlidingWindow(),
        val_num_samples: int = 2,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        _options(self, spatial_dims, dirformer, cpen, sliding_window)
        self.save_hyperparameters()
        store_plain(
            self.hparams, dirformer=self.dirformer_config, cpen=self.cpen_config, sliding_window=self.window
        )
        self.cpen = self.cpen_config.build(spatial_dims, in_channels, use_target=True)
        self.dirformer = self.dirformer_config.build(spatial_dims, in_channels, self.cpen_config.ipr_dim)
        self.init_ema(ema_decay, "cpen", "dirformer")

    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """medfusion 0.1 exports had flat DIRformer, CPEN and sliding-window arguments: regroup them."""
        return regroup(init_args, _LEGACY_NETS, cls.__name__)

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def divisible_by(self) -> int:
        return _divisible_by(self.cpen_config)

    def forward(self, lq: Tensor, gt: Tensor, use_ema: bool = False) -> Tensor:
        parts = self.averaged(use_ema)
        return parts["dirformer"](lq, parts["cpen"](lq, gt))

    def loss(self, batch: dict[str, Any]) -> Tensor:
        return F.l1_loss(self(batch[keys.SOURCE], batch[keys.TARGET]), batch[keys.TARGET])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.SOURCE].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch[keys.SOURCE].shape[0]
        self.log("val/loss", self.loss(batch), batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.hparams.val_num_samples > 0:
            n = min(self.hparams.val_num_samples, bs)
            out = self.sample(batch[keys.SOURCE][:n], batch[keys.TARGET][:n])
            value = batch_mean(psnr, out.clamp(-1, 1), batch[keys.TARGET][:n], 2.0)
            self.log("val/psnr", value, prog_bar=True, rank_zero_only=True, batch_size=n)

    @torch.no_grad()
    def sample(self, lq: Tensor, gt: Tensor, use_ema: bool = True) -> Tensor:
        """Oracle restoration with the GT-derived IPR (upper bound for stage 2)."""
        c, w = lq.shape[1], self.window
        fn = lambda x: self(x[:, :c], x[:, c:], use_ema)  # noqa: E731
        return run_windows(fn, torch.cat([lq, gt], 1), w.roi_size, w.batch_size, w.overlap)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.sample(batch[keys.SOURCE], batch[keys.TARGET])

    def configure_optimizers(self):
        params = [*self.cpen.parameters(), *self.dirformer.parameters()]
        return torch.optim.Adam(params, lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas))


def load_stage1_weights(path: str | Path) -> dict[str, Tensor]:
    """``{"cpen.*", "dirformer.*"}`` weights of a stage-1 Lightning ``.ckpt`` or export folder, EMA preferred.

    Loaded without pickle (``torch.load(weights_only=True)`` / safetensors).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stage-1 checkpoint not found: {path}")
    try:
        if path.is_dir() or path.name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(str(path / "model.safetensors" if path.is_dir() else path))
        else:
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
            state = ckpt.get("state_dict", ckpt)
    except Exception as err:  # noqa: BLE001 - unreadable or not plain data: say which file
        raise ValueError(f"{path} is not a readable stage-1 checkpoint or export: {err}") from err
    ema_prefix = "ema.module."
    n_avg = state.get("ema.n_averaged")
    use_ema = n_avg is not None and int(n_avg) > 0 and any(k.startswith(ema_prefix) for k in state)
    prefix = ema_prefix if use_ema else ""
    out = {
        k[len(prefix) :]: v
        for k, v in state.items()
        if k.startswith(prefix + "cpen.") or k.startswith(prefix + "dirformer.")
    }
    if not any(k.startswith("dirformer.") for k in out):
        raise ValueError(f"{path} holds no DiffIR stage-1 weights (no 'dirformer.*' tensors)")
    return out


class DiffIRStage2(MedfusionModule):
    """DiffIR_S2: CPEN_S2 + IPR diffusion + DIRformer, initialised from stage 1 (see the module docstring).

    Args:
        stage1: stage-1 ``.ckpt`` or export folder. Its DIRformer initialises ours and its CPEN_S1 becomes the frozen
            teacher. After loading, the path is dropped from the hyper-parameters (the weights live in this model's
            own state dict), so a stage-2 checkpoint or export rebuilds without the stage-1 file. ``None`` = random
            (tests, or when the weights come from a stage-2 checkpoint).
        spatial_dims, in_channels, dirformer, cpen: as :class:`DiffIRStage1` (must match the stage-1 model).
        prior: the IPR diffusion and its denoiser.
        encoder_steps: phase-1 length (optimiser steps training only CPEN_S2 + denoiser; 100k upstream for
            deblurring and RealSR, 0 for SR).
        lr_encoder, lr, adam_betas: Adam of phase 1 and phase 2.
        ema_decay, sliding_window, val_num_samples, hu_window: as stage 1; val_seed seeds validation noise.
    """

    def __init__(
        self,
        stage1: str | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dirformer: DIRformerConfig = DIRformerConfig(),
        cpen: CPENConfig = CPENConfig(),
        prior: PriorConfig = PriorConfig(),
        encoder_steps: int = 100,
        lr_encoder: float = 2e-4,
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.999,
        sliding_window: SlidingWindow = SlidingWindow(),
        val_num_samples: int = 2,
        val_seed: int = 0,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        if encoder_steps < 0:
            raise ValueError(f"encoder_steps must be >= 0, got {encoder_steps}")
        _options(self, spatial_dims, dirformer, cpen, sliding_window)
        self.prior_config = config_of(PriorConfig, prior, "prior")
        self.save_hyperparameters()
        store_plain(
            self.hparams, dirformer=self.dirformer_config, cpen=self.cpen_config, prior=self.prior_config,
            sliding_window=self.window,
        )  # fmt: skip
        self.automatic_optimization = False
        ipr_dim, pc = self.cpen_config.ipr_dim, self.prior_config
        self.cpen_s1 = self.cpen_config.build(spatial_dims, in_channels, use_target=True)
        self.dirformer = self.dirformer_config.build(spatial_dims, in_channels, ipr_dim)
        self.cpen_s2 = self.cpen_config.build(spatial_dims, in_channels, use_target=False)
        self.denoiser = IPRDenoiser(ipr_dim, pc.denoise_layers, pc.timesteps)
        self.prior = P.prior_schedule(pc.timesteps, pc.linear_start, pc.linear_end)
        if stage1 is not None:
            self._load_stage1(stage1)
            self.hparams["stage1"] = None
        self.cpen_s1.requires_grad_(False)
        self.cpen_s1.eval()
        self.init_ema(ema_decay, "dirformer", "cpen_s2", "denoiser")

    def _load_stage1(self, stage1: str) -> None:
        state = load_stage1_weights(stage1)
        try:
            self.cpen_s1.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("cpen.")})
            self.dirformer.load_state_dict(
                {k[10:]: v for k, v in state.items() if k.startswith("dirformer.")}
            )
        except RuntimeError as err:
            raise ValueError(f"stage-1 weights in {stage1} do not match this architecture: {err}") from err

    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """medfusion 0.1 exports had flat DIRformer, CPEN, prior and sliding-window arguments: regroup them."""
        return regroup(init_args, {**_LEGACY_NETS, **_LEGACY_PRIOR}, cls.__name__)

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def divisible_by(self) -> int:
        return _divisible_by(self.cpen_config)

    def train(self, mode: bool = True):  # the stage-1 teacher always stays in eval mode
        super().train(mode)
        self.cpen_s1.eval()
        return self

    @property
    def phase(self) -> int:
        """1 while only CPEN_S2 + denoiser train (``global_step < encoder_steps``), else 2."""
        return 1 if self.global_step < self.hparams.encoder_steps else 2

    # ------------------------------------------------------------------------------------------- training
    def losses(
        self, batch: dict[str, Any], phase: int, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``l_diff = L1(Ẑ, Z)``; in phase 2 also ``l_rec = L1(DIRformer(LQ, Ẑ), GT)``; ``total`` is their sum."""
        lq, gt = batch[keys.SOURCE], batch[keys.TARGET]
        with torch.no_grad():
            z = self.cpen_s1(lq, gt)
        z_hat = P.prior_train_forward(self.denoiser, z, self.cpen_s2(lq), self.prior, generator=generator)
        out = {"l_diff": F.l1_loss(z_hat, z)}
        if phase == 2:
            out["l_rec"] = F.l1_loss(self.dirformer(lq, z_hat), gt)
        out["total"] = out["l_diff"] + out.get("l_rec", 0.0)
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        opt_e, opt_g = self.optimizers()
        phase = self.phase
        opt = opt_e if phase == 1 else opt_g
        # the IPR noise is a (B, 4·n_feats) vector: drawn on the CPU, as prior_train_forward does
        losses = self.losses(batch, phase, generator=self.step_generator(batch_idx))
        total = losses["total"]
        if phase == 1:
            # the DIRformer is idle in phase 1: a zero-weighted term gives each of its parameters a (zero) gradient,
            # so DDP (find_unused_parameters=False) does not fail on parameters that took no part in the step
            total = total + 0.0 * sum(p.sum() for p in self.dirformer.parameters())
        opt.zero_grad()
        self.manual_backward(total)
        opt.step()
        self.update_ema(self.global_step)  # manual optimisation: Lightning calls no optimizer_step hook
        bs = batch[keys.SOURCE].shape[0]
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=bs)
        self.log("train/l_diff", losses["l_diff"], batch_size=bs)
        self.log("train/phase", float(phase), batch_size=bs)
        return losses["total"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch[keys.SOURCE].shape[0]
        gen = torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        self.log("val/loss", self.losses(batch, 2, generator=gen)["total"], batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.hparams.val_num_samples > 0:
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
        betas = tuple(self.hparams.adam_betas)
        enc = [*self.cpen_s2.parameters(), *self.denoiser.parameters()]
        opt_e = torch.optim.Adam(enc, lr=self.hparams.lr_encoder, betas=betas)
        opt_g = torch.optim.Adam([*self.dirformer.parameters(), *enc], lr=self.hparams.lr, betas=betas)
        return [opt_e, opt_g]

    # ------------------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def sample_ipr(
        self, lq: Tensor, generator: torch.Generator | None = None, use_ema: bool = True
    ) -> Tensor:
        """``Ẑ`` (B, ipr_dim): ``Z_T ~ N(0, I)`` then the 4 x0-prediction posterior-mean steps conditioned on CPEN_S2."""
        parts = self.averaged(use_ema)
        return P.sample_prior(parts["denoiser"], parts["cpen_s2"](lq), self.prior, generator=generator)

    @torch.no_grad()
    def sample(
        self,
        lq: Tensor,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        window: SlidingWindow | None = None,
    ) -> Tensor:
        """Restore ``lq`` (B, C, *spatial) in [-1, 1]: CPEN_S2, 4 MLP steps, one DIRformer pass (per window).

        ``window``: the sliding window (default: the ``sliding_window`` hyper-parameter).
        """
        parts = self.averaged(use_ema)
        w = self.window if window is None else window

        def restore_window(x: Tensor) -> Tensor:
            return parts["dirformer"](x, self.sample_ipr(x, generator, use_ema))

        return run_windows(restore_window, lq, w.roi_size, w.batch_size, w.overlap)

    def inference_options(self) -> dict[str, Any]:
        return {"sw_batch_size": self.window.batch_size, "overlap": self.window.overlap}

    def check_options(self, **options: Any) -> None:
        valid = self.inference_options()
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(
                f"DiffIRStage2 takes no option {', '.join(unknown)} (it always runs its "
                f"{self.prior_config.timesteps} prior steps); valid: {', '.join(valid)}"
            )
        SlidingWindow(None, options.get("sw_batch_size", 1), options.get("overlap", 0.0))

    def describe(self, **options: Any) -> str:
        return f"DiffIR restoration, {self.prior_config.timesteps} prior steps"

    def restore(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        roi_size: Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """:class:`~medfusion.models.base.Restorer` contract: :meth:`sample` with the window options as arguments.

        ``roi_size``: sliding-window size (None: the model's ``sliding_window.roi_size``).
        """
        self.check_options(**options)
        check_roi_size(roi_size, self.spatial_dims, self.divisible_by)
        opts = {**self.inference_options(), **options}
        roi = tuple(roi_size) if roi_size is not None else self.window.roi_size
        window = SlidingWindow(roi, opts["sw_batch_size"], opts["overlap"])
        return self.sample(images, generator=generator, window=window)

    @property
    def nfe_per_sample(self) -> int:
        """Network evaluations per image: CPEN_S2 + T denoiser MLP calls + one DIRformer pass."""
        return 1 + self.prior_config.timesteps + 1

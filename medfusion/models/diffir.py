"""DiffIR for image restoration (Xia et al., "DiffIR: Efficient Diffusion Model for Image Restoration", ICCV 2023).

Two LightningModules, one per training stage (both read ``keys.SOURCE`` = degraded LQ and ``keys.TARGET`` = GT,
``(B, C, *spatial)`` in [-1, 1]; upstream uses [0, 1], the networks are range-agnostic):

* :class:`DiffIRStage1` (DiffIR_S1, paper §3.2): ``Z = CPEN_S1(LQ, GT)`` (the IPR, a 256-vector) modulates a
  :class:`~medfusion.nets.diffir.DIRformer`; ``L1(DIRformer(LQ, Z), GT)``. A stage-1 model needs the GT: it is the
  teacher, not a restorer.
* :class:`DiffIRStage2` (DiffIR_S2, §3.3): ``D = CPEN_S2(LQ)``; a 4-step x0-predicting diffusion over the IPR
  (:mod:`medfusion.diffusion.prior`) estimates ``Ẑ ≈ Z``; ``Î = DIRformer(LQ, Ẑ)``. Initialised from the stage-1
  checkpoint (``torch.load(weights_only=True)``, EMA weights preferred as upstream's ``params_ema``): the DIRformer
  weights are copied, CPEN_S1 is kept frozen in eval mode as the teacher that recomputes ``Z`` every iteration;
  CPEN_S2 and the denoiser start random. Two phases (``DiffIR_S2_model.py``): while ``global_step <
  encoder_steps`` only CPEN_S2 + denoiser step on ``L_diff = L1(Ẑ, Z)`` (the DIRformer is untouched); afterwards
  every stage-2 parameter steps on ``L_rec + L_diff``. The KD-KL term upstream only logs and is not part of the loss.

Inference uses only stage-2 parts: CPEN_S2, 4 denoiser MLP calls and one DIRformer pass. Volumes larger than
``sw_roi_size`` are processed by MONAI's sliding-window inferer; each window gets its own Ẑ (the faithful choice:
the IPR is one global vector per input), blended with Gaussian weights.

Training randomness: stage 1 draws none. Stage 2 draws the IPR noise ``ε`` from a fresh CPU generator per step,
seeded from (experiment seed, rank, global step, micro-batch) (:mod:`medfusion.models._rng`; the experiment seed is
``torch.initial_seed()`` when the module is built, i.e. ``seed_everything``'s): ranks draw different noise and a run
resumed from a checkpoint draws the same noise as the uninterrupted one (user_asks §0.12). The EMA is an
``AveragedModel`` inside each module (``ema.module.*`` next to the raw weights in the checkpoint's ``state_dict``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion import keys
from medfusion.diffusion import prior as P
from medfusion.models._rng import StepRNG, StepRNGHooks
from medfusion.models.export import CKPT_CLASS_KEY, class_path
from medfusion.nets.diffir import CPEN, DIRformer, IPRDenoiser


def _ema(module: nn.Module, decay: float | None) -> nn.Module | None:
    if decay is None:
        return None
    from torch.optim.swa_utils import AveragedModel

    from medfusion.models.callbacks import EMAAvgFn

    ema = AveragedModel(module, multi_avg_fn=EMAAvgFn(decay), use_buffers=True)
    ema.requires_grad_(False)
    return ema


def _sliding(
    fn: Callable[[Tensor], Tensor],
    x: Tensor,
    sw_roi_size: Sequence[int] | None,
    sw_batch_size: int,
    overlap: float,
) -> Tensor:
    if sw_roi_size is None or all(s <= r for s, r in zip(x.shape[2:], sw_roi_size)):
        return fn(x)
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(
        tuple(sw_roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian"
    )
    return inferer(x, fn)


def _psnr(out: Tensor, ref: Tensor) -> Tensor:
    mse = ((out.clamp(-1, 1) - ref) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return (10 * torch.log10(4.0 / mse)).mean()


def _build_dirformer(h: Any) -> DIRformer:
    """DIRformer from the typed hyper-parameters shared by both stages."""
    return DIRformer(
        spatial_dims=h.spatial_dims,
        in_channels=h.in_channels,
        out_channels=h.in_channels,
        dim=h.dim,
        num_blocks=tuple(h.num_blocks),
        num_refinement_blocks=h.num_refinement_blocks,
        heads=tuple(h.heads),
        ffn_expansion_factor=h.ffn_expansion_factor,
        bias=h.bias,
        norm_type=h.norm_type,
        ipr_dim=4 * h.n_feats,
    )


def _build_cpen(h: Any, use_target: bool) -> CPEN:
    return CPEN(h.spatial_dims, h.in_channels, use_target, h.cpen_downscale, h.n_feats, h.n_encoder_res)


def _check_sliding(spatial_dims: int, sw_roi_size: Sequence[int] | None) -> None:
    if sw_roi_size is not None and len(sw_roi_size) != spatial_dims:
        raise ValueError(f"sw_roi_size needs {spatial_dims} values (one per spatial axis), got {sw_roi_size}")


def _divisible_by(h: Any) -> int:
    """Spatial sizes must be multiples of this (three 2x downsamplings and the CPEN unshuffle)."""
    return math.lcm(8, int(h.cpen_downscale))


class DiffIRStage1(L.LightningModule):
    """DiffIR_S1: CPEN_S1 + DIRformer trained jointly with L1 (needs GT at inference: the stage-2 teacher).

    Args:
        spatial_dims, in_channels: 2D/3D and image channels.
        dim, num_blocks, num_refinement_blocks, heads, ffn_expansion_factor, bias, norm_type: DIRformer
            (upstream deblurring: 48, (3,5,6,6), 4, (1,2,4,8), 2.0, False, with_bias).
        cpen_downscale, n_feats, n_encoder_res: CPEN (pixel-unshuffle 4, 64 → IPR of 256, 5 residual blocks).
        lr, adam_betas: Adam (upstream 2e-4, (0.9, 0.99) for SR; deblurring uses (0.9, 0.999)).
        ema_decay: EMA of all trainable weights (0.999 upstream; None = off).
        sw_roi_size, sw_batch_size, sw_overlap: sliding-window inference for large volumes.
        val_num_samples: images restored on validation batch 0 for PSNR.
        hu_window: intensity window (HU) mapped to [-1, 1] (used by ``medfusion restore``).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dim: int = 48,
        num_blocks: Sequence[int] = (3, 5, 6, 6),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        norm_type: Literal["with_bias", "bias_free"] = "with_bias",
        cpen_downscale: int = 4,
        n_feats: int = 64,
        n_encoder_res: int = 5,
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.999,
        sw_roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        val_num_samples: int = 2,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        _check_sliding(spatial_dims, sw_roi_size)
        self.save_hyperparameters()
        self.cpen = _build_cpen(self.hparams, use_target=True)
        self.dirformer = _build_dirformer(self.hparams)
        self.ema = _ema(nn.ModuleDict({"cpen": self.cpen, "dirformer": self.dirformer}), ema_decay)
        self._ema_step = 0  # optimiser step of the last EMA update

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def hu_window(self) -> tuple[float, float]:
        return (float(self.hparams.hu_window[0]), float(self.hparams.hu_window[1]))

    @property
    def divisible_by(self) -> int:
        return _divisible_by(self.hparams)

    def _parts(self, use_ema: bool) -> tuple[nn.Module, nn.Module]:
        if use_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module["cpen"], self.ema.module["dirformer"]
        return self.cpen, self.dirformer

    def forward(self, lq: Tensor, gt: Tensor, use_ema: bool = False) -> Tensor:
        cpen, net = self._parts(use_ema)
        return net(lq, cpen(lq, gt))

    def loss(self, batch: dict[str, Any]) -> Tensor:
        return F.l1_loss(self(batch[keys.SOURCE], batch[keys.TARGET]), batch[keys.TARGET])

    def on_fit_start(self) -> None:
        from medfusion.models._data_checks import check_hu_window

        check_hu_window(self)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.SOURCE].shape[0])
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the weights change (Lightning calls this once per optimiser step, also under gradient
        # accumulation) and before any on_train_batch_end callback: ModelCheckpoint writes there, so a checkpoint of
        # step k holds the EMA of step k (user_asks §0.12)
        step = self.global_step + 1  # global_step counts the step just taken only after this hook returns
        if self.ema is not None and step > self._ema_step:
            self._ema_step = step
            self.ema.update_parameters(nn.ModuleDict({"cpen": self.cpen, "dirformer": self.dirformer}))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = batch[keys.SOURCE].shape[0]
        self.log("val/loss", self.loss(batch), batch_size=bs, sync_dist=True)
        if batch_idx == 0 and self.hparams.val_num_samples > 0:
            n = min(self.hparams.val_num_samples, bs)
            out = self.sample(batch[keys.SOURCE][:n], batch[keys.TARGET][:n])
            self.log(
                "val/psnr",
                _psnr(out, batch[keys.TARGET][:n]),
                prog_bar=True,
                rank_zero_only=True,
                batch_size=n,
            )

    @torch.no_grad()
    def sample(self, lq: Tensor, gt: Tensor, use_ema: bool = True) -> Tensor:
        """Oracle restoration with the GT-derived IPR (upper bound for stage 2)."""
        c = lq.shape[1]
        return _sliding(
            lambda w: self(w[:, :c], w[:, c:], use_ema),
            torch.cat([lq, gt], 1),
            self.hparams.sw_roi_size,
            self.hparams.sw_batch_size,
            self.hparams.sw_overlap,
        )

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.sample(batch[keys.SOURCE], batch[keys.TARGET])

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_CLASS_KEY] = class_path(self)

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


class DiffIRStage2(StepRNGHooks, L.LightningModule):
    """DiffIR_S2: CPEN_S2 + IPR diffusion + DIRformer, initialised from stage 1 (see the module docstring).

    Args:
        stage1: stage-1 ``.ckpt`` or export folder. Its DIRformer initialises ours and its CPEN_S1 becomes the frozen
            teacher. After loading, the path is dropped from the hyper-parameters (the weights live in this model's
            own state dict), so a stage-2 checkpoint or export rebuilds without the stage-1 file. ``None`` = random
            (tests, or when the weights come from a stage-2 checkpoint).
        architecture args: as :class:`DiffIRStage1` (must match the stage-1 model).
        prior_timesteps, linear_start, linear_end: IPR diffusion (4, 0.1, 0.99 upstream).
        n_denoise_layers: hidden layers of the denoiser MLP (1 upstream).
        encoder_steps: phase-1 length (optimiser steps training only CPEN_S2 + denoiser; 100k upstream for
            deblurring and RealSR, 0 for SR).
        lr_encoder, lr: Adam learning rates of phase 1 and phase 2.
        ema_decay, sw_roi_size, sw_batch_size, sw_overlap, val_num_samples, val_seed: as stage 1; val_seed seeds validation.
    """

    def __init__(
        self,
        stage1: str | None = None,
        spatial_dims: int = 2,
        in_channels: int = 1,
        dim: int = 48,
        num_blocks: Sequence[int] = (3, 5, 6, 6),
        num_refinement_blocks: int = 4,
        heads: Sequence[int] = (1, 2, 4, 8),
        ffn_expansion_factor: float = 2.0,
        bias: bool = False,
        norm_type: Literal["with_bias", "bias_free"] = "with_bias",
        cpen_downscale: int = 4,
        n_feats: int = 64,
        n_encoder_res: int = 5,
        prior_timesteps: int = 4,
        linear_start: float = 0.1,
        linear_end: float = 0.99,
        n_denoise_layers: int = 1,
        encoder_steps: int = 100,
        lr_encoder: float = 2e-4,
        lr: float = 2e-4,
        adam_betas: tuple[float, float] = (0.9, 0.99),
        ema_decay: float | None = 0.999,
        sw_roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        sw_overlap: float = 0.25,
        val_num_samples: int = 2,
        val_seed: int = 0,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        if encoder_steps < 0:
            raise ValueError(f"encoder_steps must be >= 0, got {encoder_steps}")
        _check_sliding(spatial_dims, sw_roi_size)
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.cpen_s1 = _build_cpen(self.hparams, use_target=True)
        self.dirformer = _build_dirformer(self.hparams)
        self.cpen_s2 = _build_cpen(self.hparams, use_target=False)
        self.denoiser = IPRDenoiser(4 * n_feats, n_denoise_layers, prior_timesteps)
        self.prior = P.prior_schedule(prior_timesteps, linear_start, linear_end)
        if stage1 is not None:
            state = load_stage1_weights(stage1)
            try:
                self.cpen_s1.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("cpen.")})
                self.dirformer.load_state_dict(
                    {k[10:]: v for k, v in state.items() if k.startswith("dirformer.")}
                )
            except RuntimeError as err:
                raise ValueError(
                    f"stage-1 weights in {stage1} do not match this architecture: {err}"
                ) from err
            self.hparams["stage1"] = None
        self.cpen_s1.requires_grad_(False)
        self.cpen_s1.eval()
        self.ema = _ema(self._student(), ema_decay)
        self._train_rng = StepRNG()  # base seed = the experiment's seed_everything seed

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def hu_window(self) -> tuple[float, float]:
        return (float(self.hparams.hu_window[0]), float(self.hparams.hu_window[1]))

    @property
    def divisible_by(self) -> int:
        return _divisible_by(self.hparams)

    def _student(self) -> nn.ModuleDict:
        return nn.ModuleDict(
            {"dirformer": self.dirformer, "cpen_s2": self.cpen_s2, "denoiser": self.denoiser}
        )

    def _parts(self, use_ema: bool) -> nn.ModuleDict:
        if use_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module  # type: ignore[return-value]
        return self._student()

    def train(self, mode: bool = True):  # the stage-1 teacher always stays in eval mode
        super().train(mode)
        self.cpen_s1.eval()
        return self

    @property
    def phase(self) -> int:
        """1 while only CPEN_S2 + denoiser train (``global_step < encoder_steps``), else 2."""
        return 1 if self.global_step < self.hparams.encoder_steps else 2

    # ------------------------------------------------------------------------------------------- training
    def on_train_start(self) -> None:
        if (
            self.trainer.world_size > 1
        ):  # different prior noise on every rank (seed_everything gives all the same)
            torch.manual_seed((int(torch.initial_seed()) + 7919 * self.global_rank) % 2**64)

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
        losses = self.losses(batch, phase, generator=self._train_rng.generator(self, batch_idx))
        total = losses["total"]
        if phase == 1:
            # the DIRformer is idle in phase 1: a zero-weighted term gives each of its parameters a (zero) gradient,
            # so DDP (find_unused_parameters=False) does not fail on parameters that took no part in the step
            total = total + 0.0 * sum(p.sum() for p in self.dirformer.parameters())
        opt.zero_grad()
        self.manual_backward(total)
        opt.step()
        bs = batch[keys.SOURCE].shape[0]
        self.log("train/loss", losses["total"], prog_bar=True, batch_size=bs)
        self.log("train/l_diff", losses["l_diff"], batch_size=bs)
        self.log("train/phase", float(phase), batch_size=bs)
        if self.ema is not None:
            self.ema.update_parameters(self._student())
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
            self.log(
                "val/psnr",
                _psnr(out, batch[keys.TARGET][:n]),
                prog_bar=True,
                rank_zero_only=True,
                batch_size=n,
            )

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.sample(
            batch[keys.SOURCE], generator=torch.Generator().manual_seed(self.hparams.val_seed + batch_idx)
        )

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
        parts = self._parts(use_ema)
        return P.sample_prior(parts["denoiser"], parts["cpen_s2"](lq), self.prior, generator=generator)

    @torch.no_grad()
    def sample(self, lq: Tensor, generator: torch.Generator | None = None, use_ema: bool = True) -> Tensor:
        """Restore ``lq`` (B, C, *spatial) in [-1, 1]: CPEN_S2, 4 MLP steps, one DIRformer pass (per window)."""
        parts = self._parts(use_ema)

        def restore_window(w: Tensor) -> Tensor:
            return parts["dirformer"](w, self.sample_ipr(w, generator, use_ema))

        return _sliding(
            restore_window, lq, self.hparams.sw_roi_size, self.hparams.sw_batch_size, self.hparams.sw_overlap
        )

    def restore(self, images: Tensor, generator: torch.Generator | None = None, **kwargs: Any) -> Tensor:
        """Same as :meth:`sample` (the shared entry point of ``medfusion restore``)."""
        return self.sample(images, generator=generator, **kwargs)

    @property
    def nfe_per_sample(self) -> int:
        """Network evaluations per image: CPEN_S2 + T denoiser MLP calls + one DIRformer pass."""
        return 1 + self.hparams.prior_timesteps + 1

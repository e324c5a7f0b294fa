"""Supervised image-to-image restorer: a U-Net regressed on (source, target) pairs with an L1 loss.

The baseline every generative restorer / standardizer here is compared with: the same pairs, one network
evaluation, no sampling. The output is the input plus a learned residual, ``x_hat = x + g * net(x)``, trained with
``|x_hat - y|_1`` (L1, as in the supervised CT denoisers RED-CNN, Chen et al., IEEE TMI 36(12), 2017, and the
residual learning of DnCNN, Zhang et al., IEEE TIP 26(7), 2017). With ``rezero=True`` the gate ``g`` is a learned
scalar starting at 0 (ReZero, Bachlechner et al., UAI 2021), so training starts from the identity map, the
strongest trivial baseline for standardization; with ``rezero=False`` ``g = 1``.

The network is MONAI's ``UNet`` (residual units) built from the typed init args, or an injected ``net``
``(B, C, *spatial) -> (B, C, *spatial)`` (not rebuildable from an exported config). Adam at a constant rate.

Batch keys read: ``keys.SOURCE`` and ``keys.TARGET``, ``(B, C, *spatial)`` in [-1, 1] (the data pipeline's HU
window). Inference follows the :class:`medfusion.models.base.Restorer` contract (deterministic: the generator is
ignored; 3D ``roi_size`` runs MONAI sliding windows with Gaussian blending).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.eval.image import batch_mean, psnr, ssim
from medfusion.models.base import MedfusionModule

LOSSES = ("l1", "mse")
OPTIONS = ("sw_batch_size", "overlap")


class SupervisedRestorer(MedfusionModule):
    """Residual U-Net trained with L1 on pairs (module docstring).

    Args:
        spatial_dims, in_channels: 2D/3D and image channels (source and target).
        channels, strides, num_res_units: MONAI ``UNet`` (ignored when ``net`` is given); sizes must be multiples
            of ``prod(strides)`` (:attr:`divisible_by`).
        rezero: learned output gate starting at 0 (start from the identity); False = gate fixed at 1.
        loss: ``l1`` (default) or ``mse``.
        lr, adam_betas, weight_decay: Adam (constant rate).
        hu_window: the data pipeline's window (stored for inference; ``fit`` checks it against the DataModule).
        sw_batch_size, overlap: default sliding-window batch and overlap (fraction) of 3D inference.
        net: an injected residual network (replaces the U-Net).
    """

    def __init__(
        self,
        spatial_dims: Literal[2, 3] = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128),
        strides: Sequence[int] = (2, 2),
        num_res_units: int = 1,
        rezero: bool = True,
        loss: Literal["l1", "mse"] = "l1",
        lr: float = 1e-3,
        adam_betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.0,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        sw_batch_size: int = 4,
        overlap: float = 0.25,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        if net is None and len(strides) != len(channels) - 1:
            raise ValueError(f"strides needs len(channels) - 1 = {len(channels) - 1} values, got {tuple(strides)}")
        self._check_sw(sw_batch_size, overlap)
        self.save_hyperparameters(ignore=["net"])
        if net is None:
            from monai.networks.nets import UNet

            net = UNet(
                spatial_dims, in_channels, in_channels, channels=tuple(channels), strides=tuple(strides),
                num_res_units=num_res_units,
            )  # fmt: skip
        self.net = net
        if rezero:
            self.gate = nn.Parameter(torch.zeros(()))
        else:
            self.register_buffer("gate", torch.ones(()))
        self.spatial_dims = int(spatial_dims)

    @staticmethod
    def _check_sw(sw_batch_size: Any, overlap: Any) -> None:
        if int(sw_batch_size) < 1:
            raise ValueError(f"sw_batch_size must be >= 1, got {sw_batch_size}")
        if not 0.0 <= float(overlap) < 1.0:
            raise ValueError(f"overlap must be in [0, 1), got {overlap}")

    @property
    def divisible_by(self) -> int:
        """Spatial sizes must be multiples of this (the U-Net's total down-sampling)."""
        if self.hparams.strides is None:
            return 1
        out = 1
        for s in self.hparams.strides:
            out *= int(s)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """``x + g * net(x)``, same shape as ``x``."""
        return x + self.gate * self.net(x)

    # ------------------------------------------------------------------------------------------- training
    def loss(self, batch: dict[str, Any]) -> Tensor:
        """Mean L1 (or MSE) between ``forward(source)`` and ``target``."""
        if keys.SOURCE not in batch or keys.TARGET not in batch:
            raise ValueError(
                f"SupervisedRestorer needs {keys.SOURCE!r} and {keys.TARGET!r} in the batch (a 'standardize' or "
                f"'restore' manifest); got {sorted(batch)}"
            )
        out = self(batch[keys.SOURCE])
        fn = nn.functional.l1_loss if self.hparams.loss == "l1" else nn.functional.mse_loss
        return fn(out, batch[keys.TARGET])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.SOURCE].shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """``val/loss``, and ``val/psnr`` / ``val/ssim`` per image on [-1, 1] (data range 2, output clamped)."""
        bs = batch[keys.SOURCE].shape[0]
        out = self(batch[keys.SOURCE]).clamp(-1.0, 1.0)
        ref = batch[keys.TARGET]
        self.log("val/loss", self.loss(batch), batch_size=bs, sync_dist=True)
        self.log("val/psnr", batch_mean(psnr, out, ref, 2.0), prog_bar=True, batch_size=bs, sync_dist=True)
        if min(out.shape[2:4]) >= 11:  # SSIM's 11-pixel Gaussian window
            self.log("val/ssim", batch_mean(ssim, out, ref, 2.0), batch_size=bs, sync_dist=True)

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> Tensor:
        return self.restore(batch[keys.SOURCE])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(
            self.parameters(), lr=self.hparams.lr, betas=tuple(self.hparams.adam_betas),
            weight_decay=self.hparams.weight_decay,
        )  # fmt: skip

    # ------------------------------------------------------------------------------------------- inference
    def inference_options(self) -> dict[str, Any]:
        return {"sw_batch_size": int(self.hparams.sw_batch_size), "overlap": float(self.hparams.overlap)}

    def check_options(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ValueError(f"SupervisedRestorer has no option(s) {unknown}; valid: {list(OPTIONS)}")
        merged = {**self.inference_options(), **options}
        self._check_sw(merged["sw_batch_size"], merged["overlap"])

    def describe(self, **options: Any) -> str:
        return "supervised residual U-Net (L1 on pairs), one network evaluation"

    @torch.no_grad()
    def restore(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        roi_size: Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """Restored images ``(B, C, *spatial)`` in [-1, 1] (clamped); ``generator`` is unused (deterministic)."""
        self.check_options(**options)
        opts = {**self.inference_options(), **options}
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(f"a {self.spatial_dims}D model needs (B, C, *spatial) images, got {tuple(images.shape)}")
        if roi_size is None:
            return self(images).clamp(-1.0, 1.0)
        if self.spatial_dims != 3 or len(roi_size) != 3:
            raise ValueError(f"roi_size is for 3D models and needs 3 sizes, got {roi_size} ({self.spatial_dims}D)")
        from monai.inferers import sliding_window_inference

        out = sliding_window_inference(
            images, tuple(int(r) for r in roi_size), opts["sw_batch_size"], self, overlap=opts["overlap"],
            mode="gaussian",
        )  # fmt: skip
        return torch.as_tensor(out).clamp(-1.0, 1.0)

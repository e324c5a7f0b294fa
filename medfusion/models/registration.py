"""Pairwise deformable registration (VoxelMorph): the downstream task of DRDM's registration-training use.

VoxelMorph (Balakrishnan et al., "VoxelMorph: A Learning Framework for Deformable Medical Image Registration", IEEE
TMI 2019, eq. 2-4; diffeomorphic variant: Dalca et al., MICCAI 2018 / MedIA 2019): a U-Net maps ``(moving, fixed)``
to a stationary velocity field, integrated by scaling and squaring into a displacement ``u``; the moving image is
pulled through it, ``moved(x) = moving(x + u(x))``. MONAI's ``VoxelMorph`` network does this (backbone
``VoxelMorphUNet``, ``integration_steps`` squarings; 0 gives a plain displacement network). Loss (eq. 2-4):

    L = L_sim(fixed, moved) + smooth_weight * mean ||grad u||^2 [+ dice_weight * L_Dice(fixed label, warped label)]
        [+ supervised_weight * mean ||u - u_true||^2  when the batch holds the true field under ``ddf``]

with ``L_sim`` local normalised cross-correlation (``lncc``, MONAI ``LocalNormalizedCrossCorrelationLoss``, window
``lncc_kernel``) or ``mse`` (MONAI ``DiffusionLoss`` is the smoothness term). The optional Dice term is the
anatomy-guided variant (eq. 5), on one-hot labels warped bilinearly. The supervised term trains on pairs with a
known field, e.g. an image and its DRDM deformation (``medfusion.transforms.RandDRDMDeformd(..., ddf_key="ddf")``
applied to the moving image gives ``fixed = moving o (id + ddf)``, exactly this module's pull convention).

Validation / test: Dice per label of the nearest-warped moving label against the fixed label
(:mod:`medfusion.eval.segmentation`, labels absent from the fixed label skipped), folding % (``det(I + grad u) <=
0``) and SDlogJ (:mod:`medfusion.fields`); per-case sums and counts are summed over DDP ranks, so the logged means
are means over cases (the DataModule's evaluation sampler pads no duplicates in). Logged: ``val/dice``,
``val/dice_before`` (identity field), ``val/folding_pct``, ``val/sdlogj``, ``val/loss``.

Batch keys read: ``moving``, ``fixed`` ``(B, 1, *spatial)`` (HU-windowed to [-1, 1]); ``moving_label``,
``fixed_label`` ``(B, 1, *spatial)`` (optional in training, needed for Dice); ``ddf`` ``(B, D, *spatial)`` voxels
(optional, supervised term) with ``ddf_weight`` ``(B,)`` (optional: 0 for a pair in the batch whose field is unknown;
the term is the batch mean of weight x per-pair mean squared error). Fields: voxels, channel ``d`` along array axis ``d``, pull (``medfusion.fields``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.eval.segmentation import dice_per_case
from medfusion.models._case_means import CaseMeans, EvaluationHooks
from medfusion.models.base import MedfusionModule

SIMILARITIES = ("lncc", "mse")


class Registration(EvaluationHooks, MedfusionModule):
    """VoxelMorph registration for 2D and 3D image pairs.

    Args:
        spatial_dims: 2 or 3.
        channels, final_conv_channels: ``VoxelMorphUNet`` widths (VoxelMorph's defaults: (16, 32, 32, 32, 32, 32)
            and (16, 16)); spatial sizes must be multiples of :attr:`divisible_by` = ``2^(len(channels) // 2)``.
        integration_steps: scaling-and-squaring steps of the velocity field (7; 0 = displacement network).
        similarity: ``lncc`` or ``mse``; ``lncc_kernel``: LNCC window (9).
        smooth_weight: weight of the gradient (diffusion) regulariser (VoxelMorph's lambda: 1 with NCC).
        dice_weight: weight of the warped-label Dice term (0: unsupervised; needs ``num_label_classes``).
        supervised_weight: weight of the squared error to a known field under ``ddf`` (0: off).
        num_label_classes: label values ``0..n - 1`` for Dice (the built-in phantoms: 17).
        lr: Adam learning rate (VoxelMorph: 1e-4).
        hu_window: the data pipeline's window (``fit`` checks it against the DataModule).
        net: an injected ``(moving, fixed) -> (moved, ddf)`` network (not part of exported configs).
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        channels: Sequence[int] = (16, 32, 32, 32, 32, 32),
        final_conv_channels: Sequence[int] = (16, 16),
        integration_steps: int = 7,
        similarity: Literal["lncc", "mse"] = "lncc",
        lncc_kernel: int = 9,
        smooth_weight: float = 1.0,
        dice_weight: float = 0.0,
        supervised_weight: float = 0.0,
        num_label_classes: int = 17,
        lr: float = 1e-4,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if similarity not in SIMILARITIES:
            raise ValueError(f"similarity={similarity!r}; choose one of {', '.join(SIMILARITIES)}")
        if min(smooth_weight, dice_weight, supervised_weight) < 0:
            raise ValueError("loss weights must be >= 0")
        if net is None and len(channels) % 2:
            raise ValueError(
                f"channels needs an even number of entries (encoder + decoder), got {tuple(channels)}"
            )
        if num_label_classes < 2:
            raise ValueError(f"num_label_classes must be >= 2, got {num_label_classes}")
        self.save_hyperparameters(ignore=["net"])
        if net is None:
            from monai.networks.nets import VoxelMorph, VoxelMorphUNet

            backbone = VoxelMorphUNet(
                spatial_dims, in_channels=2, unet_out_channels=int(final_conv_channels[0]), channels=tuple(channels),
                final_conv_channels=tuple(final_conv_channels),
            )  # fmt: skip
            net = VoxelMorph(backbone, integration_steps=integration_steps, spatial_dims=spatial_dims)
        self.net = net
        from monai.losses import DiffusionLoss, LocalNormalizedCrossCorrelationLoss

        self.sim_loss: nn.Module = (
            LocalNormalizedCrossCorrelationLoss(spatial_dims=spatial_dims, kernel_size=lncc_kernel)
            if similarity == "lncc"
            else nn.MSELoss()
        )
        self.smooth_loss = DiffusionLoss()
        self._metrics = CaseMeans(self)

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def divisible_by(self) -> int:
        """Spatial sizes must be multiples of this (the backbone's down-sampling)."""
        return 2 ** (len(self.hparams.channels) // 2)

    def forward(self, moving: Tensor, fixed: Tensor) -> tuple[Tensor, Tensor]:
        """``(moved, ddf)``: the moving image pulled onto the fixed one, and the field (voxels)."""
        bad = [s for s in fixed.shape[2:] if s % self.divisible_by]
        if bad:
            raise ValueError(
                f"spatial sizes {tuple(fixed.shape[2:])} must be multiples of {self.divisible_by}"
            )
        return self.net(moving, fixed)

    def _pair(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if keys.MOVING not in batch or keys.FIXED not in batch:
            raise ValueError(
                f"registration needs {keys.MOVING!r} and {keys.FIXED!r} in the batch (a 'register' manifest); "
                f"got {sorted(batch)}"
            )
        return batch[keys.MOVING], batch[keys.FIXED]

    def _onehot(self, label: Tensor) -> Tensor:
        n = self.hparams.num_label_classes
        lab = label[:, 0].long()
        if lab.min() < 0 or lab.max() >= n:
            raise ValueError(
                f"label values must be in 0..{n - 1} (num_label_classes), got {int(lab.min())}..{int(lab.max())}"
            )
        return torch.nn.functional.one_hot(lab, n).movedim(-1, 1).float()

    def losses(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Terms of the objective (module docstring) and their weighted sum under ``total``."""
        from medfusion.fields import warp

        moving, fixed = self._pair(batch)
        moved, ddf = self(moving, fixed)
        hp = self.hparams
        out = {"similarity": self.sim_loss(moved, fixed), "smooth": self.smooth_loss(ddf)}
        total = out["similarity"] + hp.smooth_weight * out["smooth"]
        if hp.dice_weight > 0:
            if keys.MOVING_LABEL not in batch or keys.FIXED_LABEL not in batch:
                raise ValueError(
                    f"dice_weight > 0 needs {keys.MOVING_LABEL!r} and {keys.FIXED_LABEL!r} in the batch"
                )
            from monai.losses import DiceLoss

            warped = warp(self._onehot(batch[keys.MOVING_LABEL]), ddf, mode="bilinear")
            out["dice"] = DiceLoss(include_background=False)(warped, self._onehot(batch[keys.FIXED_LABEL]))
            total = total + hp.dice_weight * out["dice"]
        if hp.supervised_weight > 0 and keys.DDF in batch:
            err = ((ddf - batch[keys.DDF]) ** 2).flatten(1).mean(1)  # per pair
            if keys.DDF_WEIGHT in batch:  # pairs without a known field carry weight 0
                w = torch.as_tensor(batch[keys.DDF_WEIGHT], dtype=err.dtype, device=err.device)
                if w.shape != err.shape:
                    raise ValueError(f"{keys.DDF_WEIGHT!r} must have shape {tuple(err.shape)} (one per pair), "
                                     f"got {tuple(w.shape)}")  # fmt: skip
                err = err * w
            out["supervised"] = err.mean()
            total = total + hp.supervised_weight * out["supervised"]
        out["total"] = total
        return out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        parts = self.losses(batch)
        bs = batch[keys.MOVING].shape[0]
        self.log("train/loss", parts["total"], prog_bar=True, batch_size=bs)
        for k, v in parts.items():
            if k != "total":
                self.log(f"train/{k}", v, batch_size=bs)
        return parts["total"]

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        from medfusion.fields import folding_fraction, sdlogj, warp_labels

        moving, fixed = self._pair(batch)
        _, ddf = self(moving, fixed)
        bs = moving.shape[0]
        self.log(f"{stage}/loss", self.losses(batch)["total"], batch_size=bs, sync_dist=True)
        self._metrics.update(stage, "folding_pct", 100 * folding_fraction(ddf).reshape(bs, 1))
        self._metrics.update(stage, "sdlogj", sdlogj(ddf).reshape(bs, 1))
        if keys.MOVING_LABEL in batch and keys.FIXED_LABEL in batch:
            n = self.hparams.num_label_classes
            ml, fl = batch[keys.MOVING_LABEL].long(), batch[keys.FIXED_LABEL].long()
            self._metrics.update(stage, "dice", dice_per_case(warp_labels(ml, ddf, mode="nearest"), fl, n))
            self._metrics.update(stage, "dice_before", dice_per_case(ml, fl, n))

    def _log_epoch(self, stage: str) -> None:
        widths = {"folding_pct": 1, "sdlogj": 1, "dice": self.hparams.num_label_classes - 1}
        widths["dice_before"] = widths["dice"]
        for name, width in widths.items():
            if (
                name.startswith("dice")
                and not self._metrics.seen(stage, name)
                and not self._metrics.distributed
            ):
                continue  # no labelled pair; under DDP every rank still joins the reduction (zeros)
            means, _ = self._metrics.means(stage, name, width)
            finite = means[torch.isfinite(means)]
            if finite.numel():
                self.log(f"{stage}/{name}", finite.mean().float(), prog_bar=name == "dice")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """The field ``(B, D, *spatial)`` in voxels (pull, moving -> fixed)."""
        return self(*self._pair(batch))[1]

    def configure_optimizers(self):
        return torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)

"""Supervised segmentation: the downstream task on which augmentation (DRDM) and standardization are judged.

DRDM's evaluation (Zheng et al., "Deformation-Recovery Diffusion Model (DRDM)", arXiv 2407.07295, 2024, sec. 4.3
and Table 2) trains a segmentation U-Net on a few
labelled images, with and without the generated deformations of those images (``medfusion augment`` writes them
with their warped labels and a manifest), and compares Dice on held-out cases. This module is that network and
protocol, for 2D and 3D: MONAI's ``UNet`` (residual units, instance norm), MONAI's ``DiceCELoss`` on softmax
outputs (soft Dice + cross-entropy, the nnU-Net objective of Isensee et al., Nature Methods 2021), AdamW with cosine
decay to 1 % of the rate.

Validation / test: hard predictions (argmax; 3D with ``sw_roi_size`` by MONAI's sliding-window inference), Dice and
HD95 per case and class (:mod:`medfusion.eval.segmentation`, classes absent from a case's reference skipped).
Under DDP the per-class sums and counts are summed over ranks: every case is counted once, whatever its rank
(the DataModule's evaluation sampler pads no duplicates in), so the logged mean is the mean over cases.
Logged: ``val/dice`` (mean over classes of the per-class means), ``val/dice_<class>``, ``val/hd95``; ``test/...``
alike. ``predict_step`` returns the label map.

Batch keys read: ``image`` ``(B, C, *spatial)`` (HU-windowed to [-1, 1] by the data pipeline) and ``label``
``(B, 1, *spatial)`` integer classes ``0..num_classes - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from medfusion import keys
from medfusion.eval.segmentation import dice_per_case, hd95_per_case
from medfusion.models._case_means import CaseMeans, EvaluationHooks
from medfusion.models.base import MedfusionModule, cosine_schedule


class Segmentation(EvaluationHooks, MedfusionModule):
    """U-Net segmentation trained with Dice + cross-entropy, for 2D and 3D images.

    Args:
        num_classes: label values ``0..num_classes - 1`` (0 = background); the built-in phantoms have 17.
        spatial_dims, in_channels: 2D/3D and image channels.
        channels, strides, num_res_units, dropout: MONAI ``UNet`` (ignored when ``net`` is given).
        lambda_dice, lambda_ce: weights of the two loss terms (MONAI ``DiceCELoss``).
        include_background: count the background class in the loss's Dice term and in the metrics.
        lr, weight_decay: AdamW; cosine decay over the trainer's steps.
        sw_roi_size, sw_batch_size: 3D evaluation by sliding windows of this size (None: whole volume).
        hu_window: the data pipeline's window (stored for inference; ``fit`` checks it against the DataModule).
        class_names: names for the logged per-class Dice (default ``class_<i>``).
        net: an injected network ``(B, C, *S) -> (B, num_classes, *S)`` (not part of exported configs).
    """

    def __init__(
        self,
        num_classes: int,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: Sequence[int] = (16, 32, 64, 128),
        strides: Sequence[int] = (2, 2, 2),
        num_res_units: int = 2,
        dropout: float = 0.0,
        lambda_dice: float = 1.0,
        lambda_ce: float = 1.0,
        include_background: bool = False,
        lr: float = 1e-3,
        weight_decay: float = 1e-5,
        sw_roi_size: Sequence[int] | None = None,
        sw_batch_size: int = 4,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
        class_names: Sequence[str] | None = None,
        net: nn.Module | None = None,
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2 (background + at least one class), got {num_classes}")
        if net is None and len(strides) != len(channels) - 1:
            raise ValueError(
                f"strides needs len(channels) - 1 = {len(channels) - 1} values, got {tuple(strides)}"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"class_names needs {num_classes} names, got {len(class_names)}")
        if sw_roi_size is not None and len(sw_roi_size) != spatial_dims:
            raise ValueError(f"sw_roi_size needs {spatial_dims} values, got {tuple(sw_roi_size)}")
        self.save_hyperparameters(ignore=["net"])
        if net is None:
            from monai.networks.nets import UNet

            net = UNet(
                spatial_dims, in_channels, num_classes, channels=tuple(channels), strides=tuple(strides),
                num_res_units=num_res_units, dropout=dropout, norm="instance",
            )  # fmt: skip
        self.net = net
        from monai.losses import DiceCELoss

        self.loss_fn = DiceCELoss(
            include_background=include_background, to_onehot_y=True, softmax=True,
            lambda_dice=lambda_dice, lambda_ce=lambda_ce,
        )  # fmt: skip
        self._metrics = CaseMeans(self)

    @property
    def spatial_dims(self) -> int:
        return int(self.hparams.spatial_dims)

    @property
    def class_names(self) -> list[str]:
        names = self.hparams.class_names
        return list(names) if names is not None else [f"class_{i}" for i in range(self.hparams.num_classes)]

    def forward(self, images: Tensor) -> Tensor:
        """Logits ``(B, num_classes, *spatial)``."""
        return self.net(images)

    @torch.no_grad()
    def predict_labels(self, images: Tensor) -> Tensor:
        """Hard label map ``(B, 1, *spatial)`` (argmax; sliding windows in 3D when ``sw_roi_size`` is set)."""
        roi = self.hparams.sw_roi_size
        if roi is not None and self.spatial_dims == 3:
            from monai.inferers import sliding_window_inference

            logits = sliding_window_inference(
                images, tuple(roi), self.hparams.sw_batch_size, self.net, overlap=0.25
            )
        else:
            logits = self.net(images)
        return torch.as_tensor(logits).argmax(1, keepdim=True)

    def _check_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor]:
        if keys.IMAGE not in batch or keys.LABEL not in batch:
            raise ValueError(
                f"segmentation needs {keys.IMAGE!r} and {keys.LABEL!r} in the batch (a 'segment' manifest); "
                f"got {sorted(batch)}"
            )
        return batch[keys.IMAGE], batch[keys.LABEL]

    def loss(self, batch: dict[str, Any]) -> Tensor:
        x, y = self._check_batch(batch)
        n = self.hparams.num_classes
        if y.min() < 0 or y.max() >= n:
            raise ValueError(
                f"label values must be in 0..{n - 1} (num_classes={n}), got {int(y.min())}..{int(y.max())}"
            )
        return self.loss_fn(self.net(x), torch.as_tensor(y).long())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        loss = self.loss(batch)
        self.log("train/loss", loss, prog_bar=True, batch_size=batch[keys.IMAGE].shape[0])
        return loss

    # ------------------------------------------------------------------------------------------ evaluation
    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        x, y = self._check_batch(batch)
        pred = self.predict_labels(x)
        y = torch.as_tensor(y).long()
        n, bg = self.hparams.num_classes, self.hparams.include_background
        self.log(f"{stage}/loss", self.loss(batch), batch_size=x.shape[0], sync_dist=True)
        for name, values in (
            ("dice", dice_per_case(pred, y, n, include_background=bg)),
            ("hd95", hd95_per_case(pred, y, n, include_background=bg)),
        ):
            self._metrics.update(stage, name, values)

    def _log_epoch(self, stage: str) -> None:
        n_metric = self.hparams.num_classes - (0 if self.hparams.include_background else 1)
        names = self.class_names if self.hparams.include_background else self.class_names[1:]
        for name in ("dice", "hd95"):
            means, counts = self._metrics.means(stage, name, n_metric)
            finite = means[torch.isfinite(means)]
            overall = finite.mean() if finite.numel() else means.new_tensor(float("nan"))
            # values are already summed over ranks: every rank logs the same number, no further sync
            self.log(f"{stage}/{name}", overall.float(), prog_bar=name == "dice", rank_zero_only=False)
            if name == "dice":
                for cls, m, c in zip(names, means, counts):
                    if c > 0:
                        self.log(f"{stage}/dice_{cls}", m.float())

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        return self.predict_labels(batch[keys.IMAGE])

    def configure_optimizers(self):
        opt = torch.optim.AdamW(
            self.net.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        return cosine_schedule(self, opt, final_fraction=0.01)

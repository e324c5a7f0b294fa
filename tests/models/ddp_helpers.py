"""Helpers for the 2-rank (gloo, ``ddp_spawn``) tests of the downstream modules."""

from __future__ import annotations

import warnings

import lightning as L
from torch.utils.data import DataLoader


class UnpaddedValData(L.LightningDataModule):
    """The first 3 cases of ``batch`` as a validation set over the ranks with the unpadded sampler (2 ranks: 2 + 1)."""

    def __init__(self, batch):
        super().__init__()
        self.items = [{k: v[i] for k, v in batch.items()} for i in range(3)]

    def val_dataloader(self):
        from medfusion.data.datamodule import UnpaddedDistributedSampler

        t = self.trainer
        sampler = UnpaddedDistributedSampler(self.items, num_replicas=t.world_size, rank=t.global_rank)
        return DataLoader(self.items, batch_size=1, sampler=sampler)


def validate_on_two_ranks(model, batch, tmp_path) -> dict:
    """``trainer.validate`` on 2 CPU ranks; the logged metrics."""
    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return trainer.validate(model, datamodule=UnpaddedValData(batch))[0]

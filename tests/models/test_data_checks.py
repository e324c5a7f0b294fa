"""``fit`` stops when the data's HU window is not the model's (it would train on one scale and run on another)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.models.diffusion_ct import DiffusionCTAutoencoder
from medfusion.models.rddm import RDDM


class _Data(L.LightningDataModule):
    def __init__(self, hu_window, source_key=keys.SOURCE):
        super().__init__()
        self.hu_window = tuple(hu_window)
        g = torch.Generator().manual_seed(0)
        x = torch.rand(4, 1, 32, 32, generator=g) * 2 - 1
        self.items = [{keys.SOURCE: x[i], keys.TARGET: x[i]} for i in range(4)]

    def train_dataloader(self):
        return DataLoader(self.items, batch_size=2)


def _fit(model, data, tmp_path):
    trainer = L.Trainer(
        max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(model, datamodule=data)
    return trainer


@pytest.mark.parametrize(
    "make",
    [
        lambda w: DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4,
                                         hu_window=w),
        lambda w: RDDM(spatial_dims=2, channels=(32, 32), attention_levels=(False, False), num_head_channels=8,
                       hu_window=w),
    ],
    ids=["diffusion_ct_stage1", "rddm"],
)  # fmt: skip
def test_window_mismatch_stops_fit_and_a_match_trains(make, tmp_path):
    with pytest.raises(ValueError, match=r"hu_window \(-1000.0, 1000.0\) differs from the data's"):
        _fit(make((-1000.0, 1000.0)), _Data((-1024.0, 2048.0)), tmp_path)
    assert _fit(make((-1024.0, 2048.0)), _Data((-1024.0, 2048.0)), tmp_path).global_step == 1

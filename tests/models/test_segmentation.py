"""Segmentation (the downstream task of DRDM augmentation): metrics, training, exact DDP means."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
from ddp_helpers import validate_on_two_ranks
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.eval.segmentation import MeanAccumulator, dice_per_case, hd95_per_case
from medfusion.models.segmentation import Segmentation

KW = dict(channels=(8, 16), strides=(2,), num_res_units=1)


def _discs(n: int, spatial_dims: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """Images with a bright disc (class 1) and a dark square (class 2) at random places."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(*[torch.arange(size)] * spatial_dims, indexing="ij")
    imgs, labs = [], []
    for _ in range(n):
        r = size // 6
        c = torch.randint(size // 4, size - size // 4, (spatial_dims,), generator=g)
        r2 = sum((gi - ci) ** 2 for gi, ci in zip(grid, c))
        lab = torch.zeros((size,) * spatial_dims, dtype=torch.long)
        lab[r2 < r * r] = 1
        q = torch.randint(1, size - r - 2, (spatial_dims,), generator=g)
        box = tuple(slice(int(v), int(v) + r + 1) for v in q)
        lab[box] = 2
        img = -0.8 + 1.2 * (lab == 1) + 0.6 * (lab == 2) + 0.1 * torch.randn(lab.shape, generator=g)
        imgs.append(img[None])
        labs.append(lab[None])
    return {keys.IMAGE: torch.stack(imgs), keys.LABEL: torch.stack(labs)}


def test_dice_and_hd95_oracles():
    target = torch.zeros(2, 1, 16, 16, dtype=torch.long)
    target[0, 0, 4:8, 4:8] = 1  # case 0 has class 1 only
    target[1, 0, 2:10, 2:4] = 2  # case 1 has class 2 only
    pred = target.clone()
    pred[1, 0, 2:10, 2:3] = 0  # half of class 2 missed: Dice = 2 * 8 / (8 + 16)
    d = dice_per_case(pred, target, 3)
    assert d.shape == (2, 2)
    assert d[0, 0] == pytest.approx(1.0) and math.isnan(d[0, 1]) and math.isnan(d[1, 0])
    assert d[1, 1] == pytest.approx(16 / 24)
    shifted = torch.roll(target, 3, dims=-1)
    h = hd95_per_case(shifted, target, 3)
    assert h[0, 0] == pytest.approx(3.0) and math.isnan(h[0, 1])
    empty = target.clone()
    empty[0] = 0  # class 1 of case 0 missed entirely: no distance exists (inf), not "absent" (NaN)
    h = hd95_per_case(empty, target, 3)
    assert math.isinf(h[0, 0]) and math.isnan(h[0, 1]) and h[1, 1] == 0
    with pytest.raises(ValueError, match=r"0\.\.2"):
        dice_per_case(pred + 5, target, 3)


def test_mean_accumulator_skips_nans_and_reduces_exactly():
    acc = MeanAccumulator()
    acc.update(torch.tensor([[1.0, float("nan")], [0.5, 0.2]]))
    acc.update(torch.tensor([[0.0, 0.4]]))
    means, counts = acc.compute()
    torch.testing.assert_close(means, torch.tensor([0.5, 0.3], dtype=torch.float64))
    torch.testing.assert_close(counts, torch.tensor([3.0, 2.0], dtype=torch.float64))
    # "two ranks": the sums and counts of both are added, not their means averaged
    empty = MeanAccumulator()
    m, c = empty.compute(lambda t: t + torch.stack([acc.sums, acc.counts]), num_classes=2)
    torch.testing.assert_close(m, means)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_one_step_lowers_the_loss_and_shapes(spatial_dims):
    torch.manual_seed(0)
    model = Segmentation(num_classes=3, spatial_dims=spatial_dims, **KW)
    batch = _discs(4, spatial_dims, size=32 if spatial_dims == 2 else 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = model.loss(batch)
    before.backward()
    opt.step()
    assert model.loss(batch).item() < before.item()
    pred = model.predict_labels(batch[keys.IMAGE])
    assert pred.shape == batch[keys.LABEL].shape and pred.dtype == torch.long


def test_training_learns_the_classes_and_logs_dice(tmp_path):
    torch.manual_seed(0)
    model = Segmentation(
        num_classes=3, spatial_dims=2, lr=1e-2, class_names=["background", "disc", "square"], **KW
    )
    train, val = _discs(16, seed=1), _discs(6, seed=2)
    items = lambda b: [{k: v[i] for k, v in b.items()} for i in range(len(b[keys.IMAGE]))]  # noqa: E731
    trainer = L.Trainer(
        max_steps=120, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, check_val_every_n_epoch=None, val_check_interval=120,
    )  # fmt: skip
    trainer.fit(
        model, DataLoader(items(train), batch_size=4, shuffle=True), DataLoader(items(val), batch_size=3)
    )
    m = trainer.callback_metrics
    assert {"val/dice", "val/dice_disc", "val/dice_square", "val/hd95"} <= set(m)
    assert float(m["val/dice"]) > 0.8
    with pytest.raises(ValueError, match="'image' and 'label'"):
        model.loss({keys.IMAGE: train[keys.IMAGE]})


def test_3d_sliding_window_prediction_matches_the_whole_volume_shape():
    torch.manual_seed(0)
    model = Segmentation(num_classes=3, spatial_dims=3, sw_roi_size=(8, 8, 8), sw_batch_size=2, **KW)
    x = _discs(1, 3, size=16)[keys.IMAGE]
    pred = model.predict_labels(x)
    assert pred.shape == (1, 1, 16, 16, 16) and int(pred.max()) < 3


def test_learning_rate_decays_by_cosine_to_one_percent():
    import types

    m = Segmentation(num_classes=3, channels=(4, 8), strides=(2,), lr=1e-3)
    m._trainer = types.SimpleNamespace(estimated_stepping_batches=10)
    conf = m.configure_optimizers()
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    rates = []
    for _ in range(10):
        rates.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    m._trainer = None
    assert rates[0] == pytest.approx(1e-3) and rates[5] == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="num_classes"):
        Segmentation(num_classes=1)
    with pytest.raises(ValueError, match="strides"):
        Segmentation(num_classes=3, channels=(8, 16, 32), strides=(2,))
    with pytest.raises(ValueError, match="class_names"):
        Segmentation(num_classes=3, class_names=["a"], **KW)


@pytest.mark.slow
def test_ddp_validation_dice_is_the_mean_over_cases(tmp_path):
    """2 CPU ranks (gloo, ddp_spawn), 3 cases split 2 + 1: the logged Dice equals the one-process mean over the
    3 cases (a mean of per-rank means would weight the lone case twice)."""
    torch.manual_seed(0)
    model = Segmentation(num_classes=3, spatial_dims=2, **KW)
    batch = _discs(3, seed=4)
    with torch.no_grad():
        per_case = dice_per_case(model.predict_labels(batch[keys.IMAGE]), batch[keys.LABEL], 3)
    expected = torch.nanmean(per_case.double(), dim=0)
    expected = float(expected[torch.isfinite(expected)].mean())
    out = validate_on_two_ranks(model, batch, tmp_path)
    assert out["val/dice"] == pytest.approx(expected, abs=1e-5)

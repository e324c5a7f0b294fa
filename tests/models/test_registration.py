"""Registration (VoxelMorph through MONAI): conventions, training, exact DDP means."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from ddp_helpers import validate_on_two_ranks
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.fields import warp, warp_labels
from medfusion.models.registration import Registration

KW = dict(channels=(8, 16, 16, 16), final_conv_channels=(8, 8), num_label_classes=3)


def _pairs(n: int, spatial_dims: int = 2, size: int = 32, seed: int = 0) -> dict[str, torch.Tensor]:
    """A disc (label 1) in a square (label 2) and the same shapes shifted by a few voxels."""
    g = torch.Generator().manual_seed(seed)
    grid = torch.meshgrid(*[torch.arange(size, dtype=torch.float32)] * spatial_dims, indexing="ij")
    out: dict[str, list] = {keys.MOVING: [], keys.FIXED: [], keys.MOVING_LABEL: [], keys.FIXED_LABEL: []}
    for _ in range(n):
        shift = torch.randint(-3, 4, (spatial_dims,), generator=g).float()
        for k_img, k_lab, off in ((keys.MOVING, keys.MOVING_LABEL, 0.0), (keys.FIXED, keys.FIXED_LABEL, 1.0)):
            c = [size / 2 + off * s for s in shift]
            r2 = sum((gi - ci) ** 2 for gi, ci in zip(grid, c))
            box = torch.stack([(gi - ci).abs() for gi, ci in zip(grid, c)]).amax(0)
            lab = torch.zeros(r2.shape, dtype=torch.long)
            lab[box < size / 4] = 2
            lab[r2 < (size / 8) ** 2] = 1
            out[k_img].append((-0.8 + 0.6 * (lab == 2) + 1.4 * (lab == 1)).float()[None])
            out[k_lab].append(lab[None])
    return {k: torch.stack(v) for k, v in out.items()}


def test_monai_voxelmorph_and_our_fields_share_one_convention():
    """The network's moved image is MONAI's warp of ``moving`` by its ddf; ours gives the same (voxels, pull)."""
    torch.manual_seed(0)
    model = Registration(spatial_dims=2, **KW)
    b = _pairs(2)
    with torch.no_grad():
        moved, ddf = model(b[keys.MOVING], b[keys.FIXED])
        ddf = ddf * 20  # a visible field
        from monai.networks.blocks import Warp

        ours = warp(b[keys.MOVING], ddf, mode="bilinear", padding_mode="border")
        theirs = Warp(mode="bilinear", padding_mode="border")(b[keys.MOVING], ddf)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_one_step_lowers_the_loss(spatial_dims):
    torch.manual_seed(0)
    model = Registration(spatial_dims=spatial_dims, dice_weight=1.0, **KW)
    b = _pairs(2, spatial_dims, size=32 if spatial_dims == 2 else 16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = model.losses(b)
    assert set(before) == {"similarity", "smooth", "dice", "total"}
    before["total"].backward()
    opt.step()
    assert model.losses(b)["total"].item() < before["total"].item()
    moved, ddf = model(b[keys.MOVING], b[keys.FIXED])
    assert moved.shape == b[keys.MOVING].shape and ddf.shape == (2, spatial_dims, *b[keys.MOVING].shape[2:])


def test_supervised_term_uses_a_known_field():
    torch.manual_seed(0)
    model = Registration(spatial_dims=2, supervised_weight=1.0, **KW)
    b = _pairs(2)
    true = torch.zeros(2, 2, 32, 32)
    true[:, 0] = 2.0  # a shift of two voxels along axis 0
    b[keys.FIXED] = warp(b[keys.MOVING], true, padding_mode="border")
    parts = model.losses({**b, keys.DDF: true})
    _, ddf = model(b[keys.MOVING], b[keys.FIXED])
    assert parts["supervised"].item() == pytest.approx(torch.mean((ddf - true) ** 2).item(), rel=1e-5)
    # a pair whose field is unknown (weight 0) does not count; the weight needs one value per pair
    w = torch.tensor([1.0, 0.0])
    parts = model.losses({**b, keys.DDF: true, keys.DDF_WEIGHT: w})
    assert parts["supervised"].item() == pytest.approx(
        torch.mean((ddf[0] - true[0]) ** 2).item() / 2, rel=1e-5
    )
    with pytest.raises(ValueError, match="one per pair"):
        model.losses({**b, keys.DDF: true, keys.DDF_WEIGHT: w[:, None]})


def test_training_aligns_shifted_shapes(tmp_path):
    torch.manual_seed(0)
    model = Registration(spatial_dims=2, lr=3e-3, similarity="mse", smooth_weight=0.01, **KW)
    train, val = _pairs(16, seed=1), _pairs(4, seed=2)
    items = lambda b: [{k: v[i] for k, v in b.items()} for i in range(len(b[keys.MOVING]))]  # noqa: E731
    trainer = L.Trainer(
        max_steps=150, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, check_val_every_n_epoch=None, val_check_interval=150,
    )  # fmt: skip
    trainer.fit(
        model, DataLoader(items(train), batch_size=4, shuffle=True), DataLoader(items(val), batch_size=2)
    )
    m = trainer.callback_metrics
    assert {"val/dice", "val/dice_before", "val/folding_pct", "val/sdlogj"} <= set(m)
    assert float(m["val/dice"]) > float(m["val/dice_before"]) + 0.05
    assert float(m["val/folding_pct"]) < 1.0


def test_bad_arguments_and_batches():
    with pytest.raises(ValueError, match="lncc, mse"):
        Registration(similarity="ncc", **KW)
    with pytest.raises(ValueError, match="even number"):
        Registration(channels=(8, 16, 16), **{k: v for k, v in KW.items() if k != "channels"})
    model = Registration(spatial_dims=2, **KW)
    with pytest.raises(ValueError, match="'moving' and 'fixed'"):
        model.losses({keys.IMAGE: torch.zeros(1, 1, 32, 32)})
    with pytest.raises(ValueError, match="multiples of 4"):
        model(torch.zeros(1, 1, 30, 30), torch.zeros(1, 1, 30, 30))


@pytest.mark.slow
def test_ddp_validation_dice_is_the_mean_over_cases(tmp_path):
    """2 CPU ranks (gloo, ddp_spawn), 3 pairs split 2 + 1: the logged Dice equals the one-process mean over cases."""
    from medfusion.eval.segmentation import dice_per_case

    torch.manual_seed(0)
    model = Registration(spatial_dims=2, **KW)
    b = _pairs(3, seed=5)
    with torch.no_grad():
        _, ddf = model(b[keys.MOVING], b[keys.FIXED])
        d = dice_per_case(warp_labels(b[keys.MOVING_LABEL], ddf), b[keys.FIXED_LABEL], 3).double()
    expected = float(torch.nanmean(d, 0).mean())
    out = validate_on_two_ranks(model, b, tmp_path)
    assert out["val/dice"] == pytest.approx(expected, abs=1e-5)

"""RDDM LightningModule: contract (faithfulness test 6), 2D/3D shapes, one step lowers the loss, seeded sampling."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from medfusion import keys
from medfusion.diffusion import residual as R
from medfusion.models.rddm import RDDM


class TinyNet(nn.Module):
    """conv(cat(x, cond)) + a learned per-timestep bias; records the inputs it saw."""

    def __init__(self, spatial_dims: int, c: int, out: int):
        super().__init__()
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(2 * c, out, 3, padding=1)
        self.temb = nn.Embedding(1000, out)
        self.seen: list[tuple[tuple[int, ...], torch.Tensor]] = []

    def forward(self, x, t, cond=None):
        self.seen.append((tuple(x.shape), t.detach().clone()))
        h = self.conv(torch.cat([x, cond], 1))
        return h + self.temb(t.long()).reshape(*t.shape, -1, *([1] * (x.ndim - 2)))


def _batch(spatial_dims: int, size: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1) + (size,) * spatial_dims
    clean = torch.rand(shape, generator=g) * 1.6 - 0.8
    return {keys.TARGET: clean, keys.SOURCE: clean + 0.1 * torch.randn(shape, generator=g)}


def _model(spatial_dims: int, layout: str = "two_nets", objective: str = "res_noise", **kw) -> RDDM:
    torch.manual_seed(0)
    heads = R.NUM_HEADS[objective]
    two = heads == 2 and layout == "two_nets"
    res = TinyNet(spatial_dims, 1, 1 if (two or heads == 1) else heads)
    noise = TinyNet(spatial_dims, 1, 1) if two else None
    return RDDM(
        spatial_dims=spatial_dims, objective=objective, layout=layout, res_net=res, noise_net=noise, **kw
    )


@pytest.mark.parametrize("spatial_dims,size", [(2, 16), (3, 8)])
@pytest.mark.parametrize("layout", ["two_nets", "one_net"])
def test_heads_shapes_and_loss_is_sum_of_per_head_l1(spatial_dims, size, layout):
    m = _model(spatial_dims, layout)
    batch = _batch(spatial_dims, size)
    x = batch[keys.SOURCE]
    t = torch.tensor([0, 999])
    out = m.heads(x, t, x)
    assert out.shape == (2, 2) + x.shape[2:]
    # the loss equals Σ_heads mean_b(mean_pixels |out - target|), recomputed with the same draws
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    loss = m.loss(batch, generator=g1)
    tt = torch.randint(0, 1000, (2,), generator=g2)
    eps = torch.randn(x.shape, generator=g2)
    x_t = R.q_sample(batch[keys.TARGET], x, tt, m.schedule, eps)
    o = m.heads(x_t, tt, x)
    ref = (o[:, :1] - (x - batch[keys.TARGET])).abs().mean() + (o[:, 1:] - eps).abs().mean()
    torch.testing.assert_close(loss, ref)


@pytest.mark.parametrize("spatial_dims,size", [(2, 16), (3, 8)])
def test_one_optimisation_step_lowers_loss(spatial_dims, size):
    m = _model(spatial_dims, lr=1e-2)
    batch = _batch(spatial_dims, size)
    opt = m.configure_optimizers()
    before = m.loss(batch, generator=torch.Generator().manual_seed(1))
    before.backward()
    opt.step()
    after = m.loss(batch, generator=torch.Generator().manual_seed(1))
    assert after.item() < before.item()


@pytest.mark.parametrize("objective", ["res_noise", "res", "noise", "x0_noise"])
def test_seeded_sampling_deterministic_all_objectives(objective):
    m = _model(2, objective=objective).eval()
    x = _batch(2, 16)[keys.SOURCE]
    a = m.sample(x, num_steps=3, generator=torch.Generator().manual_seed(5))
    b = m.sample(x, num_steps=3, generator=torch.Generator().manual_seed(5))
    assert a.shape == x.shape and torch.equal(a, b) and a.abs().max() <= 1.0


def test_network_calls_equal_steps_with_integer_t():
    m = _model(2).eval()
    x = _batch(2, 16)[keys.SOURCE]
    m.sample(x, num_steps=5, generator=torch.Generator().manual_seed(0))
    ts = [int(t[0]) for _, t in m.nets["res"].seen]
    assert ts == [999, 799, 599, 399, 199] and len(m.nets["noise"].seen) == 5


def test_3d_sliding_window_inside_every_step():
    m = _model(3, sw_roi_size=(8, 8, 8), sw_batch_size=2).eval()
    x = _batch(3, 12, b=1)[keys.SOURCE]
    out = m.sample(x, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = m.nets["res"].seen
    assert all(s[2:] == (8, 8, 8) for s, _ in seen)  # every call sees a window, not the volume
    assert sorted({int(t[0]) for _, t in seen}) == [499, 999]  # windows at both steps
    assert len(seen) > 2  # several windows per step
    # whole-volume inference of a small volume calls the net once per step
    m2 = _model(3, sw_roi_size=(16, 16, 16)).eval()
    m2.sample(x, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert len(m2.nets["res"].seen) == 2


def test_ema_and_checkpoint_class_key():
    m = _model(2, ema_every=1, lr=1e-2)
    batch = _batch(2, 16)
    opt = m.configure_optimizers()
    m.loss(batch).backward()
    opt.step()
    m.ema.update_parameters(m.nets)
    assert int(m.ema.n_averaged) == 1
    ckpt: dict = {}
    m.on_save_checkpoint(ckpt)
    assert ckpt["medfusion_class_path"] == "medfusion.models.rddm.RDDM"
    assert "res_net" not in m.hparams and m.hparams.sum_scale == 0.01


def test_bad_options_raise():
    with pytest.raises(ValueError, match="two_nets"):
        RDDM(layout="shared", res_net=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="res_noise"):
        RDDM(objective="eps", res_net=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sw_roi_size"):
        RDDM(spatial_dims=3, sw_roi_size=(8, 8), res_net=nn.Identity(), noise_net=nn.Identity())


def test_default_unet_backbone_builds():
    pytest.importorskip("medfusion.nets.unet")
    m = RDDM(
        spatial_dims=2,
        channels=(8, 16),
        attention_levels=(False, True),
        num_head_channels=8,
        unet_kwargs={"norm_num_groups": 8},
        ema_decay=None,
    )
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    assert m.heads(x, torch.tensor([10]), x).shape == (1, 2, 16, 16)


def test_restore_command_end_to_end(tmp_path):
    """``medfusion restore`` on a NIfTI with an exported RDDM: output written, no overwrite, wrong model refused."""
    pytest.importorskip("medfusion.nets.unet")
    import argparse

    import nibabel as nib
    import numpy as np

    from medfusion.apps import restore
    from medfusion.models.diffir import DiffIRStage1
    from medfusion.models.export import export_model

    torch.manual_seed(0)
    m = RDDM(
        spatial_dims=2,
        channels=(8, 16),
        attention_levels=(False, False),
        num_head_channels=8,
        unet_kwargs={"norm_num_groups": 8},
        num_sampling_steps=2,
    )
    export_model(m, tmp_path / "rddm")
    vol = np.random.default_rng(0).uniform(-900, 900, size=(16, 16, 2)).astype(np.float32)
    nib.save(nib.Nifti1Image(vol, np.eye(4)), str(tmp_path / "in.nii.gz"))
    parser = argparse.ArgumentParser()
    restore.add_arguments(parser)

    def run(*extra: str, ckpt: str = "rddm") -> int:
        argv = [
            "--ckpt",
            str(tmp_path / ckpt),
            "--input",
            str(tmp_path / "in.nii.gz"),
            "--output",
            str(tmp_path / "out.nii.gz"),
        ]
        return restore.run(parser.parse_args([*argv, "--quiet", "--device", "cpu", *extra]))

    assert run() == 0
    out = np.asarray(nib.load(str(tmp_path / "out.nii.gz")).get_fdata())
    assert out.shape == vol.shape and np.isfinite(out).all()
    assert run() == 2  # refuses to overwrite
    assert run("--overwrite", "--steps", "0") == 2  # bad argument
    export_model(
        DiffIRStage1(
            dim=8,
            num_blocks=(1, 1, 1, 1),
            num_refinement_blocks=1,
            heads=(1, 1, 2, 2),
            n_feats=8,
            n_encoder_res=0,
        ),
        tmp_path / "s1",
    )
    assert run("--overwrite", ckpt="s1") == 2  # stage 1 needs GT: not a restorer


def _fit_tiny(module, max_steps: int, accumulate: int, batch: dict) -> None:
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    items = [{k: v[0] for k, v in batch.items()}] * (2 * max_steps * accumulate)
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, accumulate_grad_batches=accumulate, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(items, batch_size=1))


def test_ema_updates_once_per_optimiser_step_under_gradient_accumulation():
    """With accumulate_grad_batches=2, global_step repeats across micro-batches: one EMA update per step."""
    m = _model(2, ema_every=1, lr=1e-3)
    _fit_tiny(m, max_steps=3, accumulate=2, batch=_batch(2, 16))
    assert int(m.ema.n_averaged) == 3


def test_on_train_start_seeds_ranks_differently():
    import types

    m = _model(2)
    draws = []
    for rank in (0, 1):
        m._trainer = types.SimpleNamespace(world_size=2, global_rank=rank)
        torch.manual_seed(5)
        m.on_train_start()
        draws.append(torch.randn(4))
    m._trainer = None
    assert not torch.equal(draws[0], draws[1])
    torch.manual_seed(5)
    assert torch.equal(draws[0], torch.randn(4))  # rank 0 keeps the experiment seed


def test_module_with_ema_pickles_and_ema_still_averages():
    """ddp_spawn pickles the LightningModule: the internal AveragedModel must not hold a closure."""
    import pickle

    m = _model(2, ema_every=1)
    m.ema.update_parameters(m.nets)
    with torch.no_grad():
        for p in m.nets.parameters():
            p.add_(1.0)
    m2 = pickle.loads(pickle.dumps(m))
    before = [p.clone() for p in m2.ema.module.parameters()]
    m2.ema.update_parameters(m2.nets)
    for b, e, p in zip(before, m2.ema.module.parameters(), m2.nets.parameters()):
        torch.testing.assert_close(e, 0.995 * b + 0.005 * p)  # decay 0.995 (the default)

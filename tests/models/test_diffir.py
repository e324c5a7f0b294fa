"""DiffIR stages: faithfulness test 8 (stage parity), 2D/3D shapes, loss decreases, seeded sampling."""

from __future__ import annotations

import pytest
import torch

from medfusion import keys
from medfusion.models.diffir import DiffIRStage1, DiffIRStage2, load_stage1_weights

TINY = dict(
    dim=8,
    num_blocks=(1, 1, 1, 1),
    num_refinement_blocks=1,
    heads=(1, 1, 2, 2),
    cpen_downscale=2,
    n_feats=8,
    n_encoder_res=1,
    val_num_samples=1,
)


def _batch(spatial_dims: int, size: int, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (b, 1) + (size,) * spatial_dims
    clean = torch.rand(shape, generator=g) * 1.6 - 0.8
    return {keys.TARGET: clean, keys.SOURCE: clean + 0.1 * torch.randn(shape, generator=g)}


def _step(module, batch, loss_fn):
    opt = module.configure_optimizers()
    opt = opt[-1] if isinstance(opt, list) else opt
    before = loss_fn()
    opt.zero_grad()
    before.backward()
    opt.step()
    return before.item(), loss_fn().item()


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_stage1_shapes_and_step_lowers_loss(spatial_dims, size):
    torch.manual_seed(0)
    m = DiffIRStage1(spatial_dims=spatial_dims, lr=2e-3, **TINY)
    batch = _batch(spatial_dims, size)
    assert m.sample(batch[keys.SOURCE], batch[keys.TARGET]).shape == batch[keys.SOURCE].shape
    before, after = _step(m, batch, lambda: m.loss(batch))
    assert after < before


@pytest.fixture
def stage1_ckpt(tmp_path):
    torch.manual_seed(0)
    s1 = DiffIRStage1(spatial_dims=2, **TINY)
    s1.ema.update_parameters(torch.nn.ModuleDict({"cpen": s1.cpen, "dirformer": s1.dirformer}))
    ckpt = {"state_dict": s1.state_dict(), "hyper_parameters": dict(s1.hparams)}
    s1.on_save_checkpoint(ckpt)
    path = tmp_path / "s1.ckpt"
    torch.save(ckpt, path)
    return s1, path


def test_stage2_initialised_from_stage1(stage1_ckpt):
    s1, path = stage1_ckpt
    torch.manual_seed(1)
    s2 = DiffIRStage2(stage1=str(path), spatial_dims=2, **TINY)
    for (k, a), (_, b) in zip(
        s1.ema.module["dirformer"].state_dict().items(), s2.dirformer.state_dict().items()
    ):
        assert torch.equal(a, b), k
    for a, b in zip(s1.cpen.parameters(), s2.cpen_s1.parameters()):
        assert torch.equal(a, b)
    assert s2.hparams.stage1 is None  # rebuildable without the stage-1 file
    assert not any(p.requires_grad for p in s2.cpen_s1.parameters())
    s2.train()
    assert not s2.cpen_s1.training
    with pytest.raises(FileNotFoundError):
        DiffIRStage2(stage1=str(path) + ".missing", **TINY)
    with pytest.raises(ValueError, match="match"):
        DiffIRStage2(stage1=str(path), spatial_dims=2, **{**TINY, "dim": 16})
    assert set(k.split(".")[0] for k in load_stage1_weights(path)) == {"cpen", "dirformer"}


def test_phase1_only_updates_encoder_and_denoiser():
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, encoder_steps=5, lr_encoder=1e-2, **TINY)
    batch = _batch(2, 32)
    assert m.phase == 1
    frozen = {k: v.clone() for k, v in m.dirformer.state_dict().items()}
    teacher = {k: v.clone() for k, v in m.cpen_s1.state_dict().items()}
    cpen2 = [p.clone() for p in m.cpen_s2.parameters()]
    opt_e, _ = m.configure_optimizers()
    losses = m.losses(batch, phase=1, generator=torch.Generator().manual_seed(0))
    assert set(losses) == {"l_diff", "total"} and torch.equal(losses["total"], losses["l_diff"])
    opt_e.zero_grad()
    losses["total"].backward()
    opt_e.step()
    assert all(torch.equal(v, m.dirformer.state_dict()[k]) for k, v in frozen.items())
    assert all(torch.equal(v, m.cpen_s1.state_dict()[k]) for k, v in teacher.items())
    assert any(not torch.equal(a, b) for a, b in zip(cpen2, m.cpen_s2.parameters()))
    after = m.losses(batch, phase=1, generator=torch.Generator().manual_seed(0))["l_diff"]
    assert after.item() < losses["l_diff"].item()


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_phase2_total_is_rec_plus_diff_and_step_lowers_it(spatial_dims, size):
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=spatial_dims, encoder_steps=0, lr=2e-3, **TINY)
    assert m.phase == 2
    batch = _batch(spatial_dims, size)

    def total():
        return m.losses(batch, 2, generator=torch.Generator().manual_seed(0))["total"]

    parts = m.losses(batch, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(parts["total"], parts["l_rec"] + parts["l_diff"])  # no KD-KL term
    before, after = _step(m, batch, total)
    assert after < before


@pytest.mark.parametrize("spatial_dims,size", [(2, 32), (3, 16)])
def test_stage2_seeded_sampling_deterministic(spatial_dims, size):
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=spatial_dims, **TINY).eval()
    lq = _batch(spatial_dims, size, b=1)[keys.SOURCE]
    a = m.sample(lq, generator=torch.Generator().manual_seed(3))
    b = m.sample(lq, generator=torch.Generator().manual_seed(3))
    assert a.shape == lq.shape and torch.equal(a, b)
    z = m.sample_ipr(lq, generator=torch.Generator().manual_seed(3))
    assert z.shape == (1, 32)


def test_stage2_sliding_window_3d():
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=3, sw_roi_size=(16, 16, 16), sw_batch_size=2, **TINY).eval()
    lq = _batch(3, 24, b=1)[keys.SOURCE]
    out = m.sample(lq, generator=torch.Generator().manual_seed(0))
    assert out.shape == lq.shape and torch.isfinite(out).all()


def test_bad_args(tmp_path):
    with pytest.raises(ValueError, match="encoder_steps"):
        DiffIRStage2(encoder_steps=-1, **TINY)
    for name in ("bad.ckpt", "bad.safetensors"):
        path = tmp_path / name
        path.write_bytes(b"not a checkpoint")
        with pytest.raises(ValueError, match=name):
            load_stage1_weights(path)
    for cls in (DiffIRStage1, DiffIRStage2):
        with pytest.raises(ValueError, match="sw_roi_size needs 2 values"):
            cls(spatial_dims=2, sw_roi_size=(8, 8, 8), **TINY)


def _fit_tiny(module, max_steps: int, accumulate: int = 1, devices: int = 1, strategy: str = "auto") -> None:
    import warnings

    import lightning.pytorch as pl
    from torch.utils.data import DataLoader

    batch = _batch(2, 32, b=1)
    items = [{k: v[0] for k, v in batch.items()}] * (4 * max_steps * accumulate)
    trainer = pl.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=max_steps, logger=False,
        accumulate_grad_batches=accumulate, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(items, batch_size=1))


def test_stage1_ema_updates_once_per_optimiser_step_under_gradient_accumulation():
    torch.manual_seed(0)
    m = DiffIRStage1(spatial_dims=2, **TINY)
    _fit_tiny(m, max_steps=2, accumulate=2)
    assert int(m.ema.n_averaged) == 2


def test_phase1_gives_every_trainable_parameter_a_gradient():
    """DDP (find_unused_parameters=False) fails when a registered parameter gets no gradient in a step."""
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, encoder_steps=5, **TINY)
    frozen = {k: v.clone() for k, v in m.dirformer.state_dict().items()}
    _fit_tiny(m, max_steps=1)
    trainable = [(n, p) for n, p in m.named_parameters() if p.requires_grad]
    assert trainable and all(p.grad is not None for _, p in trainable), [
        n for n, p in trainable if p.grad is None
    ]
    assert all(torch.equal(v, m.dirformer.state_dict()[k]) for k, v in frozen.items())  # still idle


def test_stage2_on_train_start_seeds_ranks_differently():
    import types

    m = DiffIRStage2(spatial_dims=2, **TINY)
    draws = []
    for rank in (0, 1):
        m._trainer = types.SimpleNamespace(world_size=2, global_rank=rank)
        torch.manual_seed(5)
        m.on_train_start()
        draws.append(torch.randn(4))
    m._trainer = None
    assert not torch.equal(draws[0], draws[1])


@pytest.mark.slow
def test_stage2_phase1_trains_under_ddp(tmp_path):
    """Two CPU ranks (gloo): phase 1 leaves the DIRformer idle, which must not break DDP's gradient reduction;
    ``ddp_spawn`` pickles the module, so its internal EMA must be picklable."""
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, encoder_steps=5, **TINY)
    _fit_tiny(m, max_steps=3, devices=2, strategy="ddp_spawn")

"""DiffIR stages: faithfulness test 8 (stage parity), 2D/3D shapes, loss decreases, seeded sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from medfusion import keys
from medfusion.models.diffir import DiffIRStage1, DiffIRStage2, load_stage1_weights
from medfusion.models.options import SlidingWindow
from medfusion.nets.diffir import CPENConfig, DIRformerConfig

TINY = dict(
    dirformer=DIRformerConfig(dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2)),
    cpen=CPENConfig(downscale=2, n_feats=8, n_encoder_res=1),
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
        DiffIRStage2(stage1=str(path), spatial_dims=2, **{**TINY, "dirformer": DIRformerConfig(dim=16)})
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
    m = DiffIRStage2(spatial_dims=3, sliding_window=SlidingWindow((16, 16, 16), 2), **TINY).eval()
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
        with pytest.raises(ValueError, match="sliding_window.roi_size needs 2 values"):
            cls(spatial_dims=2, sliding_window={"roi_size": (8, 8, 8)}, **TINY)
        with pytest.raises(ValueError, match="cpen has no option n_feat; valid: downscale, n_feats, n_encoder_res"):
            cls(spatial_dims=2, cpen={"n_feat": 8})
        with pytest.raises(ValueError, match="norm_type='layer'; choose one of with_bias, bias_free"):
            cls(dirformer={"norm_type": "layer"})


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


def test_stage2_ema_updates_once_per_step_under_manual_optimisation():
    """Stage 2 optimises manually (two optimisers), so Lightning calls no optimizer_step hook: the EMA is updated
    in training_step, once per step."""
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, encoder_steps=1, **TINY)
    _fit_tiny(m, max_steps=3)
    assert int(m.ema.n_averaged) == 3


@pytest.mark.slow
def test_stage2_phase1_trains_under_ddp(tmp_path):
    """Two CPU ranks (gloo): phase 1 leaves the DIRformer idle, which must not break DDP's gradient reduction;
    ``ddp_spawn`` pickles the module, so its internal EMA must be picklable."""
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, encoder_steps=5, **TINY)
    _fit_tiny(m, max_steps=3, devices=2, strategy="ddp_spawn")


# --------------------------------------------------------------------------------------------- inference contract
LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"


def test_model_exported_by_medfusion_0_1_loads_and_restores_as_before():
    """A stage-2 export with 0.1's flat arguments (dim, n_feats, sw_batch_size, ...) loads through upgrade_config;
    its seeded output is the one 0.1 wrote (the EMA weights are used, as then)."""
    from safetensors.torch import load_file

    from medfusion.models.export import load_model

    m = load_model(LEGACY / "diffir_stage2_2d")
    expected = load_file(str(LEGACY / "diffir_stage2_2d" / "expected.safetensors"))
    assert m.dirformer_config.dim == 4 and m.cpen_config.n_feats == 4 and m.window.batch_size == 2
    out = m.restore(expected["source"], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected["output"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"n_feats belongs to .cpen. \(as .n_feats.\)"):
        DiffIRStage2.upgrade_config({"n_feats": 8, "cpen": {"n_feats": 8}})


def test_restore_takes_window_options_as_call_arguments_and_refuses_others():
    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=3, sliding_window=SlidingWindow(None, 4, 0.25), **TINY).eval()
    lq = _batch(3, 24, b=1)[keys.SOURCE]
    assert m.inference_options() == {"sw_batch_size": 4, "overlap": 0.25}
    whole = m.restore(lq, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(whole, m.sample(lq, generator=torch.Generator().manual_seed(0)))
    windowed = m.restore(lq, generator=torch.Generator().manual_seed(0), roi_size=(16, 16, 16), overlap=0.5)
    assert windowed.shape == lq.shape and not torch.equal(windowed, whole)  # one IPR per window
    assert m.hparams.sliding_window == {"roi_size": None, "batch_size": 4, "overlap": 0.25}  # nothing mutated
    # a window that covers the input is the whole-input result
    covering = m.restore(lq, generator=torch.Generator().manual_seed(0), roi_size=(24, 24, 24))
    torch.testing.assert_close(covering, whole)
    with pytest.raises(ValueError, match="no option num_steps .*valid: sw_batch_size, overlap"):
        m.check_options(num_steps=3)
    with pytest.raises(ValueError, match="overlap must be in"):
        m.restore(lq, overlap=1.5)
    with pytest.raises(ValueError, match="roi_size needs 3 positive multiples of 8"):
        m.restore(lq, roi_size=(12, 16, 16))
    assert m.describe() == "DiffIR restoration, 4 prior steps"


def test_export_round_trip_keeps_the_option_groups(tmp_path):
    from medfusion.models.export import export_model, load_model, module_config

    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, sliding_window=SlidingWindow((16, 16), 2, 0.5), **TINY).eval()
    cfg = module_config(m)["init_args"]
    assert cfg["cpen"] == {"downscale": 2, "n_feats": 8, "n_encoder_res": 1}
    assert cfg["sliding_window"] == {"roi_size": [16, 16], "batch_size": 2, "overlap": 0.5}
    loaded = load_model(export_model(m, tmp_path / "m"))
    lq = _batch(2, 32, b=1)[keys.SOURCE]
    torch.testing.assert_close(
        loaded.restore(lq, generator=torch.Generator().manual_seed(1)),
        m.restore(lq, generator=torch.Generator().manual_seed(1)),
    )


def test_validation_psnr_is_the_eval_psnr_of_the_clamped_output():
    from medfusion.eval.image import batch_mean, psnr

    torch.manual_seed(0)
    m = DiffIRStage2(spatial_dims=2, **TINY).eval()
    batch = _batch(2, 32, b=1)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    m.validation_step(batch, 0)
    out = m.sample(batch[keys.SOURCE], generator=torch.Generator().manual_seed(0))
    assert logged["val/psnr"] == pytest.approx(batch_mean(psnr, out.clamp(-1, 1), batch[keys.TARGET], 2.0))

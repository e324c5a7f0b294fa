"""RDDM LightningModule: contract (faithfulness test 6), 2D/3D shapes, one step lowers the loss, seeded sampling."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from medfusion import keys
from medfusion.diffusion import residual as R
from medfusion.models.options import SlidingWindow, UNetConfig
from medfusion.models.rddm import RDDM

TINY_UNET = UNetConfig(channels=(8, 16), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)
LEGACY = Path(__file__).parent / "data" / "legacy_v0_1"


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
    m = _model(3, sliding_window=SlidingWindow((8, 8, 8), 2)).eval()
    x = _batch(3, 12, b=1)[keys.SOURCE]
    out = m.sample(x, num_steps=2, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    seen = m.nets["res"].seen
    assert all(s[2:] == (8, 8, 8) for s, _ in seen)  # every call sees a window, not the volume
    assert sorted({int(t[0]) for _, t in seen}) == [499, 999]  # windows at both steps
    assert len(seen) > 2  # several windows per step
    # whole-volume inference of a small volume calls the net once per step
    m2 = _model(3, sliding_window=SlidingWindow((16, 16, 16))).eval()
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
    assert "res_net" not in m.hparams and m.hparams.schedule["sum_scale"] == 0.01


def test_bad_options_raise():
    with pytest.raises(ValueError, match="two_nets"):
        RDDM(layout="shared", res_net=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="res_noise"):
        RDDM(objective="eps", res_net=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sliding_window.roi_size needs 3 values"):
        RDDM(spatial_dims=3, sliding_window=SlidingWindow((8, 8)), res_net=nn.Identity(), noise_net=nn.Identity())
    with pytest.raises(ValueError, match="loss_type='l3'; choose one of l1, l2"):
        RDDM(loss_type="l3", res_net=nn.Identity(), noise_net=nn.Identity())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="unet has no option width; valid: channels, attention_levels"):
        RDDM(unet={"width": 8})
    with pytest.raises(ValueError, match="attention_levels needs one entry per level"):
        UNetConfig(channels=(8, 16), attention_levels=(False,))


def test_default_unet_backbone_builds():
    m = RDDM(spatial_dims=2, unet=TINY_UNET, ema_decay=None)
    x = torch.rand(1, 1, 16, 16) * 2 - 1
    assert m.heads(x, torch.tensor([10]), x).shape == (1, 2, 16, 16)
    assert m.divisible_by == 2


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


def test_ema_every_k_optimiser_steps():
    m = _model(2, ema_every=2, lr=1e-3)
    _fit_tiny(m, max_steps=5, accumulate=1, batch=_batch(2, 16))
    assert int(m.ema.n_averaged) == 2  # after steps 2 and 4


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
    d = min(0.995, 1 - 2 ** (-2 / 3))  # the default 0.995, warmed up: the first update after the copy
    for b, e, p in zip(before, m2.ema.module.parameters(), m2.nets.parameters()):
        torch.testing.assert_close(e, d * b + (1 - d) * p)


# --------------------------------------------------------------------------------------------- inference contract
def test_model_exported_by_medfusion_0_1_loads_and_restores_as_before():
    """An export with 0.1's flat arguments (channels, unet_kwargs, sw_batch_size, ...) loads through
    upgrade_config; its seeded output is the one 0.1 wrote (the EMA weights are used, as then)."""
    from safetensors.torch import load_file

    from medfusion.models.export import load_model

    m = load_model(LEGACY / "rddm_2d")
    expected = load_file(str(LEGACY / "rddm_2d" / "expected.safetensors"))
    assert m.unet_config.channels == (4, 8) and m.unet_config.norm_num_groups == 4
    assert m.inference_options() == {"num_steps": 3, "eta": 0.0, "sw_batch_size": 2, "overlap": 0.5}
    out = m.restore(expected["source"], generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(out, expected["output"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match=r"sw_overlap belongs to 'sliding_window' \(as 'overlap'\)"):
        RDDM.upgrade_config({"sw_overlap": 0.5, "sliding_window": {"overlap": 0.5}})


def test_restore_takes_its_options_as_call_arguments():
    m = _model(3, sliding_window=SlidingWindow(None, 3, 0.25)).eval()
    x = _batch(3, 12, b=1)[keys.SOURCE]
    assert m.inference_options() == {"num_steps": 5, "eta": 0.0, "sw_batch_size": 3, "overlap": 0.25}
    out = m.restore(x, generator=torch.Generator().manual_seed(0), num_steps=2, eta=0.5)
    ref = m.sample(x, num_steps=2, eta=0.5, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, ref)
    m.nets["res"].seen.clear()
    m.restore(x, generator=torch.Generator().manual_seed(0), roi_size=(8, 8, 8), num_steps=2, sw_batch_size=1)
    assert {s for s, _ in m.nets["res"].seen} == {(1, 1, 8, 8, 8)}  # one window per call, of the given size
    assert m.hparams.sliding_window == {"roi_size": None, "batch_size": 3, "overlap": 0.25}  # nothing mutated
    assert m.describe(num_steps=2, eta=0.5) == "RDDM restoration, 2 steps, eta 0.5"
    assert m.describe() == "RDDM restoration, 5 steps"


def test_restore_refuses_bad_options_before_sampling():
    m = _model(2).eval()
    x = _batch(2, 16)[keys.SOURCE]
    for options, message in (
        ({"strength": 0.3}, "RDDM takes no option strength; valid: num_steps, eta, sw_batch_size, overlap"),
        ({"num_steps": 0}, "num_steps must be in 1..1000"),
        ({"eta": -1.0}, "eta must be >= 0"),
        ({"sw_batch_size": 0}, "batch_size must be >= 1"),
    ):
        with pytest.raises(ValueError, match=message):
            m.restore(x, **options)
    assert m.nets["res"].seen == []
    with pytest.raises(ValueError, match="roi_size needs 2 positive multiples of 1"):
        m.restore(x, roi_size=(8, 8, 8))


def test_sliding_windows_with_overlap_stay_close_to_whole_volume_inference():
    """A deterministic model (eta = 0, seeded start noise) whose networks see only a 3x3 neighbourhood: windows of
    half the volume with overlap differ from whole-volume inference only near window borders (zero padding), by a
    small amount."""
    m = _model(3).eval()
    x = _batch(3, 16, b=1)[keys.SOURCE]
    whole = m.restore(x, generator=torch.Generator().manual_seed(0), num_steps=2)
    windows = m.restore(x, generator=torch.Generator().manual_seed(0), num_steps=2, roi_size=(8, 8, 8), overlap=0.5)
    covering = m.restore(x, generator=torch.Generator().manual_seed(0), num_steps=2, roi_size=(16, 16, 16))
    assert torch.equal(covering, whole)
    err = (windows - whole).abs()
    assert err.mean() < 0.05 and err.max() < 0.5


def test_export_round_trip_keeps_the_option_groups(tmp_path):
    from medfusion.models.export import export_model, load_model, module_config

    torch.manual_seed(0)
    m = RDDM(unet=TINY_UNET, sliding_window=SlidingWindow((16, 16), 2, 0.5), num_sampling_steps=2).eval()
    cfg = module_config(m)["init_args"]
    assert cfg["unet"]["channels"] == [8, 16] and cfg["sliding_window"]["roi_size"] == [16, 16]
    loaded = load_model(export_model(m, tmp_path / "m"))
    x = _batch(2, 16)[keys.SOURCE]
    torch.testing.assert_close(
        loaded.restore(x, generator=torch.Generator().manual_seed(1)),
        m.restore(x, generator=torch.Generator().manual_seed(1)),
    )


def test_validation_psnr_is_the_eval_psnr_of_the_clamped_output():
    from medfusion.eval.image import batch_mean, psnr

    m = _model(2, val_num_samples=2).eval()
    batch = _batch(2, 16)
    logged = {}
    m.log = lambda name, value, **kw: logged.__setitem__(name, value)  # type: ignore[method-assign]
    m.validation_step(batch, 0)
    out = m.sample(batch[keys.SOURCE], generator=torch.Generator().manual_seed(0))
    assert logged["val/psnr"] == pytest.approx(batch_mean(psnr, out.clamp(-1, 1), batch[keys.TARGET], 2.0))

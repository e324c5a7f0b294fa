"""DiffusionCT: stage-1 autoencoder and stage-2 latent DDPM (tiny, CPU, seeded)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.models.diffusion_ct import (
    AdversarialConfig,
    DenoiserConfig,
    DiffusionCT,
    DiffusionCTAutoencoder,
    RegressionConfig,
    SamplingConfig,
)
from medfusion.models.export import export_model

AE_KW = dict(channels=(8, 16), latent_channels=2, norm_num_groups=4, num_res_blocks=1)
DENOISER = DenoiserConfig(channels=(16, 32), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8)


def _size(spatial_dims: int) -> tuple[int, ...]:
    return (32, 32) if spatial_dims == 2 else (16, 16, 16)


def _pair(spatial_dims: int, n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """Source = target + noise: a toy 'non-standard protocol'."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, 1, *_size(spatial_dims))
    target = torch.rand(shape, generator=g) * 1.2 - 0.8
    source = target + 0.2 * torch.randn(shape, generator=g)
    return {keys.SOURCE: source, keys.TARGET: target}


def _trainer(tmp_path, steps: int, val: bool = False) -> L.Trainer:
    return L.Trainer(
        max_steps=steps, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, default_root_dir=tmp_path, num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0, check_val_every_n_epoch=None if val else 1,
        val_check_interval=steps if val else None,
    )  # fmt: skip


def _export_ae(sd, tmp_path_factory):
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=sd, **AE_KW)
    batch = _pair(sd)
    ae.calibrate_latent_scale([batch])
    path = tmp_path_factory.mktemp(f"ae{sd}") / "stage1"
    export_model(ae, path)
    return sd, path, batch


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def exported_ae(request, tmp_path_factory):
    return _export_ae(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def ae2d(tmp_path_factory):
    return _export_ae(2, tmp_path_factory)


# ------------------------------------------------------------------------------------------- stage 1
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("architecture", ["kl", "skip"])
def test_autoencoder_shapes(spatial_dims, architecture):
    skip = architecture == "skip"
    ae = DiffusionCTAutoencoder(spatial_dims=spatial_dims, architecture=architecture, **AE_KW)
    x = _pair(spatial_dims)[keys.SOURCE]
    enc = ae.encode(x)
    assert enc.mean.shape == (4, 2, *[s // 2 for s in x.shape[2:]])
    assert enc.sigma.shape == enc.mean.shape
    assert len(enc.skips) == (1 if skip else 0)
    assert ae.reconstruct(x).shape == x.shape
    assert ae.downsample_factor == 2


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_autoencoder_one_step_lowers_loss(spatial_dims):
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=spatial_dims, **AE_KW)
    x = ae._images(_pair(spatial_dims))
    opt = torch.optim.Adam(ae.parameters(), lr=1e-3)
    before, _ = ae.loss(x, generator=torch.Generator().manual_seed(1))
    before.backward()
    opt.step()
    after, _ = ae.loss(x, generator=torch.Generator().manual_seed(1))
    assert after.item() < before.item()


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_kl_term_is_per_image_pixel(spatial_dims):
    """loss = L1(D(mu + sigma eps), x) + w KL_sum / n_pixels: the KL (summed over the latent) is divided by the
    image's pixel count, so kl_weight weighs it against the per-pixel L1 as Rombach et al. weigh theirs against a
    summed loss (module docstring: a summed KL against a mean L1 starved the latent)."""
    torch.manual_seed(0)
    w = 0.5
    ae = DiffusionCTAutoencoder(spatial_dims=spatial_dims, kl_weight=w, ssim_weight=0.0, **AE_KW)
    x = ae._images(_pair(spatial_dims))
    loss = ae.loss(x, generator=torch.Generator().manual_seed(1))[0]
    enc = ae.encode(x)
    eps = torch.randn(enc.mean.shape, generator=torch.Generator().manual_seed(1))
    l1 = torch.nn.functional.l1_loss(ae.decode(enc.mean + enc.sigma * eps), x)
    var = enc.sigma.pow(2)
    kl = 0.5 * (enc.mean.pow(2) + var - var.log() - 1).flatten(1).sum(1).mean()
    torch.testing.assert_close(loss, l1 + w * kl / x[0].numel())


@pytest.mark.parametrize("start", [0, 100], ids=["adversarial", "warm-up"])
def test_patch_adversarial_term_trains_a_discriminator(tmp_path, start):
    """adv_weight > 0: generator and discriminator step in turn (2 optimiser steps per iteration); during the
    warm-up (iteration < adv_start_step) the discriminator does not move and the loss has no adversarial term."""
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(
        spatial_dims=2, adversarial=AdversarialConfig(weight=0.1, start_step=start, disc_channels=8), **AE_KW
    )
    plain = DiffusionCTAutoencoder(spatial_dims=2, **AE_KW)
    plain.net.load_state_dict(ae.net.state_dict())
    x = ae._images(_pair(2))
    g = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    with_adv, _ = ae.loss(x, generator=g())
    without, _ = plain.loss(x, generator=g())
    assert (with_adv.item() > without.item()) == (start == 0)
    # the generator's loss never reaches the discriminator's weights (one shared backward per step under DDP)
    with_adv.backward()
    assert all(q.grad is None for q in ae.discriminator.parameters())
    ae.zero_grad()
    disc0 = [q.detach().clone() for q in ae.discriminator.parameters()]
    net0 = [q.detach().clone() for q in ae.net.parameters()]
    batch = _pair(2)
    _trainer(tmp_path, 6).fit(
        ae, DataLoader([{k: v[i] for k, v in batch.items()} for i in range(4)], batch_size=2)
    )
    assert ae.trainer.global_step == 6 and ae._iteration() == 3
    moved = any(not torch.equal(a, b) for a, b in zip(disc0, ae.discriminator.parameters()))
    assert moved == (start == 0)
    assert any(not torch.equal(a, b) for a, b in zip(net0, ae.net.parameters()))
    with pytest.raises(ValueError, match="weight"):
        AdversarialConfig(weight=-1.0)


def test_latent_scale_round_trip_and_running_estimate(tmp_path):
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, **AE_KW)
    batches = [_pair(2, seed=s) for s in range(3)]
    scale = ae.calibrate_latent_scale(batches)
    x = ae._images(batches[0])
    mus = torch.cat([ae.encode(ae._images(b)).mean for b in batches])
    assert scale == pytest.approx(1 / mus.std().item(), rel=1e-4)
    z, skips = ae.encode_latent(x)
    assert z.std().item() == pytest.approx(1.0, abs=0.3)
    # encode -> scale -> unscale -> decode equals the plain reconstruction
    torch.testing.assert_close(ae.decode_latent(z, skips), ae.reconstruct(x))
    # the running estimate during training is stored in the weights
    ae2 = DiffusionCTAutoencoder(spatial_dims=2, **AE_KW)
    _trainer(tmp_path, 2).fit(
        ae2, DataLoader([{k: v[i] for k, v in batches[0].items()} for i in range(4)], batch_size=2)
    )
    assert float(ae2.latent_var) > 0 and float(ae2.latent_scale) == pytest.approx(
        float(ae2.latent_var) ** -0.5
    )
    assert "latent_scale" in ae2.state_dict()


# ------------------------------------------------------------------------------------------- stage 2
def _stage2(path, mode="conditional", sampling=None, **kw):
    torch.manual_seed(0)
    sampling = SamplingConfig(num_steps=3, **(sampling or {}))
    return DiffusionCT(autoencoder=str(path), mode=mode, sampling=sampling, ema_decay=0.9, denoiser=DENOISER, **kw)


@pytest.mark.parametrize("mode", ["conditional", "translate"])
def test_stage2_shapes_and_one_step_lowers_loss(exported_ae, mode):
    sd, path, batch = exported_ae
    model = _stage2(path, mode)
    assert model.spatial_dims == sd
    opt = torch.optim.AdamW(model.net.parameters(), lr=1e-3)
    before = model.loss(batch, generator=torch.Generator().manual_seed(3))
    before.backward()
    opt.step()
    after = model.loss(batch, generator=torch.Generator().manual_seed(3))
    assert after.item() < before.item()
    out = model.standardize(batch[keys.SOURCE][:2], generator=torch.Generator().manual_seed(0))
    assert out.shape == batch[keys.SOURCE][:2].shape and torch.isfinite(out).all()


def test_translate_mode_trains_on_standard_scans_alone(ae2d, tmp_path):
    """Unpaired training (issue 5): translate mode needs only standard-protocol scans (``image`` batches, as the
    built-in ``image.json`` manifest gives); the loss equals the paired batch's, whose source it ignores; a Lightning
    fit with validation runs on image-only batches; conditional mode refuses them with a clear error."""
    _, path, batch = ae2d
    model = _stage2(path, "translate")
    unpaired = {keys.IMAGE: batch[keys.TARGET]}
    torch.testing.assert_close(
        model.loss(unpaired, generator=torch.Generator().manual_seed(1)),
        model.loss(batch, generator=torch.Generator().manual_seed(1)),
    )
    data = [{keys.IMAGE: unpaired[keys.IMAGE][i]} for i in range(4)]
    before = [p.detach().clone() for p in model.net.parameters()]
    _trainer(tmp_path, 2, val=True).fit(model, DataLoader(data, batch_size=2), DataLoader(data, batch_size=2))
    assert any(not torch.equal(a, b) for a, b in zip(before, model.net.parameters()))
    with pytest.raises(ValueError, match="conditional mode trains on pairs"):
        _stage2(path, "conditional").loss(unpaired)
    with pytest.raises(ValueError, match="translate mode trains on standard-protocol scans"):
        model.loss({keys.SOURCE: batch[keys.SOURCE]})


def test_stage2_pickles_for_ddp_spawn_and_its_ema_still_averages(ae2d):
    """ddp_spawn pickles the LightningModule: the stage-2 AveragedModel must not hold torch's EMA closure."""
    import pickle

    m2 = pickle.loads(pickle.dumps(_stage2(ae2d[1])))
    m2.ema.update_parameters(m2.net)  # the first update copies the weights
    old = [p.detach().clone() for p in m2.net.parameters()]
    with torch.no_grad():
        for p in m2.net.parameters():
            p.add_(1.0)
    m2.ema.update_parameters(m2.net)
    d = min(m2.hparams.ema_decay, 1 - 2 ** (-2 / 3))  # the warmed-up decay of the first update after the copy
    assert m2.averaged() is m2.ema.module
    for o, e in zip(old, m2.ema.module.parameters()):
        torch.testing.assert_close(e, d * o + (1 - d) * (o + 1.0))


def test_stage1_frozen_during_stage2_training(ae2d, tmp_path):
    sd, path, batch = ae2d
    model = _stage2(path)
    ae_before = {k: v.clone() for k, v in model.autoencoder.state_dict().items()}
    net_before = {k: v.clone() for k, v in model.net.state_dict().items()}
    data = [{k: v[i] for k, v in batch.items()} for i in range(4)]
    trainer = _trainer(tmp_path, 3, val=True)
    trainer.fit(model, DataLoader(data, batch_size=2), DataLoader(data[:2], batch_size=2))
    assert {"val/loss", "val/psnr", "val/ssim"} <= set(trainer.callback_metrics)
    for k, v in model.autoencoder.state_dict().items():
        assert torch.equal(v, ae_before[k]), k
    assert not model.autoencoder.training
    assert any(not torch.equal(v, net_before[k]) for k, v in model.net.state_dict().items())
    assert float(model.residual_scale) > 0
    assert int(model.ema.n_averaged) == 3


def test_seeded_sampling_is_deterministic(exported_ae):
    sd, path, batch = exported_ae
    model = _stage2(path)
    model.loss(batch)  # calibrates the residual scale
    x = batch[keys.SOURCE][:2]
    a = model.standardize(x, generator=torch.Generator().manual_seed(5), sampler="ddpm")
    b = model.standardize(x, generator=torch.Generator().manual_seed(5), sampler="ddpm")
    c = model.standardize(x, generator=torch.Generator().manual_seed(6), sampler="ddpm")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_translate_strength_zero_returns_reconstruction(ae2d):
    sd, path, batch = ae2d
    model = _stage2(path, "translate")
    x = batch[keys.SOURCE][:2]
    out = model.standardize(x, strength=0.0)
    torch.testing.assert_close(out, model.autoencoder.reconstruct(x))
    partial = model.standardize(x, strength=0.3, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(partial, out)


@pytest.mark.parametrize("architecture", ["kl", "skip"])
def test_residual_decoding_adds_the_decoded_latent_change_to_the_input(tmp_path, architecture):
    """decode='residual': y = x + D(z_hat) - D(E(x)); an unchanged latent returns the input exactly (any ceiling)."""
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, architecture=architecture, **AE_KW)
    batch = _pair(2)
    ae.calibrate_latent_scale([batch])
    export_model(ae, tmp_path / "stage1")
    model = _stage2(tmp_path / "stage1", "translate")
    x = batch[keys.SOURCE][:2]
    assert not torch.allclose(
        ae.reconstruct(x), x, atol=1e-2
    )  # an untrained autoencoder is far from lossless
    torch.testing.assert_close(model.standardize(x, strength=0.0, decode="residual"), x)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    latent = model.standardize(x, strength=0.4, generator=gen())
    resid = model.standardize(x, strength=0.4, generator=gen(), decode="residual")
    torch.testing.assert_close(resid, x + latent - ae.reconstruct(x), atol=1e-5, rtol=1e-5)
    # residual_sigma: only the low-pass of the autoencoder's error is kept (a constant error passes whole)
    from monai.networks.layers import GaussianFilter

    lp = model.standardize(x, strength=0.4, generator=gen(), decode="residual", residual_sigma=1.5)
    err = GaussianFilter(2, 1.5)(x - ae.reconstruct(x))
    torch.testing.assert_close(lp, latent + err, atol=1e-5, rtol=1e-5)
    assert (lp - latent).std() < (resid - latent).std()  # the fine part of the error is dropped
    with pytest.raises(ValueError, match="residual_sigma"):
        model.standardize(x, decode="residual", residual_sigma=-1.0)
    with pytest.raises(ValueError, match="latent"):
        model.standardize(x, decode="pixel")
    with pytest.raises(ValueError, match="residual"):
        SamplingConfig(decode="both")


def test_bad_arguments_raise_clear_errors(ae2d, tmp_path):
    sd, path, batch = ae2d
    with pytest.raises(ValueError, match="conditional"):
        DiffusionCT(autoencoder=str(path), mode="paired")
    with pytest.raises(ValueError, match="strength"):
        SamplingConfig(strength=1.5)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        SamplingConfig(sampler="euler_magic")
    with pytest.raises(ValueError, match="dpmpp_2m"):
        DiffusionCT(autoencoder=str(path), sampling={"sampler": "euler_magic"})
    with pytest.raises(ValueError, match="epsilon"):
        DiffusionCT(autoencoder=str(path), prediction="noise")
    with pytest.raises(FileNotFoundError):
        DiffusionCT(autoencoder=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="autoencoder"):
        DiffusionCT()
    model = _stage2(path)
    with pytest.raises(RuntimeError, match="residual_scale"):
        model.standardize(batch[keys.SOURCE][:1])
    model.loss(batch)
    odd = torch.zeros(1, 1, *[s + 2 for s in _size(sd)])
    with pytest.raises(ValueError, match="multiples"):
        model.standardize(odd)


class _SavesWeightsPerRank:
    """Mixin for a LightningModule: writes each rank's weights to ``out_dir/rank<r>.pt`` when training ends."""

    def __init__(self, out_dir: str = "", **kw):
        super().__init__(**kw)
        self.out_dir = out_dir

    def on_train_end(self):
        torch.save(
            {k: v.detach().clone() for k, v in self.state_dict().items()},
            f"{self.out_dir}/rank{self.global_rank}.pt",
        )


def _fit_on_two_ranks(module, data, steps: int, tmp_path) -> tuple[dict, dict]:
    """Train ``module`` (a :class:`_SavesWeightsPerRank`) on 2 CPU ranks (gloo, ddp_spawn); each rank's weights."""
    import warnings

    trainer = L.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, DataLoader(data, batch_size=2))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    return r0, r1


# ------------------------------------------------------------------------------------------- regression (CorrDiff)
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_regression_learns_the_mean_and_the_ddpm_the_rest(spatial_dims, tmp_path_factory):
    """regression=True: the regression U-Net's MSE and the DDPM loss both fall; the DDPM's target is the scaled
    residual minus the (detached) regression output, and mean_only decodes z_src + mu / r."""
    sd, path, batch = _export_ae(spatial_dims, tmp_path_factory)
    model = _stage2(path, regression=RegressionConfig(channels=(8, 16), lr=1e-3))
    params = [*model.net.parameters(), *model.regressor.parameters()]
    groups = model.configure_optimizers().param_groups
    assert [g["params"] for g in groups] == [list(model.net.parameters()), list(model.regressor.parameters())]
    assert [g["lr"] for g in groups] == [model.hparams.lr, 1e-3]
    opt = torch.optim.Adam(params, lr=3e-3)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    first = model.losses(batch, generator=gen())
    assert first[1] > 0  # gate 0: mu = 0, so the regression loss is E[(r (z_std - z_src))^2] ~ 1
    torch.testing.assert_close(first[1], torch.tensor(1.0), atol=0.3, rtol=0)
    for _ in range(30):
        opt.zero_grad()
        model.loss(batch, generator=gen()).backward()
        opt.step()
    last = model.losses(batch, generator=gen())
    assert last[0] < first[0] and last[1] < 0.9 * first[1]
    # the regression gets no gradient from the DDPM loss (its output enters the DDPM's target detached)
    opt.zero_grad()
    model.losses(batch, generator=gen())[0].backward()
    assert all(p.grad is None or not p.grad.any() for p in model.regressor.parameters())
    # the DDPM's clean sample is the scaled residual minus the regression output
    z_src, z_tgt = model._latents(batch)
    mean = model.regressor(z_src).detach()
    x0, cond = model.diffusion_target(z_src, z_tgt, mean)
    torch.testing.assert_close(x0, (z_tgt - z_src) * model.residual_scale - mean)
    assert cond is z_src
    # mean_only: the regression's latent, decoded; deterministic (no generator needed)
    x = batch[keys.SOURCE][:2]
    z, skips = model.autoencoder.encode_latent(x)
    expect = model.autoencoder.decode_latent(z + model.regressor(z) / model.residual_scale, skips)
    torch.testing.assert_close(model.standardize(x, mean_only=True), expect)
    sampled = model.standardize(x, generator=torch.Generator().manual_seed(0))
    assert sampled.shape == x.shape and not torch.allclose(sampled, expect)


def test_default_output_is_the_posterior_mean_when_the_model_says_so(ae2d, tmp_path):
    """``SamplingConfig.mean_only`` makes the regression's mean the default output (what ``medfusion demo`` sets
    when validation chooses it); ``mean_only=False`` still draws the sample; the choice survives export."""
    from medfusion.models.export import export_model, load_model

    sd, path, batch = ae2d
    model = _stage2(path, sampling={"mean_only": True}, regression=RegressionConfig(channels=(8, 16)))
    model.loss(batch)  # calibrates the residual scale
    model.eval()
    x = batch[keys.SOURCE][:2]
    mean = model.standardize(x, mean_only=True)
    torch.testing.assert_close(model.standardize(x), mean)
    assert model.inference_options()["mean_only"] is True and "regression mean" in model.describe()
    sampled = model.standardize(x, mean_only=False, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(sampled, mean)
    export_model(model, tmp_path / "m")
    torch.testing.assert_close(load_model(tmp_path / "m").restore(x, generator=None), mean)
    with pytest.raises(ValueError, match="mean_only needs a model trained with a regression"):
        _stage2(path, sampling={"mean_only": True})


def test_regression_bad_arguments(ae2d):
    sd, path, batch = ae2d
    with pytest.raises(ValueError, match="conditional"):
        _stage2(path, "translate", regression=RegressionConfig(channels=(8, 16)))
    with pytest.raises(ValueError, match="residual=True"):
        _stage2(path, regression=RegressionConfig(channels=(8, 16)), residual=False)
    with pytest.raises(ValueError, match="two levels"):
        RegressionConfig(channels=(8,))
    model = _stage2(path)
    model.loss(batch)
    with pytest.raises(ValueError, match="regression"):
        model.standardize(batch[keys.SOURCE][:1], mean_only=True)


class _Stage2RankSaver(_SavesWeightsPerRank, DiffusionCT):
    """Stage 2 that writes each rank's weights."""


@pytest.mark.slow
def test_regression_stage2_under_ddp_keeps_ranks_in_sync(ae2d, tmp_path):
    """2 CPU ranks (gloo, ddp_spawn): the regression U-Net and the DDPM train in the same step, so DDP sees every
    parameter used; afterwards both nets and their EMA are equal on both ranks."""

    sd, path, batch = ae2d
    torch.manual_seed(0)
    module = _Stage2RankSaver(
        str(tmp_path), autoencoder=str(path), regression=RegressionConfig(channels=(8, 16)), ema_decay=0.9,
        val_num_samples=0, denoiser=DENOISER,
    )  # fmt: skip
    data = [{k: v[i % 4] for k, v in batch.items()} for i in range(8)]
    gate = module.regressor.gate.detach().clone()
    r0, r1 = _fit_on_two_ranks(module, data, 4, tmp_path)
    weights = [k for k in r0 if k.startswith(("net.", "regressor.", "ema.module."))]
    assert any(k.startswith("regressor.") for k in weights)
    assert not torch.equal(r0["regressor.gate"], gate)  # it trained
    for k in weights:
        torch.testing.assert_close(r0[k], r1[k], msg=k)
    assert float(r0["residual_scale"]) > 0 and torch.equal(r0["residual_scale"], r1["residual_scale"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_pixel_shuffle_runs_the_networks_on_the_finer_grid(spatial_dims, tmp_path):
    """pixel_shuffle=1: the denoiser and the regression see (B, C_lat / 2^d, *latent * 2) and their outputs come back
    on the latent grid; training and sampling work; a latent width the shuffle cannot divide raises."""
    torch.manual_seed(0)
    c_lat = 2**spatial_dims
    ae = DiffusionCTAutoencoder(spatial_dims=spatial_dims, **{**AE_KW, "latent_channels": c_lat})
    batch = _pair(spatial_dims)
    ae.calibrate_latent_scale([batch])
    export_model(ae, tmp_path / "stage1")
    model = _stage2(tmp_path / "stage1", regression=RegressionConfig(channels=(8, 16)), pixel_shuffle=1)
    seen = []
    model.net.net.register_forward_hook(lambda mod, inp, out: seen.append((inp[0].shape, out.shape)))  # in ImageGrid
    z, _ = ae.encode_latent(batch[keys.SOURCE])
    finer = (z.shape[0], 1, *(2 * s for s in z.shape[2:]))
    assert model.divisible_by == ae.downsample_factor  # the U-Nets' one downsampling is undone by the shuffle
    opt = torch.optim.Adam([*model.net.parameters(), *model.regressor.parameters()], lr=3e-3)
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    before = model.loss(batch, generator=gen())
    assert seen[-1] == (finer, finer)
    before.backward()
    opt.step()
    assert model.loss(batch, generator=gen()) < before
    assert model.regressor(z).shape == z.shape
    x = batch[keys.SOURCE][:2]
    out = model.standardize(x, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="divisible by"):
        _stage2(tmp_path / "stage1", pixel_shuffle=2)
    with pytest.raises(ValueError, match=">= 0"):
        _stage2(tmp_path / "stage1", pixel_shuffle=-1)


# ------------------------------------------------------------------------------------------- inference contract
def test_restore_options_defaults_and_refusals(ae2d):
    """restore(): options default to the model's SamplingConfig; options a model cannot take raise ValueError
    naming the problem (before any image is touched); restore equals standardize with the same options."""
    sd, path, batch = ae2d
    cond = _stage2(path, regression=RegressionConfig(channels=(8, 16)), sampling={"decode": "residual"})
    cond.loss(batch)
    assert cond.inference_options() == {
        "num_steps": 3, "sampler": "dpmpp_2m", "cache_interval": 1, "time_shift": 0, "decode": "residual",
        "residual_sigma": 0.0, "mean_only": False, "sw_batch_size": 4, "overlap": 0.25,
    }  # fmt: skip
    trans = _stage2(path, "translate", sampling={"strength": 0.3})
    assert trans.inference_options()["strength"] == 0.3 and "mean_only" not in trans.inference_options()
    x = batch[keys.SOURCE][:2]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    torch.testing.assert_close(
        cond.restore(x, generator=gen(), num_steps=2, sampler="ddim"),
        cond.standardize(x, generator=gen(), num_steps=2, sampler="ddim"),
    )
    assert cond.hparams.sampling["num_steps"] == 3  # call options never touch the hyper-parameters
    for model, options, match in [
        (cond, {"steps": 3}, "unknown DiffusionCT option.*num_steps"),
        (cond, {"strength": 0.5}, "translate-mode models only"),
        (trans, {"mean_only": True}, "regression"),
        (cond, {"num_steps": 0}, "num_steps"),
        (cond, {"sampler": "euler"}, "dpmpp_2m"),
        (trans, {"strength": 1.5}, "strength"),
        (cond, {"decode": "pixel"}, "latent"),
        (cond, {"residual_sigma": -1.0}, "residual_sigma"),
        (cond, {"overlap": 1.0}, "overlap"),
        (cond, {"cache_interval": 0}, "cache_interval"),
        (cond, {"time_shift": -1}, "time_shift"),
    ]:
        with pytest.raises(ValueError, match=match):
            model.check_options(**options)
        with pytest.raises(ValueError, match=match):
            model.restore(x, **options)
    assert cond.describe() == "DiffusionCT standardization, dpmpp_2m 3 steps, residual decoding"
    assert cond.describe(mean_only=True, decode="latent") == (
        "DiffusionCT standardization, regression mean (no sampling), latent decoding"
    )
    assert trans.describe(num_steps=5) == "DiffusionCT standardization, dpmpp_2m 5 steps, strength 0.3, latent decoding"


@pytest.mark.parametrize("sampler", ["plms", "pndm", "deis"])
def test_fast_samplers_deepcache_and_time_shift_options(ae2d, sampler):
    """Issue 22: every registered sampler runs; DeepCache interval 1 and a zero time-shift window are the plain
    sampler exactly, while cache_interval=2 / time_shift=20 change the sample; the options reach describe()."""
    _, path, batch = ae2d
    model = _stage2(path, sampling={"sampler": sampler})
    model.loss(batch)
    with torch.no_grad():  # MONAI zero-initialises the output convolution: give it weights so that outputs differ
        for p in model.averaged(True).parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = batch[keys.SOURCE][:2]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    ref = model.standardize(x, generator=gen())
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(model.restore(x, generator=gen(), cache_interval=1, time_shift=0), ref, rtol=0, atol=0)
    cached = model.restore(x, generator=gen(), cache_interval=2)
    shifted = model.restore(x, generator=gen(), time_shift=20)
    assert torch.isfinite(cached).all() and not torch.equal(cached, ref)
    assert torch.isfinite(shifted).all() and not torch.equal(shifted, ref)
    assert model.describe(cache_interval=2, time_shift=20) == (
        f"DiffusionCT standardization, {sampler} 3 steps, DeepCache every 2, time shift window 20, latent decoding"
    )
    cfg = SamplingConfig(cache_interval=3, time_shift=10, time_shift_cutoff=100, time_shift_variance=1.0)
    assert DiffusionCT(autoencoder=str(path), sampling=cfg, denoiser=DENOISER).inference_options()["cache_interval"] == 3
    with pytest.raises(ValueError, match="time_shift_variance"):
        SamplingConfig(time_shift_variance=-1.0)

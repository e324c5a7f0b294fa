"""Kill and resume gives the same training run (user_asks §0.12) for every medfusion LightningModule.

Run A trains 6 steps uninterrupted; run B, configured identically (``max_steps=6``, so LR schedules match), writes a
checkpoint with ``ModelCheckpoint(every_n_train_steps=3)`` after step 3 (the last batch of epoch 0) and is then killed
(an exception); a new module and a new trainer resume from that file (``fit(ckpt_path=...)``) for steps 4-6. The data
order is fixed (a 3-batch in-memory dataset, no shuffling), so only the module's own randomness (noise, timesteps,
fields) can make the runs differ. Raw and EMA weights must come back from their own entries of the checkpoint.

Lightning caveat (2.6.6, not ours): a checkpoint written by ``ModelCheckpoint(every_n_epochs=1,
save_on_train_epoch_end=True)`` in a run without validation resumes by re-entering the finished epoch with a fresh
iterator and training one extra batch (batch index 3 of 3), so the *data* order of the resumed run differs
(Lightning#5325/#850 family). Step-count checkpoints on the epoch's last batch resume exactly.
"""

from __future__ import annotations

import types
import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.models._rng import RNG_KEY, SCHEME, StepRNG, step_seed
from medfusion.models.callbacks import EMA, EMA_KEY
from medfusion.models.diffir import DiffIRStage2
from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
from medfusion.models.drdm import DRDM
from medfusion.models.export import export_model
from medfusion.models.rddm import RDDM

N_BATCHES, BATCH = 3, 2  # one epoch = 3 optimiser steps: the checkpoint after step 3 is an end-of-epoch one


def _samples(n: int = N_BATCHES * BATCH, size: int = 32) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        clean = torch.rand(1, size, size, generator=g) * 1.6 - 0.8
        noisy = clean + 0.1 * torch.randn(clean.shape, generator=g)
        out.append({keys.IMAGE: clean, keys.TARGET: clean, keys.SOURCE: noisy})
    return out


def _loader() -> DataLoader:
    return DataLoader(_samples(), batch_size=BATCH, shuffle=False)


class _Record(Callback):
    """Loss of every optimiser step (keyed 1..n by the global step after it) and the weights when training starts."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.at_start: dict[str, torch.Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


class _Killed(Exception):
    pass


class _Kill(Callback):
    """Kills the run before the optimiser step ``at + 1`` starts (the checkpoint of step ``at`` is on disk)."""

    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise _Killed(f"killed at step {self.at}")


def _fit(module, max_steps: int, root, *, ckpt_path=None, callbacks=()) -> tuple[L.Trainer, _Record]:
    rec = _Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[rec, *callbacks], default_root_dir=root,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's few-workers / small-batch advice
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer, rec


def _state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def _kill_and_resume(build, tmp_path, callbacks=lambda: [], resume_seed: int = 1234, k: int = 1):
    """Runs A (6 steps) and B (3 steps, checkpoint, new module, 3 more); returns what the tests compare.

    ``k``: optimiser steps per training iteration (2 with a GAN's two optimisers; Lightning counts both)."""
    torch.manual_seed(0)
    a = build()
    cb_a = callbacks()
    _, rec_a = _fit(a, 6 * k, tmp_path / "a", callbacks=cb_a)

    torch.manual_seed(0)
    b = build()
    cb_b = callbacks()
    # written at the end of step 3, the last batch of epoch 0 (Lightning 2.6 then resumes at epoch 1, batch 0; an
    # every_n_epochs checkpoint without validation re-enters epoch 0 and replays one batch, see the module docstring)
    saver = ModelCheckpoint(tmp_path / "b", "{step}", save_top_k=-1, every_n_train_steps=3 * k)
    with pytest.raises(_Killed):
        _fit(b, 6 * k, tmp_path / "b", callbacks=[*cb_b, saver, _Kill(3 * k)])
    ckpt = tmp_path / "b" / f"step={3 * k}.ckpt"

    torch.manual_seed(resume_seed)  # by default seeded differently: the checkpoint's seed must win
    c = build()
    cb_c = callbacks()
    _, rec_c = _fit(c, 6 * k, tmp_path / "c", ckpt_path=ckpt, callbacks=cb_c)

    assert sorted(rec_a.losses) == [k * i for i in range(1, 7)]
    assert sorted(rec_c.losses) == [k * i for i in (4, 5, 6)]
    for step in (4 * k, 5 * k, 6 * k):
        assert rec_c.losses[step] == pytest.approx(rec_a.losses[step], abs=1e-5), step
    # the losses really depend on the noise: the steps do not all give one value
    assert len({round(v, 6) for v in rec_a.losses.values()}) > 1
    _assert_same(_state(a), _state(c))  # raw and (in-module) EMA weights after step 6
    return types.SimpleNamespace(a=a, b=b, c=c, ckpt=ckpt, rec_c=rec_c, cb_a=cb_a, cb_b=cb_b, cb_c=cb_c)


def _check_checkpoint(run) -> dict:
    ckpt = torch.load(run.ckpt, map_location="cpu", weights_only=True)
    assert ckpt[RNG_KEY] == {"scheme": SCHEME, "seed": 0}
    # the resumed module started from exactly the saved weights
    _assert_same(_state(run.b), run.rec_c.at_start)
    return ckpt


def _assert_ema_restored(ckpt: dict, raw_prefix: str, run) -> None:
    """``ema.module.*`` came back as the EMA and ``raw_prefix.*`` as the raw weights (and they differ)."""
    sd = ckpt["state_dict"]
    ema = {k[len("ema.module.") :]: v for k, v in sd.items() if k.startswith("ema.module.")}
    raw = {k[len(raw_prefix) :]: v for k, v in sd.items() if k.startswith(raw_prefix)}
    assert ema and ema.keys() == raw.keys()
    assert any(not torch.allclose(ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    start = run.rec_c.at_start
    _assert_same(ema, {k: start["ema.module." + k] for k in ema})
    _assert_same(raw, {k: start[raw_prefix + k] for k in raw})


# ------------------------------------------------------------------------------------------- the modules
def test_drdm_resume_and_ema_callback(tmp_path):
    run = _kill_and_resume(
        lambda: DRDM(spatial_dims=2, recursion=1, ctl_size=32, timesteps=20, val_t_start=10, lr=1e-3),
        tmp_path,
        callbacks=lambda: [EMA(0.5, attr="recovery_net")],
    )
    ckpt = _check_checkpoint(run)
    # EMA callback: its averaged weights come back from the checkpoint's EMA entry, the raw ones from state_dict
    (ema_b,), (ema_a,), (ema_c,) = run.cb_b, run.cb_a, run.cb_c
    saved_ema = ckpt[EMA_KEY]
    raw = {k[len("recovery_net.") :]: v for k, v in ckpt["state_dict"].items()}
    assert any(not torch.allclose(saved_ema[k], raw[k]) for k in raw if raw[k].is_floating_point())
    _assert_same(saved_ema, _state(ema_b.ema.module))
    _assert_same(_state(ema_a.ema.module), _state(ema_c.ema.module))  # EMA after step 6 equals run A's


def _tiny_rddm() -> RDDM:
    return RDDM(
        spatial_dims=2, channels=(8, 16), attention_levels=(False, False), num_head_channels=8,
        unet_kwargs={"norm_num_groups": 4}, num_train_timesteps=100, lr=1e-3, ema_decay=0.5, ema_every=1,
        val_num_samples=0,
    )  # fmt: skip


def test_rddm_resume_restores_raw_and_ema(tmp_path):
    run = _kill_and_resume(_tiny_rddm, tmp_path)
    ckpt = _check_checkpoint(run)
    _assert_ema_restored(ckpt, "nets.", run)


AE_KW = dict(channels=(8, 16), latent_channels=2, norm_num_groups=4, num_res_blocks=1, kl_weight=1e-2)


@pytest.fixture(scope="module")
def tiny_ae(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "stage1"
    export_model(DiffusionCTAutoencoder(spatial_dims=2, **AE_KW), path)
    return path


def test_diffusion_ct_autoencoder_resume(tmp_path):
    run = _kill_and_resume(lambda: DiffusionCTAutoencoder(spatial_dims=2, ssim_weight=0.0, **AE_KW), tmp_path)
    _check_checkpoint(run)


def test_diffusion_ct_adversarial_autoencoder_resume(tmp_path):
    """Manual optimisation with two optimisers (generator, discriminator): both come back exactly."""
    run = _kill_and_resume(
        lambda: DiffusionCTAutoencoder(
            spatial_dims=2, ssim_weight=0.0, adv_weight=0.1, disc_channels=8, **AE_KW
        ),
        tmp_path,
        k=2,
    )
    ckpt = _check_checkpoint(run)
    assert len(ckpt["optimizer_states"]) == 2


class _GlobalRNGAutoencoder(DiffusionCTAutoencoder):
    """The pre-fix behaviour: training noise drawn from the process-global RNG."""

    def training_step(self, batch, batch_idx):
        x = self._images(batch)
        loss, _ = self.loss(x)
        self.log("train/loss", loss, batch_size=x.shape[0])
        return loss


def test_the_comparison_detects_noise_that_does_not_resume(tmp_path):
    """Negative control: with global-RNG noise, even a resumed process seeded like the first draws other noise."""
    with pytest.raises(AssertionError, match=r"^4\b"):
        _kill_and_resume(
            lambda: _GlobalRNGAutoencoder(spatial_dims=2, ssim_weight=0.0, **AE_KW), tmp_path, resume_seed=0
        )


def test_diffusion_ct_stage2_resume_restores_raw_and_ema(tmp_path, tiny_ae):
    run = _kill_and_resume(
        lambda: DiffusionCT(
            autoencoder=str(tiny_ae),
            channels=(8, 16),
            attention_levels=(False, False),
            num_head_channels=8,
            unet_kwargs={"norm_num_groups": 4},
            num_train_timesteps=100,
            lr=1e-3,
            ema_decay=0.5,
            val_num_samples=0,
        ),  # fmt: skip
        tmp_path,
    )
    ckpt = _check_checkpoint(run)
    _assert_ema_restored(ckpt, "net.", run)


def test_diffir_stage2_resume_across_the_phase_switch(tmp_path):
    tiny = dict(
        dim=8, num_blocks=(1, 1, 1, 1), num_refinement_blocks=1, heads=(1, 1, 2, 2), cpen_downscale=2, n_feats=8,
        n_encoder_res=1, val_num_samples=0,
    )  # fmt: skip
    run = _kill_and_resume(
        lambda: DiffIRStage2(
            spatial_dims=2, encoder_steps=4, lr=1e-3, lr_encoder=1e-3, ema_decay=0.5, **tiny
        ),
        tmp_path,
    )
    ckpt = _check_checkpoint(run)
    ema = {k for k in ckpt["state_dict"] if k.startswith("ema.module.")}
    assert {k.split(".")[2] for k in ema} == {"dirformer", "cpen_s2", "denoiser"}
    start = run.rec_c.at_start
    _assert_same({k: ckpt["state_dict"][k] for k in ema}, {k: start[k] for k in ema})


# ------------------------------------------------------------------------------------------- the mechanism
def test_old_checkpoint_without_rng_key_loads_with_a_warning(tmp_path):
    torch.manual_seed(0)
    m = _tiny_rddm()
    trainer, _ = _fit(m, 1, tmp_path)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt[RNG_KEY]
    torch.save(ckpt, path)
    resumed = _tiny_rddm()
    resumed._train_rng.seed = 77
    with pytest.warns(UserWarning, match=RNG_KEY):
        resumed.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    assert resumed._train_rng.seed == 77  # keeps its own seed
    _, rec = _fit(resumed, 2, tmp_path / "r", ckpt_path=path)  # and training goes on
    assert sorted(rec.losses) == [2]


def test_noise_differs_across_ranks_steps_and_micro_batches():
    rng = StepRNG(0)

    def draw(rank: int, step: int, batch_idx: int) -> torch.Tensor:
        trainer = types.SimpleNamespace(accumulate_grad_batches=4)
        module = types.SimpleNamespace(global_rank=rank, global_step=step, _trainer=trainer)
        return torch.randn(8, generator=rng.generator(module, batch_idx))

    ref = draw(0, 5, 2)
    torch.testing.assert_close(draw(0, 5, 2), ref)  # a position in training gives one stream
    torch.testing.assert_close(draw(0, 5, 6), ref)  # the micro-batch index within the step is what counts
    for other in (draw(1, 5, 2), draw(0, 6, 2), draw(0, 5, 3), draw(0, 6, 3)):  # rank, step, micro-batch
        assert not torch.allclose(other, ref)
    assert StepRNG(1).seed == 1 and step_seed(1, 0, 0, 0) != step_seed(0, 0, 0, 0)
    torch.manual_seed(42)
    assert StepRNG().seed == 42  # default: the experiment's seed_everything seed

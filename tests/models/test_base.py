"""The shared base of every method (medfusion.models.base): EMA against its closed form, checkpoint round trip and
exact resume of the average, `every`, bad arguments, the cosine schedule, per-rank noise under 2-process DDP."""

from __future__ import annotations

import math
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfusion.models.base import MedfusionModule, cosine_schedule

LR, W0, DECAY = 0.1, 1.0, 0.5


class Tiny(MedfusionModule):
    """One weight w with loss = w * x.sum(): constant gradient, so w_k = W0 - LR * k exactly (SGD)."""

    def __init__(self, ema_decay: float | None = DECAY, ema_every: int = 1, cosine: bool = False):
        super().__init__()
        self.save_hyperparameters()
        self.net = nn.Linear(1, 1, bias=False)
        self.other = nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            self.net.weight.fill_(W0)
            self.other.weight.fill_(W0)
        self.init_ema(ema_decay, "net", every=ema_every)
        self.noise: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        self.noise.append(torch.randn(4, generator=self.step_generator(batch_idx)))
        return (self.net.weight * x).sum() + 0 * self.other.weight.sum()

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=LR)
        return cosine_schedule(self, opt) if self.hparams.cosine else opt


def _loader(n=16):
    return DataLoader(TensorDataset(torch.ones(n, 1)), batch_size=1)


def _fit(module, max_steps, ckpt_path=None, **trainer_kwargs):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        **trainer_kwargs,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(), ckpt_path=ckpt_path)
    return trainer


def _closed_form(steps, decay=DECAY):
    """AveragedModel copies on its first update, then ema <- d_n ema + (1 - d_n) w after each listed step, with the
    warmed-up decay d_n = min(decay, 1 - (1 + n) ** (-2/3)) of the n-th update after the copy."""
    ema = None
    for n, k in enumerate(steps):
        w = W0 - LR * k
        d = min(decay, 1 - (1 + n) ** (-2 / 3))
        ema = w if ema is None else d * ema + (1 - d) * w
    return ema


def test_ema_matches_closed_form_and_sampling_uses_it():
    module = Tiny()
    _fit(module, 4)
    assert module.net.weight.item() == pytest.approx(W0 - 4 * LR)  # raw weights untouched
    assert module.averaged().weight.item() == pytest.approx(_closed_form(range(1, 5)))
    assert module.averaged(use_ema=False) is module.net


def test_ema_warm_up_equals_diffusers_ema_model_and_reaches_the_decay():
    """Oracle: diffusers' ``EMAModel(use_ema_warmup=True, inv_gamma=1, power=2/3)`` (the warm-up of ``ema_pytorch``,
    RDDM's official EMA) fed the same weights gives the same average; the decay reaches ``decay`` and stays."""
    from medfusion.models.base import EMAAvgFn

    diffusers_training_utils = pytest.importorskip("diffusers.training_utils")
    from torch.optim.swa_utils import AveragedModel

    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ours = AveragedModel(net, multi_avg_fn=EMAAvgFn(0.99), use_buffers=True)
    ref = diffusers_training_utils.EMAModel(
        net.parameters(), decay=0.99, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3, update_after_step=0
    )
    for _ in range(60):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        ref.step(net.parameters())
    for a, b in zip(ours.module.parameters(), ref.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    fn = EMAAvgFn(0.995)
    assert fn.decay_at(1) == pytest.approx(1 - 2 ** (-2 / 3))
    assert fn.decay_at(120) < 0.96  # a 1,200-step run updated every 10 steps averages its recent weights
    assert fn.decay_at(2900) == 0.995 and fn.decay_at(10**6) == 0.995


def test_ema_every_k_steps_and_several_sources():
    module = Tiny(ema_every=2)
    _fit(module, 5)
    assert int(module.ema.n_averaged) == 2
    assert module.averaged().weight.item() == pytest.approx(_closed_form([2, 4]))
    several = Tiny()
    several.init_ema(DECAY, "net", "other")
    _fit(several, 2)
    avg = several.averaged()
    assert isinstance(avg, nn.ModuleDict) and set(avg) == {"net", "other"}
    assert avg["net"].weight.item() == pytest.approx(_closed_form([1, 2]))


def test_no_ema_returns_the_raw_module_and_bad_arguments_raise():
    module = Tiny(ema_decay=None)
    _fit(module, 2)
    assert module.ema is None and module.averaged() is module.net
    for decay in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="ema_decay"):
            Tiny(ema_decay=decay)
    with pytest.raises(ValueError, match="every"):
        Tiny(ema_every=0)
    with pytest.raises(ValueError, match="names"):
        Tiny().init_ema(DECAY)


def test_checkpoint_holds_raw_and_average_and_resume_is_exact(tmp_path):
    path = str(tmp_path / "a.ckpt")
    module = Tiny()
    trainer = _fit(module, 2)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # plain data only
    assert float(ckpt["state_dict"]["net.weight"]) == pytest.approx(W0 - 2 * LR)
    assert float(ckpt["state_dict"]["ema.module.weight"]) == pytest.approx(_closed_form([1, 2]))
    assert ckpt["medfusion_class_path"] == f"{Tiny.__module__}.Tiny"

    resumed, straight = Tiny(), Tiny()
    _fit(resumed, 4, ckpt_path=path)
    _fit(straight, 4)
    assert resumed.averaged().weight.item() == pytest.approx(straight.averaged().weight.item())
    assert int(resumed.ema.n_averaged) == 4
    # the per-step generators continue where the interrupted run was: steps 3 and 4 draw the same noise
    assert torch.equal(torch.stack(resumed.noise), torch.stack(straight.noise[2:]))


def test_cosine_schedule_decays_to_the_floor():
    module = Tiny(ema_decay=None, cosine=True)
    trainer = _fit(module, 10)
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    assert lr == pytest.approx(LR * 0.05)  # the floor at the last step
    sched = trainer.lr_scheduler_configs[0].scheduler
    half = sched.lr_lambdas[0](5)
    assert half == pytest.approx(0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_cosine_schedule_without_a_finite_budget_is_a_constant_rate():
    module = Tiny(ema_decay=None)
    opt = torch.optim.SGD(module.parameters(), lr=LR)
    assert cosine_schedule(module, opt) is opt  # no trainer attached: no total known


def test_upgrade_hooks_default_to_identity():
    assert Tiny.upgrade_config({"a": 1}) == {"a": 1}
    state = {"w": torch.ones(1)}
    assert Tiny().upgrade_state_dict(state) is state


class Recorder(Tiny):
    def __init__(self, out_dir: str = ""):
        super().__init__()
        self.out_dir = out_dir

    def on_train_end(self):
        torch.save(
            {"noise": torch.stack(self.noise), "w": self.net.weight.detach().clone(),
             "ema": self.averaged().weight.detach().clone()},
            f"{self.out_dir}/rank{self.global_rank}.pt",
        )  # fmt: skip


@pytest.mark.slow
def test_ddp_two_ranks_draw_different_noise_but_share_weights_and_ema(tmp_path):
    """2 CPU processes (gloo): per-rank noise differs, weights and their average stay equal across ranks."""
    module = Recorder(str(tmp_path))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["noise"], r1["noise"])
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["ema"], r1["ema"])


class Windowed(Tiny):
    def __init__(self, hu_window: tuple[float, float] = (-1000.0, 1000.0)):
        super().__init__()
        self.save_hyperparameters()


class _Data(pl.LightningDataModule):
    def __init__(self, hu_window):
        super().__init__()
        self.hu_window = tuple(hu_window)

    def train_dataloader(self):
        return _loader(4)


def test_hu_window_mismatch_between_model_and_data_stops_fit_and_a_match_trains(tmp_path):
    """The window is set twice in a YAML (model and data): a mismatch would train on one scale and apply on another."""
    kwargs = dict(
        accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path,
    )
    assert Windowed((-1024.0, 2048.0)).hu_window == (-1024.0, 2048.0)
    assert Tiny().hu_window is None
    with pytest.raises(ValueError, match=r"hu_window \(-1000.0, 1000.0\) differs from the data's"):
        pl.Trainer(**kwargs).fit(Windowed(), datamodule=_Data((-1024.0, 2048.0)))
    trainer = pl.Trainer(**kwargs)
    trainer.fit(Windowed((-1024.0, 2048.0)), datamodule=_Data((-1024.0, 2048.0)))
    assert trainer.global_step == 1


def test_step_noise_differs_across_ranks_steps_and_micro_batches():
    import types

    from medfusion.models._rng import StepRNG, step_seed

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


def test_checkpoint_without_rng_entry_loads_with_a_warning_and_keeps_its_seed(tmp_path):
    from medfusion.models._rng import RNG_KEY

    trainer = _fit(Tiny(), 1)
    path = tmp_path / "old.ckpt"
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    del ckpt[RNG_KEY]
    torch.save(ckpt, path)
    resumed = Tiny()
    resumed._train_rng.seed = 77
    with pytest.warns(UserWarning, match=RNG_KEY):
        resumed.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    assert resumed._train_rng.seed == 77
    _fit(resumed, 2, ckpt_path=str(path))  # and training goes on
    assert len(resumed.noise) == 1

"""EMA callback: closed-form EMA math, validation/sampling swap, checkpoint round trip, resume; per-rank seeding."""

from __future__ import annotations

import types
import warnings

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from medfusion.models.callbacks import EMA, PerRankSeed, load_ema_weights, seed_per_rank

LR, W0, DECAY = 0.1, 1.0, 0.5


class Tiny(pl.LightningModule):
    """One weight w with loss = w * x.sum(): constant gradient, so w_k = W0 - LR * k exactly (SGD)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(1, 1, bias=False)
        self.frozen = nn.Linear(1, 1, bias=False).requires_grad_(False)  # not averaged with attr="net"
        with torch.no_grad():
            self.net.weight.fill_(W0)
        self.val_weights: list[float] = []

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return (self.net.weight * x).sum()

    def validation_step(self, batch, batch_idx):
        self.val_weights.append(self.net.weight.item())

    def configure_optimizers(self):
        return torch.optim.SGD(self.net.parameters(), lr=LR)


def _loader():
    return DataLoader(TensorDataset(torch.ones(16, 1)), batch_size=1)


def _fit(module, ema, max_steps, ckpt_path=None, val=False):
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False, callbacks=[ema],
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=1 if val else 0, val_check_interval=max_steps if val else None,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader(), _loader() if val else None, ckpt_path=ckpt_path)
    return trainer


def _closed_form(n_steps, decay=DECAY):
    """AveragedModel copies on the first update, then ema ← d·ema + (1-d)·w after each step."""
    ema = None
    for k in range(1, n_steps + 1):
        w = W0 - LR * k
        ema = w if ema is None else decay * ema + (1 - decay) * w
    return ema


def test_ema_matches_closed_form_and_validation_uses_it():
    module, ema = Tiny(), EMA(DECAY, attr="net")
    _fit(module, ema, 4, val=True)
    assert module.net.weight.item() == pytest.approx(W0 - 4 * LR)  # raw weights untouched after fit
    assert float(ema.ema.module.weight) == pytest.approx(_closed_form(4))
    assert module.val_weights == [pytest.approx(_closed_form(4))]  # validation ran with EMA weights
    with ema.use_ema_weights(module) as net:
        assert net.weight.item() == pytest.approx(_closed_form(4))
    assert module.net.weight.item() == pytest.approx(W0 - 4 * LR)


def test_update_schedule_options():
    module, ema = Tiny(), EMA(DECAY, attr="net", start_step=2)
    _fit(module, ema, 4)
    # updates after steps 3 and 4 only: copy w_3, then blend w_4
    w3, w4 = W0 - 3 * LR, W0 - 4 * LR
    assert float(ema.ema.module.weight) == pytest.approx(DECAY * w3 + (1 - DECAY) * w4)


def test_checkpoint_round_trip_and_resume(tmp_path):
    path = str(tmp_path / "a.ckpt")
    module, ema = Tiny(), EMA(DECAY, attr="net")
    trainer = _fit(module, ema, 2)
    trainer.save_checkpoint(path)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)  # no pickled classes needed
    assert float(ckpt["state_dict"]["net.weight"]) == pytest.approx(W0 - 2 * LR)  # raw stays raw
    assert float(ckpt["ema_state_dict"]["weight"]) == pytest.approx(_closed_form(2))  # EMA stored apart
    assert set(ckpt["ema_state_dict"]) == {"weight"}  # only the averaged submodule

    # resume: raw and EMA restored separately, continuing gives the uninterrupted result
    module2, ema2 = Tiny(), EMA(DECAY, attr="net")
    _fit(module2, ema2, 4, ckpt_path=path)
    assert module2.net.weight.item() == pytest.approx(W0 - 4 * LR)
    assert float(ema2.ema.module.weight) == pytest.approx(_closed_form(4))
    assert int(ema2.ema.n_averaged) == 4

    # inference without the callback
    fresh = Tiny()
    assert load_ema_weights(fresh, path, attr="net")
    assert fresh.net.weight.item() == pytest.approx(_closed_form(2))


def test_whole_module_ema_and_bad_args():
    module, ema = Tiny(), EMA(DECAY)
    _fit(module, ema, 3)
    assert float(ema.ema.module.net.weight) == pytest.approx(_closed_form(3))
    with pytest.raises(ValueError, match="decay"):
        EMA(1.0)
    with pytest.raises(ValueError, match="nope"):
        _fit(Tiny(), EMA(DECAY, attr="nope"), 1)
    with pytest.raises(ValueError, match="averaged model"):
        with EMA().use_ema_weights(Tiny()):
            pass


def test_seed_per_rank_gives_different_noise_per_rank():
    draws = []
    for rank in (0, 1):
        seed_per_rank(types.SimpleNamespace(global_rank=rank), 123)
        draws.append(torch.randn(4))
    assert not torch.equal(draws[0], draws[1])
    seed_per_rank(types.SimpleNamespace(global_rank=0), 123)
    assert torch.equal(torch.randn(4), draws[0])


def test_per_rank_seed_reseeds_from_training_position():
    cb = PerRankSeed(7)

    def draw(rank, step):
        trainer = types.SimpleNamespace(global_rank=rank, current_epoch=0, global_step=step)
        cb.on_train_batch_start(trainer, None, None, step)
        return torch.randn(3)

    assert torch.equal(draw(0, 5), draw(0, 5))  # resumable: depends only on position
    assert not torch.equal(draw(0, 5), draw(1, 5))  # ranks differ
    assert not torch.equal(draw(0, 5), draw(0, 6))  # steps differ


class NoiseRecorder(Tiny):
    """Records the diffusion-style noise drawn in training_step on each rank."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = out_dir
        self.noise: list[torch.Tensor] = []

    def training_step(self, batch, batch_idx):
        self.noise.append(torch.randn(4))
        return super().training_step(batch, batch_idx)

    def on_train_end(self):
        ema = next(c for c in self.trainer.callbacks if isinstance(c, EMA))
        torch.save(
            {"noise": torch.stack(self.noise), "w": self.net.weight.detach().clone(),
             "ema": ema.ema.module.weight.detach().clone()},
            f"{self.out_dir}/rank{self.global_rank}.pt",
        )  # fmt: skip


@pytest.mark.slow
def test_ddp_two_ranks_draw_different_noise_but_share_weights_and_ema(tmp_path):
    """user_asks §0.13 / samplers_downstream.md Part 3 §12: 2 CPU ranks (gloo)."""
    module = NoiseRecorder(str(tmp_path))
    trainer = pl.Trainer(
        accelerator="cpu", devices=2, strategy="ddp_spawn", max_steps=3, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[EMA(DECAY, attr="net"), PerRankSeed(11)],
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, _loader())
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert not torch.equal(r0["noise"], r1["noise"])
    assert torch.equal(r0["w"], r1["w"]) and torch.equal(r0["ema"], r1["ema"])


def test_ema_keys_are_plain_for_a_compiled_submodule():
    """A torch.compile'd net keeps `_orig_mod.` out of the EMA weights (user_asks §0.12)."""
    module, ema = Tiny(), EMA(DECAY, attr="net")
    module.net = torch.compile(module.net, backend="eager")
    ema.setup(None, module, "fit")
    ckpt: dict = {"state_dict": {}}
    ema.on_save_checkpoint(None, module, ckpt)
    assert set(ckpt["ema_state_dict"]) == {"weight"}
    fresh = Tiny()
    assert load_ema_weights(fresh, ckpt, attr="net")
    assert fresh.net.weight.item() == pytest.approx(W0)


def test_load_model_prefers_the_ema_weights_of_a_callback_checkpoint(tmp_path):
    """export.load_model puts the EMA callback's weights in place (inference uses EMA), raw ones on request."""
    import lightning.pytorch as L

    from medfusion.models.callbacks import EMA
    from medfusion.models.export import load_model
    from medfusion.models.rddm import RDDM

    model = RDDM(
        spatial_dims=2,
        channels=(8, 8),
        attention_levels=(False, False),
        num_head_channels=8,
        unet_kwargs={"norm_num_groups": 4},
        ema_decay=None,
        val_num_samples=0,
    )
    x = torch.randn(8, 2, 1, 16, 16)

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            items = [
                {"source": a[:1].expand(2, -1, -1, -1), "target": a[1:].expand(2, -1, -1, -1)} for a in x
            ]
            return DataLoader(items, batch_size=None)

    trainer = L.Trainer(
        max_steps=4, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
        callbacks=[EMA(decay=0.5, attr="nets")], enable_model_summary=False,
    )  # fmt: skip
    trainer.fit(model, datamodule=Data())
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    raw = load_model(ckpt, ema=False)
    ema = load_model(ckpt)
    saved = torch.load(ckpt, weights_only=True)
    for name, value in ema.nets.state_dict().items():
        torch.testing.assert_close(value, saved["ema_state_dict"][name])
    diff = [n for n, v in raw.nets.state_dict().items() if not torch.equal(v, ema.nets.state_dict()[n])]
    assert diff, "EMA and raw weights should differ after 4 steps with decay 0.5"

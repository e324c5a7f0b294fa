"""One contract for every medfusion LightningModule, 2D and 3D where the method supports them.

For each module (tiny sizes, seeded):
- shapes: inference maps a batch to outputs of the documented shape, with finite values;
- one training step through a Lightning ``Trainer`` gives a finite loss and changes the weights;
- seeded inference is deterministic (same generator seed, same output; another seed where the method samples);
- export -> load (safetensors + YAML, no pickle) gives equal outputs;
- kill and resume: run A trains 6 steps uninterrupted; run B writes a checkpoint after step 3 and is killed; a new
  module resumes from that file for steps 4-6. The losses of steps 4-6 and every weight (raw and averaged) equal
  run A's: the per-step generators (seed, rank, step, micro-batch) make the training noise a function of the
  position in training alone. A negative control shows the comparison catches noise from the global RNG.

Lightning caveat (2.6): a checkpoint written at an epoch end by ``every_n_epochs`` in a run without validation resumes
by re-entering the finished epoch and trains one extra batch; step-count checkpoints on an epoch's last batch
resume exactly, so that is what run B writes (3 batches per epoch, checkpoint every 3 steps).
"""

from __future__ import annotations

import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from torch import Tensor
from torch.utils.data import DataLoader

from medfusion import keys
from medfusion.models._rng import RNG_KEY, SCHEME
from medfusion.models.base import MedfusionModule
from medfusion.models.export import CKPT_CLASS_KEY, export_model, load_model

N_BATCHES, BATCH = 3, 2  # one epoch = 3 optimiser steps


@dataclass
class Case:
    """How to build, feed and run one module (everything tiny)."""

    build: Callable[[Path], MedfusionModule]  # tmp folder (for modules that need an earlier stage on disk)
    sample: Callable[[torch.Generator], dict[str, Tensor]]  # one item (no batch axis)
    infer: Callable[[MedfusionModule, dict[str, Tensor], torch.Generator], Tensor]  # batch -> output
    out_shape: Callable[[dict[str, Tensor]], tuple[int, ...]]
    stochastic: bool = True  # inference depends on the generator's seed
    steps_per_iteration: int = 1  # optimisers stepped per training iteration (GANs: 2)


def _size(dims: int) -> tuple[int, ...]:
    return (32, 32) if dims == 2 else (16, 16, 16)


def _pair(dims: int) -> Callable[[torch.Generator], dict[str, Tensor]]:
    def sample(g: torch.Generator) -> dict[str, Tensor]:
        target = torch.rand(1, *_size(dims), generator=g) * 1.6 - 0.8
        source = target + 0.1 * torch.randn(target.shape, generator=g)
        return {keys.SOURCE: source, keys.TARGET: target, keys.IMAGE: target}

    return sample


def _restore(module, batch, g):
    return module.restore(batch[keys.SOURCE], generator=g)


def _same_as_source(batch):
    return tuple(batch[keys.SOURCE].shape)


# ------------------------------------------------------------------------------------------- the modules
def _autoencoder(dims: int, **kw):
    from medfusion.models.diffusion_ct import DiffusionCTAutoencoder

    return DiffusionCTAutoencoder(
        spatial_dims=dims, channels=(8, 16), latent_channels=2, norm_num_groups=4, kl_weight=1e-2, **kw
    )


def _diffusion_ct(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, SamplingConfig

        path = tmp / f"stage1_{dims}d"
        if not path.exists():  # the first build writes stage 1 without touching the caller's RNG stream
            with torch.random.fork_rng():
                torch.manual_seed(0)
                export_model(_autoencoder(dims), path)
        model = DiffusionCT(
            autoencoder=str(path),
            denoiser=DenoiserConfig(channels=(8, 16), attention_levels=(False, False), num_head_channels=8,
                                    norm_num_groups=4),
            num_train_timesteps=100, sampling=SamplingConfig(num_steps=2), lr=1e-3, ema_decay=0.5,
            val_num_samples=0,
        )  # fmt: skip
        g = torch.Generator().manual_seed(0)
        items = [_pair(dims)(g) for _ in range(BATCH)]
        model.loss({k: torch.stack([it[k] for it in items]) for k in items[0]}, generator=g)  # calibrates r
        return model

    return build


def _supervised(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.supervised import SupervisedRestorer

        return SupervisedRestorer(spatial_dims=dims, channels=(4, 8), strides=(2,), rezero=False, lr=1e-2)

    return build


def _rddm(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.options import UNetConfig
        from medfusion.models.rddm import RDDM

        unet = UNetConfig(channels=(8, 16), attention_levels=(False, False), num_head_channels=8, norm_num_groups=4)
        return RDDM(
            spatial_dims=dims, unet=unet, schedule={"num_train_timesteps": 100}, num_sampling_steps=2, eta=1.0,
            lr=1e-3, ema_decay=0.5, ema_every=1, val_num_samples=0,
        )  # fmt: skip

    return build


DIFFIR_TINY = dict(
    dirformer={"dim": 8, "num_blocks": (1, 1, 1, 1), "num_refinement_blocks": 1, "heads": (1, 1, 2, 2)},
    cpen={"downscale": 2, "n_feats": 8, "n_encoder_res": 1},
    val_num_samples=0,
)


def _diffir(dims: int, stage: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.diffir import DiffIRStage1, DiffIRStage2

        cls = DiffIRStage1 if stage == 1 else DiffIRStage2
        extra = {"encoder_steps": 4, "lr_encoder": 1e-3} if stage == 2 else {}
        return cls(spatial_dims=dims, lr=1e-3, ema_decay=0.5, **DIFFIR_TINY, **extra)

    return build


def _labelled(dims: int) -> Callable[[torch.Generator], dict[str, Tensor]]:
    """An image of a bright disc (label 1) in a square (label 2), at a random place."""

    def sample(g: torch.Generator) -> dict[str, Tensor]:
        size = _size(dims)
        grid = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in size], indexing="ij")
        c = [n / 2 + float(torch.randint(-3, 4, (1,), generator=g)) for n in size]
        box = torch.stack([(gi - ci).abs() for gi, ci in zip(grid, c)]).amax(0)
        r2 = sum((gi - ci) ** 2 for gi, ci in zip(grid, c))
        label = torch.zeros(size, dtype=torch.long)
        label[box < size[0] / 4] = 2
        label[r2 < (size[0] / 8) ** 2] = 1
        image = (-0.8 + 0.6 * (label == 2) + 1.4 * (label == 1)).float() + 0.05 * torch.randn(size, generator=g)
        return {keys.IMAGE: image[None], keys.LABEL: label[None]}

    return sample


def _pairs(dims: int) -> Callable[[torch.Generator], dict[str, Tensor]]:
    one = _labelled(dims)

    def sample(g: torch.Generator) -> dict[str, Tensor]:
        a, b = one(g), one(g)
        return {keys.MOVING: a[keys.IMAGE], keys.FIXED: b[keys.IMAGE], keys.MOVING_LABEL: a[keys.LABEL],
                keys.FIXED_LABEL: b[keys.LABEL]}  # fmt: skip

    return sample


def _drdm(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.drdm import DRDM

        return DRDM(spatial_dims=dims, recursion=1, ctl_size=16, timesteps=20, val_t_start=10, lr=1e-3)

    return build


def _segmentation(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.segmentation import Segmentation

        return Segmentation(num_classes=3, spatial_dims=dims, channels=(8, 16), strides=(2,), num_res_units=1)

    return build


def _registration(dims: int) -> Callable[[Path], MedfusionModule]:
    def build(tmp: Path) -> MedfusionModule:
        from medfusion.models.registration import Registration

        return Registration(
            spatial_dims=dims, channels=(8, 16, 16, 16), final_conv_channels=(8, 8), num_label_classes=3
        )

    return build


CASES: dict[str, Case] = {}
for _d in (2, 3):
    CASES[f"diffusion_ct_autoencoder_{_d}d"] = Case(
        build=lambda tmp, d=_d: _autoencoder(d),
        sample=_pair(_d),
        infer=lambda m, b, g: m.reconstruct(b[keys.IMAGE]),
        out_shape=lambda b: tuple(b[keys.IMAGE].shape),
        stochastic=False,
    )
    CASES[f"diffusion_ct_{_d}d"] = Case(_diffusion_ct(_d), _pair(_d), _restore, _same_as_source)
    CASES[f"supervised_{_d}d"] = Case(_supervised(_d), _pair(_d), _restore, _same_as_source, stochastic=False)
    CASES[f"rddm_{_d}d"] = Case(_rddm(_d), _pair(_d), _restore, _same_as_source)
    CASES[f"diffir_stage1_{_d}d"] = Case(
        build=_diffir(_d, 1),
        sample=_pair(_d),
        infer=lambda m, b, g: m.sample(b[keys.SOURCE], b[keys.TARGET]),
        out_shape=_same_as_source,
        stochastic=False,
    )
    CASES[f"diffir_stage2_{_d}d"] = Case(_diffir(_d, 2), _pair(_d), _restore, _same_as_source, stochastic=False)
    CASES[f"drdm_{_d}d"] = Case(
        build=_drdm(_d),
        sample=_labelled(_d),
        infer=lambda m, b, g: m.sample(b[keys.IMAGE], t_start=10, steps=2, generator=g).ddf,
        out_shape=lambda b: (b[keys.IMAGE].shape[0], b[keys.IMAGE].ndim - 2, *b[keys.IMAGE].shape[2:]),
    )
    CASES[f"segmentation_{_d}d"] = Case(
        build=_segmentation(_d),
        sample=_labelled(_d),
        infer=lambda m, b, g: m(b[keys.IMAGE]),
        out_shape=lambda b: (b[keys.IMAGE].shape[0], 3, *b[keys.IMAGE].shape[2:]),
        stochastic=False,
    )
CASES["registration_2d"] = Case(
    build=_registration(2),
    sample=_pairs(2),
    infer=lambda m, b, g: m(b[keys.MOVING], b[keys.FIXED])[1],
    out_shape=lambda b: (b[keys.MOVING].shape[0], 2, *b[keys.MOVING].shape[2:]),
    stochastic=False,
)
CASES["diffusion_ct_autoencoder_adversarial_2d"] = Case(
    build=lambda tmp: _autoencoder(2, adversarial={"weight": 0.1, "disc_channels": 8}),
    sample=_pair(2),
    infer=lambda m, b, g: m.reconstruct(b[keys.IMAGE]),
    out_shape=lambda b: tuple(b[keys.IMAGE].shape),
    stochastic=False,
    steps_per_iteration=2,
)


# ------------------------------------------------------------------------------------------- machinery
def _items(case: Case, n: int = N_BATCHES * BATCH) -> list[dict[str, Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [case.sample(g) for _ in range(n)]


def _batch(case: Case) -> dict[str, Tensor]:
    items = _items(case, BATCH)
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _loader(case: Case) -> DataLoader:
    return DataLoader(_items(case), batch_size=BATCH, shuffle=False)


class _Record(Callback):
    """Loss of every optimiser step (keyed by the global step after it) and the weights when training starts."""

    def __init__(self) -> None:
        self.losses: dict[int, float] = {}
        self.at_start: dict[str, Tensor] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self.at_start = _state(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses[trainer.global_step] = float(trainer.callback_metrics["train/loss"])


class _Killed(Exception):
    pass


class _Kill(Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.at:
            raise _Killed(f"killed at step {self.at}")


def _fit(case, module, max_steps, root, *, ckpt_path=None, callbacks=()) -> tuple[L.Trainer, _Record]:
    rec = _Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_steps=max_steps, logger=False,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
        callbacks=[rec, *callbacks], default_root_dir=root,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's few-workers / small-batch advice
        trainer.fit(module, _loader(case), ckpt_path=ckpt_path)
    return trainer, rec


def _state(module: torch.nn.Module) -> dict[str, Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _assert_same(a: dict[str, Tensor], b: dict[str, Tensor], atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=k)


def _build(case: Case, tmp: Path, seed: int = 0) -> MedfusionModule:
    torch.manual_seed(seed)
    return case.build(tmp)


def _infer(case: Case, module, batch, seed: int = 1) -> Tensor:
    module.eval()
    with torch.no_grad():
        return case.infer(module, batch, torch.Generator().manual_seed(seed))


def kill_and_resume(case: Case, tmp: Path, build=None, resume_seed: int = 1234):
    """Run A (6 steps) against run B (3 steps, checkpoint, killed) + C (a new module resumed for steps 4-6)."""
    build = build or (lambda: case.build(tmp))
    k = case.steps_per_iteration
    torch.manual_seed(0)
    a = build()
    _, rec_a = _fit(case, a, 6 * k, tmp / "a")
    torch.manual_seed(0)
    b = build()
    saver = ModelCheckpoint(tmp / "b", "{step}", save_top_k=-1, every_n_train_steps=3 * k)
    with pytest.raises(_Killed):
        _fit(case, b, 6 * k, tmp / "b", callbacks=[saver, _Kill(3 * k)])
    ckpt = tmp / "b" / f"step={3 * k}.ckpt"
    torch.manual_seed(resume_seed)  # seeded differently: the checkpoint's seed must win
    c = build()
    _, rec_c = _fit(case, c, 6 * k, tmp / "c", ckpt_path=ckpt)
    assert sorted(rec_a.losses) == [k * i for i in range(1, 7)]
    assert sorted(rec_c.losses) == [k * i for i in (4, 5, 6)]
    for step in (4 * k, 5 * k, 6 * k):
        assert rec_c.losses[step] == pytest.approx(rec_a.losses[step], abs=1e-5), step
    _assert_same(_state(a), _state(c))  # raw and averaged weights after step 6
    return types.SimpleNamespace(a=a, b=b, c=c, ckpt=ckpt, rec_a=rec_a, rec_c=rec_c)


# ------------------------------------------------------------------------------------------- the contract
PARAMS = [pytest.param(name, id=name) for name in CASES]


@pytest.mark.parametrize("name", PARAMS)
def test_shapes_and_finite_outputs(name, tmp_path):
    case = CASES[name]
    module = _build(case, tmp_path)
    assert isinstance(module, MedfusionModule)
    batch = _batch(case)
    out = _infer(case, module, batch)
    assert tuple(out.shape) == case.out_shape(batch)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", PARAMS)
def test_one_training_step_is_finite_and_moves_the_weights(name, tmp_path):
    case = CASES[name]
    module = _build(case, tmp_path)
    before = _state(module)
    _, rec = _fit(case, module, case.steps_per_iteration, tmp_path / "fit")
    assert rec.losses and all(torch.isfinite(torch.tensor(v)) for v in rec.losses.values())
    after = _state(module)
    moved = [k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert moved, "no weight changed in one optimiser step"


@pytest.mark.parametrize("name", PARAMS)
def test_seeded_inference_is_deterministic(name, tmp_path):
    case = CASES[name]
    module = _build(case, tmp_path)
    batch = _batch(case)
    first = _infer(case, module, batch, seed=1)
    torch.testing.assert_close(_infer(case, module, batch, seed=1), first, rtol=0, atol=0)
    if case.stochastic:
        assert not torch.equal(_infer(case, module, batch, seed=2), first)


@pytest.mark.parametrize("name", PARAMS)
def test_export_then_load_gives_equal_outputs(name, tmp_path):
    case = CASES[name]
    module = _build(case, tmp_path)
    _fit(case, module, 2 * case.steps_per_iteration, tmp_path / "fit")  # trained, averaged weights differ from raw
    export_model(module, tmp_path / "export")
    loaded = load_model(tmp_path / "export")
    assert type(loaded) is type(module)
    batch = _batch(case)
    torch.testing.assert_close(_infer(case, loaded, batch), _infer(case, module, batch), rtol=0, atol=1e-6)
    _assert_same(_state(loaded), _state(module), atol=0)


@pytest.mark.parametrize("name", PARAMS)
def test_kill_and_resume_gives_the_same_training_run(name, tmp_path):
    case = CASES[name]
    run = kill_and_resume(case, tmp_path)
    ckpt = torch.load(run.ckpt, map_location="cpu", weights_only=True)  # plain data only
    assert ckpt[RNG_KEY] == {"scheme": SCHEME, "seed": 0}
    assert ckpt[CKPT_CLASS_KEY].endswith(type(run.a).__name__)
    assert len(ckpt["optimizer_states"]) >= case.steps_per_iteration  # every optimiser comes back
    _assert_same(_state(run.b), run.rec_c.at_start)  # the resumed module started from the saved weights
    assert len({round(v, 6) for v in run.rec_a.losses.values()}) > 1  # the losses depend on the step


def test_the_comparison_detects_noise_that_does_not_resume(tmp_path):
    """Negative control: noise from the global RNG does not resume, even in a process seeded like the first."""
    from medfusion.models.diffusion_ct import DiffusionCTAutoencoder

    class GlobalRNG(DiffusionCTAutoencoder):
        def step_generator(self, batch_idx, device=None):
            return None  # torch's global generator

    case = CASES["diffusion_ct_autoencoder_2d"]
    build = lambda: GlobalRNG(  # noqa: E731
        spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4, kl_weight=1e-2
    )
    with pytest.raises(AssertionError, match=r"^4\b"):
        kill_and_resume(case, tmp_path, build=build, resume_seed=0)


def test_every_lightning_module_in_the_package_has_a_contract_case(tmp_path):
    import importlib
    import inspect
    import pkgutil

    import medfusion.models as pkg

    found = set()
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"medfusion.models.{info.name}")
        for _, cls in inspect.getmembers(mod, inspect.isclass):
            if issubclass(cls, L.LightningModule) and cls.__module__ == mod.__name__ and cls is not MedfusionModule:
                found.add(cls.__name__)
    covered = {type(_build(case, tmp_path)).__name__ for case in CASES.values()}
    assert found <= covered, f"LightningModules without a contract case: {sorted(found - covered)}"

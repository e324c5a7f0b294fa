"""What every medfusion LightningModule shares, written once: HU window, fit-start checks, checkpoint identity,
per-step training randomness, weight averaging (EMA), the cosine learning-rate decay, and the inference contract.

- :class:`MedfusionModule` is the one base class (one level, STYLE rule 1). Subclasses call ``super().__init__()``,
  then ``self.save_hyperparameters(...)``; they get

  * ``hu_window``: the ``(low, high)`` HU mapped to [-1, 1] (from the ``hu_window`` hyper-parameter, or None);
  * ``on_fit_start``: the data's HU window must equal the module's (:func:`check_hu_window`), and rank 0's base
    seed is broadcast to every rank;
  * checkpoints that record the module's class path (so :mod:`medfusion.models.export` rebuilds it without pickle)
    and the base seed of the per-step generators (:mod:`medfusion.models._rng`);
  * :meth:`MedfusionModule.step_generator`: the generator of one training step, seeded from (seed, rank, global step,
    micro-batch), so ranks draw different noise and a resumed run draws the same noise as an uninterrupted one;
  * :meth:`MedfusionModule.init_ema` / :meth:`MedfusionModule.averaged`: an exponential moving average of named
    sub-modules (``torch.optim.swa_utils.AveragedModel``, its decay warmed up as in :class:`EMAAvgFn`), updated
    right after each optimiser step, so the
    checkpoint of step k holds the average of step k (Lightning's ``ModelCheckpoint`` writes after this hook);
  * :meth:`MedfusionModule.upgrade_config`: the hook through which models exported by an earlier version load, or
    are refused with a message that names the change.

- :func:`cosine_schedule`: cosine decay of the learning rate over the trainer's total steps, to a floor.
- :class:`Restorer`: the inference contract of the image-to-image models (DiffusionCT, RDDM, DiffIR), used by
  ``medfusion standardize`` / ``restore`` and the Python API; options are call arguments, never ``hparams`` edits.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import lightning as L
import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel

from medfusion.models._rng import StepRNG
from medfusion.models.export import CKPT_CLASS_KEY, class_path


def check_hu_window(module: Any) -> None:
    """``ValueError`` when the trainer's DataModule maps another HU window to [-1, 1] than ``module.hu_window``.

    The window is set twice in a LightningCLI YAML (``model.init_args.hu_window``, stored with the weights for
    inference, and ``data.init_args.hu_window``, used by the pipeline); if they differ the model trains on one
    intensity scale and is applied on another. Modules or DataModules without a window are not checked.
    """
    trainer = getattr(module, "_trainer", None)
    data = getattr(trainer, "datamodule", None) if trainer is not None else None
    model_window = getattr(module, "hu_window", None)
    data_window = getattr(data, "hu_window", None)
    if model_window is None or data_window is None:
        return
    m = tuple(float(v) for v in model_window)
    d = tuple(float(v) for v in data_window)
    if m != d:
        raise ValueError(
            f"{type(module).__name__}.hu_window {m} differs from the data's hu_window {d} "
            f"({type(data).__name__}): set the same window in model.init_args and data.init_args "
            "(for DiffusionCT stage 2 the window is the stage-1 autoencoder's)"
        )


class EMAAvgFn:
    """The EMA update with its decay warmed up: ``ema <- d_n ema + (1 - d_n) w`` at the n-th update after the first
    (which copies the weights), ``d_n = min(decay, 1 - (1 + n) ** -power)``, ``power = 2/3``.

    This is the warm-up of ``ema_pytorch.EMA`` (inv_gamma 1, power 2/3), the EMA of RDDM's official code, and of
    diffusers' ``EMAModel(use_ema_warmup=True)``. Without it the average of a short run is dominated by its first,
    untrained weights (0.995 ** 120 = 0.55 of the weight after 1,200 steps updated every 10); with it ``decay`` is
    reached after ``(1 / (1 - decay)) ** 1.5`` updates (2,800 for 0.995, 31,600 for 0.999), so long runs average
    as the papers' do. Picklable (``ddp_spawn`` pickles the module; torch's ``get_ema_multi_avg_fn`` is a closure).
    """

    power = 2.0 / 3.0

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def decay_at(self, n: int) -> float:
        """The decay of the ``n``-th update after the first (n >= 1)."""
        return min(self.decay, 1.0 - (1.0 + n) ** -self.power)

    def __call__(self, ema_params: Any, current_params: Any, num_averaged: Any) -> None:
        # the weight 1 - d_n as a tensor on the parameters' device: no host sync in the training step
        w = torch.clamp((1.0 + num_averaged.to(torch.float32)) ** -self.power, min=1.0 - self.decay)
        if torch.is_floating_point(ema_params[0]) or torch.is_complex(ema_params[0]):
            torch._foreach_lerp_(ema_params, current_params, w.to(ema_params[0].dtype))
        else:  # integer buffers, as torch's get_ema_multi_avg_fn treats them
            for e, c in zip(ema_params, current_params):
                e.copy_(e * (1 - w) + c * w)


class MedfusionModule(L.LightningModule):
    """Base LightningModule of every medfusion method (module docstring)."""

    def __init__(self, seed: int | None = None) -> None:
        """``seed``: base seed of the per-step training generators (None = the experiment's ``seed_everything``
        seed, i.e. ``torch.initial_seed()`` when the module is built)."""
        super().__init__()
        self._train_rng = StepRNG(seed)
        self.ema: AveragedModel | None = None
        self._ema_sources: tuple[str, ...] = ()
        self._ema_every = 1
        self._ema_step = 0  # optimiser step of the last EMA update

    # ------------------------------------------------------------------------------------------- data scale
    @property
    def hu_window(self) -> tuple[float, float] | None:
        """``(low, high)`` HU mapped to [-1, 1] by the data pipeline (None for modules without one)."""
        window = getattr(self.hparams, "hu_window", None) if "hu_window" in self.hparams else None
        return None if window is None else (float(window[0]), float(window[1]))

    # ------------------------------------------------------------------------------------------- randomness
    def step_generator(self, batch_idx: int, device: torch.device | str | None = None) -> torch.Generator:
        """Generator of the current training (micro-)step (:class:`medfusion.models._rng.StepRNG`)."""
        return self._train_rng.generator(self, batch_idx, device)

    # ------------------------------------------------------------------------------------------- EMA
    def init_ema(self, decay: float | None, *sources: str, every: int = 1) -> None:
        """Average the sub-modules named ``sources`` in ``self.ema`` (None = no averaging).

        One source is averaged as itself, several as an ``nn.ModuleDict`` of them (so ``averaged()[name]``).
        ``every``: update after every ``every``-th optimiser step. The checkpoint's ``state_dict`` holds the raw and
        the averaged weights (``ema.module.*``).
        """
        if not sources:
            raise ValueError("init_ema needs the names of the sub-modules to average")
        if every < 1:
            raise ValueError(f"EMA every must be >= 1 optimiser steps, got {every}")
        self._ema_sources, self._ema_every = tuple(sources), int(every)
        if decay is None:
            self.ema = None
            return
        if not 0.0 < float(decay) < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1) or None (off), got {decay}")
        self.ema = AveragedModel(self._ema_source(), multi_avg_fn=EMAAvgFn(decay), use_buffers=True)
        self.ema.requires_grad_(False)

    def _ema_source(self) -> nn.Module:
        if len(self._ema_sources) == 1:
            return getattr(self, self._ema_sources[0])
        return nn.ModuleDict({name: getattr(self, name) for name in self._ema_sources})

    def averaged(self, use_ema: bool = True) -> nn.Module:
        """The EMA copy of the sources once it has been updated (else the raw sources), for sampling."""
        if use_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self._ema_source()

    def update_ema(self, step: int) -> None:
        """Fold the current weights into the average after optimiser step ``step`` (1-based), every ``every`` steps
        and once per step. The base calls it from ``optimizer_step``; modules that optimise manually (Lightning then
        calls no ``optimizer_step`` hook) call it after their own ``opt.step()`` with ``self.global_step``."""
        if self.ema is not None and step > self._ema_step and step % self._ema_every == 0:
            self._ema_step = step
            self.ema.update_parameters(self._ema_source())

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.update_ema(self.global_step + 1)  # global_step counts the step just taken only after this hook

    # ------------------------------------------------------------------------------------------- Lightning hooks
    def on_fit_start(self) -> None:
        check_hu_window(self)
        self._train_rng.sync(self)  # rank 0's base seed on every rank

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[CKPT_CLASS_KEY] = class_path(self)
        self._train_rng.save(checkpoint)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._train_rng.load(checkpoint)
        self._ema_step = int(checkpoint.get("global_step", 0))

    # ------------------------------------------------------------------------------------------- old exports
    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """Init args of a model exported by an earlier version -> this version's (identity by default).

        Subclasses whose constructor changed map old arguments to new ones here, or raise ``ValueError`` naming
        the change when an old model cannot be rebuilt faithfully.
        """
        return init_args

    def upgrade_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """Weights saved by an earlier version -> this version's key names (identity by default)."""
        return state


def cosine_schedule(
    module: L.LightningModule,
    optimizer: torch.optim.Optimizer,
    *,
    final_fraction: float = 0.05,
    steps_per_iteration: int = 1,
) -> Any:
    """``configure_optimizers`` return value: cosine decay (Loshchilov & Hutter 2017, SGDR without restarts) of
    every parameter group's rate to ``final_fraction`` of it over the trainer's total optimiser steps, stepped per
    step; the bare optimiser (constant rate) when the total is unknown or infinite.

    ``steps_per_iteration``: optimisers stepped per training iteration (2 for generator + discriminator, which
    Lightning both counts in ``global_step``).
    """
    try:
        total = module.trainer.estimated_stepping_batches / steps_per_iteration
    except (RuntimeError, AttributeError):
        total = float("inf")
    if not math.isfinite(total) or total <= 0:
        return optimizer
    n = int(total)

    def factor(step: int) -> float:
        progress = min(step, n) / n
        return final_fraction + (1.0 - final_fraction) * 0.5 * (1.0 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


@runtime_checkable
class Restorer(Protocol):
    """Inference contract of the image-to-image models (DiffusionCT, RDDM, DiffIR stage 2).

    Images are ``(B, C, *spatial)`` in [-1, 1] (the model's ``hu_window`` mapped linearly); spatial sizes must be
    multiples of ``divisible_by`` (callers pad). 2D models take slices, 3D models volumes.
    """

    spatial_dims: int

    @property
    def divisible_by(self) -> int: ...

    @property
    def hu_window(self) -> tuple[float, float] | None: ...

    def restore(
        self,
        images: Tensor,
        *,
        generator: torch.Generator | None = None,
        roi_size: Sequence[int] | None = None,
        **options: Any,
    ) -> Tensor:
        """Restored / standardized images, same shape and range. ``generator`` (CPU) makes it reproducible;
        ``roi_size`` (3D) runs sliding windows of that size (overlapping windows share one initial noise field where
        the method draws one); ``options`` are the method's own (``inference_options``); an unknown option raises
        ``ValueError`` naming the valid ones."""
        ...

    def inference_options(self) -> dict[str, Any]:
        """The method's options of :meth:`restore` and their defaults for this model."""
        ...

    def check_options(self, **options: Any) -> None:
        """``ValueError`` for options this model cannot take (called before any scan is read)."""
        ...

    def describe(self, **options: Any) -> str:
        """One line for provenance (e.g. DICOM DerivationDescription): method, sampler, steps."""
        ...

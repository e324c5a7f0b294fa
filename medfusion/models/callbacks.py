"""Training callbacks shared by the diffusion methods: EMA of weights and per-rank seeding.

* :class:`EMA` — exponential moving average of the weights (Polyak averaging as used by DDPM, Ho et al. 2020 §4,
  decay 0.9999): ``θ_ema ← d·θ_ema + (1-d)·θ`` after every optimizer step, via ``torch.optim.swa_utils.AveragedModel``
  with ``get_ema_multi_avg_fn`` (the averaging itself is torch's; the callback only schedules, swaps and
  checkpoints it). Lightning's ``WeightAveraging`` was not used because it writes the *EMA* weights into the
  checkpoint's ``state_dict`` (raw weights moved to another key), always averages the whole LightningModule
  (frozen autoencoders included), copies the average over the raw weights at the end of fit, and has no context
  manager for sampling. Here ``checkpoint["state_dict"]`` keeps the raw weights and ``checkpoint["ema_state_dict"]``
  holds the EMA weights of the averaged (sub)module: one is never mixed up with the other (user_asks §0.12), and
  both load with ``torch.load(weights_only=True)``.
  DDP: gradients are all-reduced, so every rank's parameters — and hence its locally updated EMA — are identical;
  rank 0 writes the checkpoint. Sharded strategies (FSDP/DeepSpeed) are not supported.
* :func:`seed_per_rank` / :class:`PerRankSeed` — ``seed_everything(seed)`` gives every rank the same RNG, so the
  diffusion noise and timesteps drawn in ``training_step`` are identical across GPUs (samplers_downstream.md Part 3
  §2). We seed ``base + rank`` after the process group exists, and optionally re-seed each batch from
  (base, rank, epoch, batch, step) so a resumed run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

EMA_KEY = "ema_state_dict"
EMA_ATTR_KEY = "ema_attr"


class EMAAvgFn:
    """Picklable ``torch.optim.swa_utils.get_ema_multi_avg_fn(decay)`` for an ``AveragedModel`` kept inside a module.

    torch returns a closure, which cannot be pickled; ``ddp_spawn`` (and spawn-started workers) pickle the
    LightningModule, so modules that own an ``AveragedModel`` pass this instead. The averaging is still torch's.
    """

    def __init__(self, decay: float) -> None:
        self.decay = float(decay)

    def __call__(self, ema_params: Any, current_params: Any, num_averaged: Any) -> None:
        get_ema_multi_avg_fn(self.decay)(ema_params, current_params, num_averaged)


def _target(pl_module: nn.Module, attr: str | None) -> nn.Module:
    """The averaged module, unwrapped from ``torch.compile`` so EMA keys never carry ``_orig_mod.``."""
    module = pl_module if attr is None else getattr(pl_module, attr, None)
    if not isinstance(module, nn.Module):
        raise ValueError(f"EMA(attr={attr!r}): the LightningModule has no nn.Module attribute {attr!r}")
    return getattr(module, "_orig_mod", module)


def _tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    return itertools.chain(module.parameters(), module.buffers())


def _swap(a: nn.Module, b: nn.Module) -> None:
    """Exchange parameter and buffer values of two identically structured modules in place."""
    with torch.no_grad():
        for p, q in zip(_tensors(a), _tensors(b), strict=True):
            tmp = p.detach().clone()
            p.copy_(q)
            q.copy_(tmp)


class EMA(Callback):
    """Exponential moving average of weights, used for validation/sampling and saved with checkpoints.

    Args:
        decay: EMA decay d (0.9999 in DDPM; 0.999 for short runs).
        attr: name of the submodule to average (e.g. ``"net"``); None = the whole LightningModule.
        update_every_n_steps: update after every n-th optimizer step.
        start_step: first optimizer step that updates (the first update copies the raw weights).
        use_buffers: also average buffers (GroupNorm nets have none that matter; BatchNorm stats would be averaged).
        validate_with_ema: swap the EMA weights in for every validation epoch.
        device: keep the EMA on this device (e.g. ``"cpu"`` to save GPU memory); None = the model's device.
    """

    def __init__(
        self,
        decay: float = 0.9999,
        *,
        attr: str | None = None,
        update_every_n_steps: int = 1,
        start_step: int = 0,
        use_buffers: bool = True,
        validate_with_ema: bool = True,
        device: str | None = None,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must lie in [0, 1), got {decay}")
        if update_every_n_steps < 1 or start_step < 0:
            raise ValueError("update_every_n_steps must be >= 1 and start_step >= 0")
        self.decay = decay
        self.attr = attr
        self.update_every_n_steps = update_every_n_steps
        self.start_step = start_step
        self.use_buffers = use_buffers
        self.validate_with_ema = validate_with_ema
        self.device = device
        self.ema: AveragedModel | None = None
        self._last_step = 0
        self._swapped = False
        self._pending_weights: dict[str, torch.Tensor] | None = None
        self._pending_n_averaged: int | None = None

    @property
    def state_key(self) -> str:
        return self._generate_state_key(decay=self.decay, attr=self.attr)

    # ---------------------------------------------------------------- lifecycle
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self.ema is not None:
            return
        target = _target(pl_module, self.attr)
        self.ema = AveragedModel(
            target,
            device=self.device,
            multi_avg_fn=get_ema_multi_avg_fn(self.decay),
            use_buffers=self.use_buffers,
        )
        self.ema.requires_grad_(False)
        self._apply_pending()

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.ema is not None and self.device is None:
            self.ema.to(pl_module.device)  # the strategy has moved the model by now

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step  # optimizer steps so far (unchanged within gradient accumulation)
        if self.ema is None or step <= self._last_step:
            return
        self._last_step = step
        if step - 1 >= self.start_step and (step - 1 - self.start_step) % self.update_every_n_steps == 0:
            self.ema.update_parameters(_target(pl_module, self.attr))

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.validate_with_ema and self.ema is not None and not self._swapped:
            _swap(_target(pl_module, self.attr), self.ema.module)
            self._swapped = True

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._swapped and self.ema is not None:
            _swap(_target(pl_module, self.attr), self.ema.module)
            self._swapped = False

    @contextlib.contextmanager
    def use_ema_weights(self, pl_module: pl.LightningModule) -> Iterator[nn.Module]:
        """Temporarily put the EMA weights into the model (for sampling); restores the raw weights on exit."""
        if self.ema is None:
            raise ValueError(
                "EMA has no averaged model yet (it is created when fit starts or a checkpoint loads)"
            )
        target = _target(pl_module, self.attr)
        if self._swapped:  # already inside validation with EMA weights
            yield target
            return
        _swap(target, self.ema.module)
        self._swapped = True
        try:
            yield target
        finally:
            _swap(target, self.ema.module)
            self._swapped = False

    # ---------------------------------------------------------------- checkpointing
    def state_dict(self) -> dict[str, Any]:
        n = int(self.ema.n_averaged) if self.ema is not None else 0
        return {"decay": self.decay, "n_averaged": n, "last_step": self._last_step}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._last_step = int(state_dict["last_step"])
        self._pending_n_averaged = int(state_dict["n_averaged"])
        self._apply_pending()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.ema is None:
            return
        checkpoint[EMA_ATTR_KEY] = self.attr  # lets export.load_model put the EMA weights back in place
        target = _target(pl_module, self.attr)
        if self._swapped:
            # saving mid-validation: the model holds the EMA weights and self.ema.module the raw ones
            prefix = f"{self.attr}." if self.attr else ""
            if self.attr and hasattr(getattr(pl_module, self.attr), "_orig_mod"):
                prefix += "_orig_mod."
            for name, value in self.ema.module.state_dict().items():
                checkpoint["state_dict"][prefix + name] = value.detach().clone()
            checkpoint[EMA_KEY] = {k: v.detach().clone() for k, v in target.state_dict().items()}
        else:
            checkpoint[EMA_KEY] = {k: v.detach().clone() for k, v in self.ema.module.state_dict().items()}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        weights = checkpoint.get(EMA_KEY)
        if weights is None:
            rank_zero_warn("checkpoint has no EMA weights; the EMA restarts from the loaded raw weights")
            self._pending_n_averaged = 0
            if self.ema is not None:
                self.ema.module.load_state_dict(_target(pl_module, self.attr).state_dict())
            self._apply_pending()
            return
        self._pending_weights = weights
        self._apply_pending()

    def _apply_pending(self) -> None:
        if self.ema is None:
            return
        if self._pending_weights is not None:
            self.ema.module.load_state_dict(self._pending_weights)
            self._pending_weights = None
        if self._pending_n_averaged is not None:
            self.ema.n_averaged.fill_(self._pending_n_averaged)
            self._pending_n_averaged = None


def load_ema_weights(module: nn.Module, checkpoint: str | dict[str, Any], attr: str | None = None) -> bool:
    """Load the EMA weights of a checkpoint written with :class:`EMA` into ``module`` (for inference/export).

    Args:
        module: the LightningModule (or the averaged submodule itself when ``attr`` is None and it matches).
        checkpoint: a path (loaded with ``weights_only=True``) or an already loaded checkpoint dict.
        attr: the ``EMA(attr=...)`` used in training.

    Returns:
        True when EMA weights were found and loaded, False when the checkpoint has none (module unchanged).
    """
    ckpt = (
        torch.load(checkpoint, map_location="cpu", weights_only=True)
        if isinstance(checkpoint, str)
        else checkpoint
    )
    weights = ckpt.get(EMA_KEY)
    if weights is None:
        return False
    _target(module, attr).load_state_dict(weights)
    return True


def seed_per_rank(pl_module: pl.LightningModule, base_seed: int, *, workers: bool = True) -> int:
    """Seed every RNG with ``base_seed + global_rank`` so each rank draws different noise/timesteps.

    Call after the process group exists (e.g. in ``on_fit_start``); weight init is unaffected because DDP broadcasts
    rank 0's weights when it wraps the model. Returns the seed used on this rank.
    """
    seed = int(base_seed) + int(pl_module.global_rank)
    pl.seed_everything(seed, workers=workers, verbose=False)
    return seed


class PerRankSeed(Callback):
    """Callback form of :func:`seed_per_rank`.

    Args:
        base_seed: the experiment seed.
        reseed_every_batch: also re-seed torch's RNGs before every training batch from
            (base_seed, rank, epoch, batch_idx, global_step), so noise and timesteps depend only on the position in
            training — a run resumed from a checkpoint draws the same values as the uninterrupted run.
    """

    def __init__(self, base_seed: int = 0, reseed_every_batch: bool = True) -> None:
        self.base_seed = base_seed
        self.reseed_every_batch = reseed_every_batch

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        seed_per_rank(pl_module, self.base_seed)

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self.reseed_every_batch:
            return
        key = [self.base_seed, trainer.global_rank, trainer.current_epoch, batch_idx, trainer.global_step]
        torch.manual_seed(int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1))

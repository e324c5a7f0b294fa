"""Per-case metrics accumulated over an evaluation epoch and reduced exactly over DDP ranks.

Shared by the downstream modules (:mod:`medfusion.models.segmentation`, :mod:`medfusion.models.registration`):
``update(stage, name, values (B, C))`` in ``validation_step`` / ``test_step``, ``means(stage, name, width)`` at the
epoch's end. Sums and counts (:class:`medfusion.eval.segmentation.MeanAccumulator`) are summed over ranks, so every
case counts once whatever rank evaluated it, and every rank gets (and may log) the same value.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from medfusion.eval.segmentation import MeanAccumulator


class CaseMeans:
    """Per-(stage, metric) :class:`MeanAccumulator` s of one LightningModule."""

    def __init__(self, module: Any) -> None:
        self._module = module  # read lazily: the trainer is attached after construction
        self._acc: dict[str, MeanAccumulator] = {}

    def update(self, stage: str, name: str, values: Tensor) -> None:
        self._acc.setdefault(f"{stage}/{name}", MeanAccumulator()).update(values)

    def seen(self, stage: str, name: str) -> bool:
        return f"{stage}/{name}" in self._acc

    def _reduce(self, t: Tensor) -> Tensor:
        trainer = getattr(self._module, "_trainer", None)
        if trainer is None or trainer.world_size == 1:
            return t
        return trainer.strategy.reduce(t, reduce_op="sum")

    def means(self, stage: str, name: str, width: int) -> tuple[Tensor, Tensor]:
        """``(mean per class, cases per class)`` over all ranks, then reset. Every rank must call it (collective),
        also a rank that saw no case (it contributes zeros of ``width`` classes)."""
        acc = self._acc.setdefault(f"{stage}/{name}", MeanAccumulator())
        out = acc.compute(self._reduce, num_classes=width, device=self._module.device)
        acc.reset()
        return out

    @property
    def distributed(self) -> bool:
        trainer = getattr(self._module, "_trainer", None)
        return trainer is not None and trainer.world_size > 1


class EvaluationHooks:
    """Lightning's validation / test hooks for a module with ``_evaluate(batch, stage)`` (per step) and
    ``_log_epoch(stage)`` (reduce and log at the epoch's end). A plain mixin: put it before
    :class:`~medfusion.models.base.MedfusionModule` in the bases."""

    def _evaluate(self, batch: dict[str, Any], stage: str) -> None:
        raise NotImplementedError

    def _log_epoch(self, stage: str) -> None:
        raise NotImplementedError

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_epoch("val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

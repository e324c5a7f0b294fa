"""Per-step training generators: a run resumed from a checkpoint draws the same noise as the uninterrupted run.

A killed and resumed training run must be the same run: the diffusion noise, timesteps and random fields drawn in
``training_step`` continue, after a resume, exactly where the interrupted run left off (Lightning checkpoints carry
no RNG state: Lightning#5325; DiT's training script reseeds per rank for the same reason), and under DDP they still
differ across ranks (otherwise every rank trains on the same noise and the effective batch shrinks).

Design. Instead of one long-lived generator whose state would have to be saved (and gathered from every rank under
DDP), every training step gets a fresh ``torch.Generator`` seeded from

    (base seed, global rank, global step, micro-batch = batch index mod ``accumulate_grad_batches``)

mixed by ``numpy.random.SeedSequence`` (so neighbouring keys give unrelated streams). The stream of a step then
depends only on its position in training, never on what was drawn before, so a resumed run is exact by construction
on every rank, with nothing per-rank to save. Noise differs across ranks (rank in the key), across optimiser steps
(global step) and across the micro-batches of one gradient-accumulation step (Lightning itself closes a step when
the batch index reaches a multiple of ``accumulate_grad_batches`` or the epoch ends, so the micro index is unique
within a step). The raw batch index is not used: Lightning numbers the batches after a resume from a checkpoint
written mid-epoch (or at ``max_steps``) differently from the uninterrupted run. The cost is one ``SeedSequence``
and one generator seeding per step, ~10 µs on a CPU core (bench/results/resume_rng.md), against steps of
milliseconds to seconds.

Checkpoint. The only state is the base seed; it is written under :data:`RNG_KEY` as a plain dict of ints and
strings (loads with ``torch.load(weights_only=True)``) and the checkpoint's seed wins on resume, so a resume
continues the same streams even if the new process was seeded differently. A checkpoint without the key (written
before this scheme) still loads: the module keeps its own seed and a warning says that the resumed noise cannot
match the interrupted run. Under DDP the base seed is rank 0's (broadcast in ``on_fit_start``), so the value
saved by rank 0 is the one every rank used.

Hand-written because neither torch nor Lightning has it: Lightning's ``seed_everything`` seeds the global RNGs once
per process and its checkpoints carry no RNG state (Lightning#5325/#19764).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn

RNG_KEY = "medfusion_rng"
"""Checkpoint key: ``{"scheme": SCHEME, "seed": int}``."""
SCHEME = "seed-rank-step-batch/v1"


def step_seed(seed: int, rank: int, step: int, batch_idx: int) -> int:
    """63-bit seed of one training (micro-)step from (base seed, global rank, global step, micro-batch index)."""
    key = [int(v) % 2**64 for v in (seed, rank, step, batch_idx)]
    return int(np.random.SeedSequence(key).generate_state(1, dtype=np.uint64)[0] >> 1)


class StepRNG:
    """Base seed of a module's training randomness and the per-step generators derived from it (module docstring).

    Args:
        seed: base seed; None = ``torch.initial_seed()`` at construction, i.e. the ``seed_everything`` seed of the
            experiment when it was set before the module was built (as ``LightningCLI`` and scripts do).
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = int(torch.initial_seed() if seed is None else seed)

    def generator(
        self, module: Any, batch_idx: int, device: torch.device | str | None = None
    ) -> torch.Generator:
        """Fresh generator of the current step of ``module`` (a LightningModule; rank and step are 0 outside fit).

        ``device``: where the generator draws (``"cuda"`` avoids host-to-device copies of large noise tensors);
        devices without generator support fall back to the CPU. A given device type gives the same stream on resume;
        CPU and GPU streams differ.
        """
        trainer = getattr(module, "_trainer", None)
        accumulate = int(getattr(trainer, "accumulate_grad_batches", 1) or 1)
        seed = step_seed(self.seed, module.global_rank, module.global_step, int(batch_idx) % accumulate)
        dev = torch.device("cpu" if device is None else device)
        try:
            gen = torch.Generator(device=dev)
        except RuntimeError:
            gen = torch.Generator()
        return gen.manual_seed(seed)

    def sync(self, module: Any) -> None:
        """Use rank 0's base seed on every rank (call in ``on_fit_start``; a no-op on one device)."""
        trainer = getattr(module, "_trainer", None)
        if trainer is not None and trainer.world_size > 1:
            self.seed = int(trainer.strategy.broadcast(self.seed, src=0))

    def save(self, checkpoint: dict[str, Any]) -> None:
        """Write the base seed under :data:`RNG_KEY` (ints and strings only: ``weights_only``-loadable)."""
        checkpoint[RNG_KEY] = {"scheme": SCHEME, "seed": self.seed}

    def load(self, checkpoint: dict[str, Any]) -> None:
        """Take the checkpoint's base seed; warn (and keep ours) when it has none or an unknown scheme."""
        state = checkpoint.get(RNG_KEY)
        if not isinstance(state, dict) or state.get("scheme") != SCHEME:
            rank_zero_warn(
                f"checkpoint has no {RNG_KEY!r} ({SCHEME}); training noise continues from seed {self.seed}, "
                "so the resumed run will not draw the same noise as the interrupted one"
            )
            return
        self.seed = int(state["seed"])

"""DeepCache (Ma et al., "DeepCache: Accelerating Diffusion Models for Free", CVPR 2024) for MONAI's
``DiffusionModelUNet`` inside our networks (:class:`medfusion.nets.unet.DiffusionUNet`, also when wrapped in
:class:`medfusion.nets.latent_grid.ImageGrid` or any other module).

Adjacent sampling steps change the U-Net's deep, low-resolution features little. Every ``interval``-th call runs the
whole U-Net and caches the input of the shallowest ``branch + 1`` up-blocks (the deep features); the calls in between
run only the shallow branch: the time embedding, ``conv_in``, the down-blocks ``0..branch`` (for their skip
connections) and the last ``branch + 1`` up-blocks on the cached features, skipping the deeper down-blocks, the middle
block and the deeper up-blocks. ``interval = 1`` is the plain network. It is a network wrapper, so it works with every
sampler; the cache belongs to one sampling run and to one batch shape (a new shape forces a full call).

    with deep_cache(net, interval=3):
        out = sample("dpmpp_2m", net, x, ts, schedule=schedule)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import Tensor, nn


class CachedUNet(nn.Module):
    """A MONAI ``DiffusionModelUNet`` called as ``forward(x, timesteps, class_labels=None)`` with DeepCache.

    Args:
        unet: the MONAI network (its weights are shared, not copied).
        interval: N: a full evaluation every N calls, the shallow branch in between (1 = always full).
        branch: the skip branch kept (0 = the shallowest level; at most ``len(channels) - 1``).

    ``full_calls`` and ``shallow_calls`` count the two kinds of calls since the last :meth:`reset`.
    """

    def __init__(self, unet: nn.Module, interval: int, branch: int = 0) -> None:
        super().__init__()
        levels = len(unet.down_blocks)
        if interval < 1:
            raise ValueError(f"cache interval must be >= 1, got {interval}")
        if not 0 <= branch < levels:
            raise ValueError(
                f"cache branch must lie in [0, {levels - 1}] for this {levels}-level U-Net, got {branch}"
            )
        self.unet = unet
        self.interval = int(interval)
        self.branch = int(branch)
        self.reset()

    def reset(self) -> None:
        """Forget the cached features (start of a sampling run)."""
        self.cache: Tensor | None = None
        self.calls = self.full_calls = self.shallow_calls = 0

    def _embedding(self, x: Tensor, timesteps: Tensor, class_labels: Tensor | None) -> Tensor:
        from monai.networks.nets.diffusion_model_unet import get_timestep_embedding

        u = self.unet
        emb = u.time_embed(get_timestep_embedding(timesteps, u.block_out_channels[0]).to(dtype=x.dtype))
        if u.num_class_embeds is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when num_class_embeds > 0")
            emb = emb + u.class_embedding(class_labels).to(dtype=x.dtype)
        return emb

    def forward(self, x: Tensor, timesteps: Tensor, class_labels: Tensor | None = None) -> Tensor:
        u, keep = (
            self.unet,
            len(self.unet.up_blocks) - 1 - self.branch,
        )  # up-blocks [keep:] are the shallow branch
        full = self.calls % self.interval == 0 or self.cache is None or self.cache.shape[0] != x.shape[0]
        self.calls += 1
        emb = self._embedding(x, timesteps, class_labels)
        h = u.conv_in(x)
        skips: list[Tensor] = [h]
        # 1. down: every block on a full call, blocks 0..branch on a shallow one
        for block in u.down_blocks if full else u.down_blocks[: self.branch + 1]:
            h, res = block(hidden_states=h, temb=emb, context=None)
            skips.extend(res)
        if full:
            # 2. the deep part: middle block and up-blocks [0, keep); cache the input of up-block ``keep``
            self.full_calls += 1
            h = u.middle_block(hidden_states=h, temb=emb, context=None)
            for block in u.up_blocks[:keep]:
                n = len(block.resnets)
                h, skips = (
                    block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None),
                    skips[:-n],
                )
            self.cache = h
        else:
            # 3. shallow call: the cached deep features; the shallow up-blocks take the first skip connections
            self.shallow_calls += 1
            h = self.cache
            need = sum(len(block.resnets) for block in u.up_blocks[keep:])
            skips = skips[:need]
        for block in u.up_blocks[keep:]:
            n = len(block.resnets)
            h, skips = (
                block(hidden_states=h, res_hidden_states_list=skips[-n:], temb=emb, context=None),
                skips[:-n],
            )
        return u.out(h)


@contextlib.contextmanager
def deep_cache(module: nn.Module, interval: int, branch: int = 0) -> Iterator[list[CachedUNet]]:
    """Within the block, every :class:`~medfusion.nets.unet.DiffusionUNet` inside ``module`` runs its MONAI U-Net
    through a fresh :class:`CachedUNet` (yields them); the original networks are restored on exit.
    ``interval = 1`` changes nothing."""
    from medfusion.nets.unet import DiffusionUNet

    targets = [m for m in module.modules() if isinstance(m, DiffusionUNet)]
    if interval < 1:
        raise ValueError(f"cache interval must be >= 1, got {interval}")
    if interval > 1 and not targets:
        raise ValueError(f"DeepCache needs a DiffusionUNet inside {type(module).__name__}; found none")
    originals = [m.unet for m in targets]
    cached = [CachedUNet(u, interval, branch) for u in originals] if interval > 1 else []
    try:
        for m, c in zip(targets, cached):
            m.unet = c
        yield cached
    finally:
        for m, u in zip(targets, originals):
            m.unet = u


__all__ = ["CachedUNet", "deep_cache"]

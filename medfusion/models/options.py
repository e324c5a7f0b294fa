"""Small typed option groups of the restoration modules (RDDM, DiffIR), and the sliding-window runner they share.

A group is a dataclass that LightningCLI fills from a nested YAML mapping (``sliding_window: {roi_size: [64, 64,
64]}``) and that a module stores in its hyper-parameters as a plain mapping (:func:`store_plain`), so that
:mod:`medfusion.models.export` writes it as YAML and rebuilds the module from it (:func:`config_of` turns the mapping
back into the dataclass).

- :class:`SlidingWindow`: window size, windows per network call and overlap of MONAI's ``SlidingWindowInferer``
  (Gaussian blending); :func:`run_windows` applies a function window by window, or once when a window covers the
  input.
- :class:`UNetConfig`: the widths and blocks of a :class:`medfusion.nets.unet.DiffusionUNet`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from torch import Tensor, nn

T = TypeVar("T")


def config_of(cls: type[T], value: T | Mapping[str, Any] | None, name: str) -> T:
    """``value`` as a ``cls`` dataclass: itself, built from a mapping (a YAML or exported config), or the default.

    ``ValueError`` names the unknown keys of a mapping and the valid ones.
    """
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(value) - set(valid))
        if unknown:
            raise ValueError(f"{name} has no option {', '.join(unknown)}; valid: {', '.join(valid)}")
        return cls(**value)
    raise TypeError(f"{name} must be a {cls.__name__} or a mapping, got {type(value).__name__}")


def regroup(init_args: Mapping[str, Any], moved: Mapping[str, tuple[str, str]], owner: str) -> dict[str, Any]:
    """Init args of an export with flat arguments -> grouped ones (``moved``: old name -> (group, name in it)).

    For :meth:`medfusion.models.base.MedfusionModule.upgrade_config`; ``ValueError`` when a moved argument and
    its group are both given.
    """
    args = dict(init_args)
    groups: dict[str, dict[str, Any]] = {}
    for old, (group, key) in moved.items():
        if old in args:
            if args.get(group) is not None:
                raise ValueError(
                    f"{owner}: {old} belongs to {group!r} (as {key!r}) since medfusion 0.2; give it only there"
                )
            groups.setdefault(group, {})[key] = args.pop(old)
    return {**args, **groups}


def store_plain(hparams: Any, **groups: Any) -> None:
    """Store the dataclass option ``groups`` in ``hparams`` as plain mappings (tuples as lists) for YAML export."""
    for key, value in groups.items():
        plain = dataclasses.asdict(value)
        hparams[key] = {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()}


@dataclass
class SlidingWindow:
    """Sliding-window inference (MONAI ``SlidingWindowInferer``, Gaussian blending).

    Args:
        roi_size: window size in voxels, one value per spatial axis (None: the whole input at once).
        batch_size: windows per network call.
        overlap: fraction of a window shared with its neighbour along each axis, in [0, 1).
    """

    roi_size: tuple[int, ...] | None = None
    batch_size: int = 4
    overlap: float = 0.25

    def __post_init__(self) -> None:
        if self.roi_size is not None:
            self.roi_size = tuple(int(r) for r in self.roi_size)
            if any(r < 1 for r in self.roi_size):
                raise ValueError(f"sliding_window.roi_size must be positive, got {self.roi_size}")
        if self.batch_size < 1:
            raise ValueError(f"sliding_window.batch_size must be >= 1, got {self.batch_size}")
        if not 0.0 <= self.overlap < 1.0:
            raise ValueError(f"sliding_window.overlap must be in [0, 1), got {self.overlap}")


def check_roi_size(roi_size: Sequence[int] | None, spatial_dims: int, divisible_by: int) -> None:
    """``ValueError`` unless ``roi_size`` is None or ``spatial_dims`` positive multiples of ``divisible_by``."""
    if roi_size is None:
        return
    if len(roi_size) != spatial_dims or any(int(r) < 1 or int(r) % divisible_by for r in roi_size):
        raise ValueError(
            f"roi_size needs {spatial_dims} positive multiples of {divisible_by} (one per spatial axis), "
            f"got {tuple(roi_size)}"
        )


def run_windows(
    fn: Callable[[Tensor], Tensor], x: Tensor, roi_size: Sequence[int] | None, batch_size: int, overlap: float
) -> Tensor:
    """``fn(x)`` for ``x`` ``(B, C, *spatial)``, by windows of ``roi_size`` when the input exceeds one window.

    One window covering the input gives exactly ``fn(x)``; otherwise the window outputs are blended with Gaussian
    weights (MONAI's ``SlidingWindowInferer``).
    """
    if roi_size is None or all(s <= r for s, r in zip(x.shape[2:], roi_size)):
        return fn(x)
    from monai.inferers import SlidingWindowInferer

    inferer = SlidingWindowInferer(
        tuple(roi_size), sw_batch_size=batch_size, overlap=overlap, mode="gaussian"
    )
    return inferer(x, fn)


@dataclass
class UNetConfig:
    """Widths and blocks of a :class:`medfusion.nets.unet.DiffusionUNet` (MONAI ``DiffusionModelUNet``).

    Args:
        channels: feature channels per resolution level (spatial sizes must be multiples of
            ``2 ** (len(channels) - 1)``).
        attention_levels: self-attention on/off per level.
        num_res_blocks: residual blocks per level.
        num_head_channels: channels per attention head.
        norm_num_groups: GroupNorm groups (must divide every width).
        resblock_updown: residual blocks for up/down-sampling instead of (transposed) convolutions.
    """

    channels: tuple[int, ...] = (32, 64, 64)
    attention_levels: tuple[bool, ...] = (False, False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    resblock_updown: bool = False

    def __post_init__(self) -> None:
        self.channels = tuple(int(c) for c in self.channels)
        self.attention_levels = tuple(bool(a) for a in self.attention_levels)
        if len(self.attention_levels) != len(self.channels):
            raise ValueError(
                f"unet.attention_levels needs one entry per level of unet.channels {self.channels}, "
                f"got {self.attention_levels}"
            )

    @property
    def divisible_by(self) -> int:
        return 2 ** (len(self.channels) - 1)

    def build(
        self, spatial_dims: int, in_channels: int, out_channels: int, cond_channels: int = 0
    ) -> nn.Module:
        from medfusion.nets.unet import DiffusionUNet

        return DiffusionUNet(
            spatial_dims=spatial_dims, in_channels=in_channels, out_channels=out_channels,
            cond_channels=cond_channels, channels=self.channels, attention_levels=self.attention_levels,
            num_res_blocks=self.num_res_blocks, num_head_channels=self.num_head_channels,
            norm_num_groups=self.norm_num_groups, resblock_updown=self.resblock_updown,
        )  # fmt: skip

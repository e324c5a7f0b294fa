"""DiffusionCT stage 2's configuration: the denoiser and regression U-Nets and the sampling defaults (re-exported
by :mod:`medfusion.models.diffusion_ct`, whose constructor takes them)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from medfusion.diffusion.schedules import Spacing

Mode = Literal["conditional", "translate"]
Decode = Literal["latent", "residual"]
Sampler = Literal["ddpm", "ddim", "dpmpp_2m", "dpmpp_3m", "unipc", "plms", "pndm", "deis", "dpm_v3"]
MODES: tuple[str, ...] = ("conditional", "translate")
DECODES: tuple[str, ...] = ("latent", "residual")
OPTIONS: tuple[str, ...] = (
    "num_steps", "sampler", "cache_interval", "time_shift", "strength", "decode", "residual_sigma", "mean_only",
    "sw_batch_size", "overlap",
)  # fmt: skip


def check_choice(name: str, value: Any, valid: Sequence[str]) -> None:
    """``ValueError`` naming the valid values unless ``value`` is one of them."""
    if value not in valid:
        raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")


@dataclass(frozen=True)
class DenoiserConfig:
    """The denoising U-Net (:class:`medfusion.nets.unet.DiffusionUNet`); its in / out / condition channels follow
    from the latent and ``pixel_shuffle``."""

    channels: tuple[int, ...] = (64, 128)
    attention_levels: tuple[bool, ...] = (False, True)
    num_res_blocks: int = 1
    num_head_channels: int = 32
    norm_num_groups: int = 32
    resblock_updown: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # lists from YAML
        object.__setattr__(self, "attention_levels", tuple(bool(a) for a in self.attention_levels))


@dataclass(frozen=True)
class RegressionConfig:
    """The CorrDiff-style regression U-Net (:class:`medfusion.nets.unet.GatedUNet`): ``channels`` per level
    (stride 2 between levels, at least two) and its own AdamW rate ``lr`` (None = the module's)."""

    channels: tuple[int, ...] = (64, 128, 256)
    lr: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "channels", tuple(int(c) for c in self.channels))  # lists from YAML
        if len(self.channels) < 2:
            raise ValueError(f"regression channels needs at least two levels, got {tuple(self.channels)}")


@dataclass(frozen=True)
class SamplingConfig:
    """Defaults of :meth:`DiffusionCT.restore`'s options (each can be overridden per call).

    Args:
        sampler: :data:`medfusion.diffusion.samplers.SAMPLERS` name; ``num_steps``: sampler steps, = network
            evaluations except ``plms`` (N + 1) and ``pndm`` (N + 9) (:func:`~medfusion.diffusion.samplers.network_evaluations`).
            ``dpm_v3`` needs the model's statistics (:mod:`medfusion.models.dpm_v3_stats`; the paper spaces its
            steps uniformly in log-SNR: ``timestep_spacing="logsnr"``).
        timestep_spacing: how the steps are spread over ``[0, T)`` (:func:`medfusion.diffusion.schedules.timesteps`).
        strength: translate mode: fraction of T to which the source latent is noised (SDEdit).
        decode: ``"latent"`` (``D(z_hat)``) or ``"residual"`` (module docstring); ``residual_sigma``: low-pass SD of
            the residual in pixels (0 = none).
        sw_batch_size, overlap: 3D sliding windows (``roi_size``): windows per call and overlap fraction.
        cache_interval: DeepCache (:mod:`medfusion.nets.deepcache`): a full denoiser evaluation every N network
            calls, only the shallow branch in between (1 = off).
        time_shift: Time-Shift sampler window w in training timesteps (:mod:`medfusion.diffusion.time_shift`,
            0 = off); ``time_shift_cutoff``: no shift at t <= t_c; ``time_shift_variance``: the data variance v_0
            of the matched variance ᾱ v_0 + 1 - ᾱ (0 = the paper's rule; residual-mode targets have unit variance).
        mean_only: models with a regression head: the default output is the regression's posterior mean (no DDPM
            sample); ``medfusion demo`` sets it when its validation patients score the mean above the sample.
    """

    sampler: Sampler = "dpmpp_2m"
    num_steps: int = 20
    timestep_spacing: Spacing = "trailing"
    strength: float = 0.5
    decode: Decode = "latent"
    residual_sigma: float = 0.0
    sw_batch_size: int = 4
    overlap: float = 0.25
    cache_interval: int = 1
    time_shift: int = 0
    time_shift_cutoff: int = 300
    time_shift_variance: float = 0.0
    mean_only: bool = False

    def __post_init__(self) -> None:
        from medfusion.diffusion.samplers import SAMPLERS
        from medfusion.diffusion.schedules import SPACINGS

        check_choice("sampler", self.sampler, tuple(SAMPLERS))
        check_choice("timestep_spacing", self.timestep_spacing, SPACINGS)
        check_choice("decode", self.decode, DECODES)
        if self.num_steps < 1 or self.sw_batch_size < 1:
            raise ValueError(f"num_steps and sw_batch_size must be >= 1, got {self.num_steps}, {self.sw_batch_size}")
        if self.cache_interval < 1 or self.time_shift < 0 or self.time_shift_cutoff < -1:
            raise ValueError(
                f"cache_interval must be >= 1, time_shift >= 0 and time_shift_cutoff >= -1, got "
                f"{self.cache_interval}, {self.time_shift}, {self.time_shift_cutoff}"
            )
        if self.time_shift_variance < 0:
            raise ValueError(f"time_shift_variance must be >= 0, got {self.time_shift_variance}")
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {self.strength}")
        if self.residual_sigma < 0 or not 0.0 <= self.overlap < 1.0:
            raise ValueError(
                f"residual_sigma must be >= 0 (pixels) and overlap in [0, 1), got {self.residual_sigma}, {self.overlap}"
            )

"""DiffusionCT stage 1: the CT encoder-decoder whose bottleneck is the latent space of the diffusion model
(Selim et al., "DiffusionCT: Latent Diffusion Model for CT Image Standardization", arXiv 2301.08815, phase 1).

The encoder-decoder is trained alone to reconstruct CT of *every* protocol (standard and non-standard), so that its
latent is shared by all of them. Loss, on images scaled to [-1, 1] by the data pipeline's HU window::

    L = w_l1 |D(z) - x|_1 + w_ssim (1 - SSIM(D(z), x)) + w_kl KL(q(z | x) || N(0, I)) / n_pixels  (+ w_adv L_adv)

with ``z = mu + sigma eps`` when ``kl_weight > 0`` (the Gaussian-latent autoencoder of Rombach et al. 2022, "High-
Resolution Image Synthesis with Latent Diffusion Models", sec. 3). The KL is summed over the latent and divided by
the image's pixel count, so ``kl_weight`` weighs it against the per-pixel mean L1 as Rombach et al. weigh their KL
against a per-image summed reconstruction loss. The optional patch-adversarial term (``adversarial``: MONAI
``PatchDiscriminator``, least-squares ``PatchAdversarialLoss``, as in Rombach et al.'s autoencoders) trains a
discriminator in the same step (manual optimisation, two optimisers).

The network is one of :mod:`medfusion.nets.autoencoder` (``architecture``): MONAI's ``AutoencoderKL`` (``"kl"``) or
our skip autoencoder (``"skip"``: decoder skips from the levels ``>= skip_from_level``, optionally DC-AE's residual
shortcuts, Chen et al. ICLR 2025), both behind ``encode(x) -> (mean, sigma, skips)`` / ``decode(z, skips)``.

Latent scale (Rombach et al. 2022, sec. 3.3 and appendix): the diffusion latent is ``z = s mu`` with
``s = 1 / std(mu)`` over the training data, tracked as a running estimate during training
(:meth:`DiffusionCTAutoencoder._update_latent_stats`, all-reduced under DDP) or set exactly by
:meth:`DiffusionCTAutoencoder.calibrate_latent_scale`; it is stored with the weights (buffer ``latent_scale``).

Batch keys read: ``source``, ``target`` and / or ``image`` (``medfusion.keys``), ``(B, 1, *spatial)`` in [-1, 1];
all present are concatenated. Options and the measurements behind them: docs/methods/diffusion_ct.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion import keys
from medfusion.models.base import MedfusionModule, cosine_schedule
from medfusion.nets.autoencoder import Architecture, Encoded, build_autoencoder


@dataclass(frozen=True)
class AdversarialConfig:
    """Patch-adversarial term of stage 1 (off when the module's ``adversarial`` is None).

    Args:
        weight: weight of the generator's least-squares patch loss (> 0).
        start_step: training iteration from which the adversarial terms are on (reconstruction warm-up).
        disc_channels, disc_layers: MONAI ``PatchDiscriminator`` (instance norm).
        disc_lr: the discriminator's Adam rate (None = the module's ``lr``).
    """

    weight: float = 0.1
    start_step: int = 0
    disc_channels: int = 32
    disc_layers: int = 3
    disc_lr: float | None = None

    def __post_init__(self) -> None:
        if self.weight <= 0 or self.start_step < 0:
            raise ValueError(
                f"adversarial weight must be > 0 and start_step >= 0, got {self.weight}, {self.start_step}"
            )


# flat arguments of medfusion 0.1 that this version dropped or regrouped (upgrade_config)
_V01_ADVERSARIAL = {
    "adv_weight": "weight", "adv_start_step": "start_step", "disc_channels": "disc_channels",
    "disc_layers": "disc_layers", "disc_lr": "disc_lr",
}  # fmt: skip


class DiffusionCTAutoencoder(MedfusionModule):
    """DiffusionCT stage 1: CT encoder-decoder whose bottleneck is the latent space of the diffusion model.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes / patches).
        in_channels: image channels (1 for CT).
        architecture: ``"kl"`` (MONAI ``AutoencoderKL``: everything passes the bottleneck) or ``"skip"`` (our U-Net
            encoder-decoder with decoder skips from the levels ``>= skip_from_level``; :mod:`medfusion.nets.autoencoder`).
        channels: feature channels per level; the latent is downsampled by ``f = 2 ** (len(channels) - 1)``.
        latent_channels: channels of the latent ``(B, C_lat, *spatial / f)``.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels`` for ``"kl"``).
        attention: ``"kl"`` only: self-attention in the deepest level (costly in 3D).
        skip_from_level: ``"skip"`` only: first encoder level feeding the decoder (0 = every level including full
            resolution; ``len(channels) - 1`` = no skip at all).
        shortcuts: ``"skip"`` only: DC-AE's parameter-free residual shortcuts around every change of resolution and
            width; with no skip and as many latent values as pixels the shortcut alone is lossless.
        l1_weight, ssim_weight, kl_weight: loss weights of ``L1``, ``1 - SSIM`` (data range 2) and the KL term
            (summed over the latent, per image pixel: module docstring).
        adversarial: the patch-adversarial term (:class:`AdversarialConfig`; a mapping of its fields is accepted),
            None = off (no discriminator). With it one training iteration steps two optimisers, and Lightning counts
            both in ``global_step``: ``max_steps`` is then twice the iterations.
        lr: Adam learning rate (cosine decay over the trainer's steps when they are finite).
        scale_momentum: momentum of the running variance of posterior means that gives ``latent_scale``.
        hu_window: (low, high) HU mapped to [-1, 1] by the data pipeline; stored so that inference scales new scans
            the same way.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        architecture: Architecture = "kl",
        channels: tuple[int, ...] = (32, 64, 64),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        norm_num_groups: int = 32,
        attention: bool = False,
        skip_from_level: int = 0,
        shortcuts: bool = False,
        l1_weight: float = 1.0,
        ssim_weight: float = 0.2,
        kl_weight: float = 1e-6,
        adversarial: AdversarialConfig | None = None,
        lr: float = 1e-3,
        scale_momentum: float = 0.02,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        self.save_hyperparameters()
        if isinstance(adversarial, dict):
            adversarial = AdversarialConfig(**adversarial)
        self.adversarial = adversarial
        self.hparams["adversarial"] = None if adversarial is None else asdict(adversarial)  # YAML-plain
        self.net = build_autoencoder(
            architecture, spatial_dims, in_channels, channels, latent_channels, num_res_blocks, norm_num_groups,
            attention=attention, skip_from_level=skip_from_level, shortcuts=shortcuts,
        )  # fmt: skip
        from monai.losses import SSIMLoss

        self.ssim_loss = SSIMLoss(spatial_dims=spatial_dims, data_range=2.0, win_size=7)
        self.discriminator: nn.Module | None = None
        if adversarial is not None:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(
                spatial_dims=spatial_dims, num_layers_d=adversarial.disc_layers, channels=adversarial.disc_channels,
                in_channels=in_channels, out_channels=1, norm="INSTANCE",
            )  # fmt: skip
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
            self.automatic_optimization = False  # generator and discriminator step in turn
        # latent scale s = 1 / std(mu) (running estimate over training batches, or exact via calibrate_latent_scale)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_var", torch.zeros(()))  # 0 = not yet estimated

    # -------------------------------------------------------------------------------- encode / decode
    @property
    def downsample_factor(self) -> int:
        """Spatial reduction factor of the latent (input sizes must be divisible by it)."""
        return self.net.downsample_factor

    @property
    def latent_channels(self) -> int:
        return self.net.latent_channels

    def encode(self, x: Tensor) -> Encoded:
        """Posterior of ``x`` ``(B, C, *spatial)`` in [-1, 1]: unscaled mean and SD, and the decoder's skips."""
        return self.net.encode(x)

    def decode(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        """Image from an *unscaled* latent ``z`` and the skips of the encoded image (``()`` for ``"kl"``)."""
        return self.net.decode(z, skips)

    def encode_latent(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Scaled diffusion latent ``s * mu`` (unit variance over the training set) and the skips."""
        enc = self.encode(x)
        return enc.mean * self.latent_scale, enc.skips

    def decode_latent(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        """Inverse of :meth:`encode_latent`: ``decode(z / s)``."""
        return self.decode(z / self.latent_scale, skips)

    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x).mean)``: the passthrough, the ceiling of latent decoding."""
        enc = self.encode(x)
        return self.decode(enc.mean, enc.skips)

    def forward(self, x: Tensor) -> Tensor:
        return self.reconstruct(x)

    # -------------------------------------------------------------------------------- training
    @staticmethod
    def _images(batch: dict[str, Any]) -> Tensor:
        parts = [batch[k] for k in (keys.SOURCE, keys.TARGET, keys.IMAGE) if k in batch]
        if not parts:
            raise KeyError(
                f"batch needs one of {keys.SOURCE!r}, {keys.TARGET!r}, {keys.IMAGE!r}; got {sorted(batch)}"
            )
        return torch.cat([torch.as_tensor(p) for p in parts], dim=0)

    def _losses(self, x: Tensor, generator: torch.Generator | None) -> tuple[Tensor, Tensor, Tensor]:
        """Generator loss, posterior means and the reconstruction of images ``x``."""
        hp = self.hparams
        enc = self.encode(x)
        z = enc.mean
        if hp.kl_weight > 0:
            dev = generator.device if generator is not None else z.device
            z = z + enc.sigma * torch.randn(z.shape, generator=generator, device=dev).to(z.device, z.dtype)
        recon = self.decode(z, enc.skips)
        loss = hp.l1_weight * F.l1_loss(recon, x)
        if hp.ssim_weight > 0:
            loss = loss + hp.ssim_weight * self.ssim_loss(recon, x)
        if hp.kl_weight > 0:
            var = enc.sigma.pow(2)
            kl = 0.5 * (enc.mean.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1).flatten(1).sum(1).mean()
            loss = loss + hp.kl_weight * kl / x[0].numel()  # per image pixel, as the L1 (module docstring)
        if self._adversarial_on():
            # the generator's term sees the discriminator with detached weights: its gradient reaches the generator
            # only, so generator and discriminator losses can share one backward pass (one DDP reduction per step)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake = torch.func.functional_call(self.discriminator, frozen, (recon.contiguous(),))[-1]
            adv = self.adv_loss(fake, target_is_real=True, for_discriminator=False)
            loss = loss + self.adversarial.weight * adv
        return loss, enc.mean, recon

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training loss of images ``x`` (with the generator's adversarial term when on) and the posterior means."""
        loss, mu, _ = self._losses(x, generator)
        return loss, mu

    def _iteration(self) -> int:
        """Training iterations done (Lightning's ``global_step`` counts both optimisers with the discriminator)."""
        return int(self.global_step) // (2 if self.discriminator is not None else 1)

    def _adversarial_on(self) -> bool:
        return self.adversarial is not None and self._iteration() >= self.adversarial.start_step

    def discriminator_loss(self, x: Tensor, recon: Tensor) -> Tensor:
        """Least-squares patch loss of the discriminator: real ``x`` -> 1, reconstructions -> 0."""
        fake = self.discriminator(recon.detach().contiguous())[-1]
        real = self.discriminator(x.contiguous())[-1]
        return 0.5 * (
            self.adv_loss(fake, target_is_real=False, for_discriminator=True)
            + self.adv_loss(real, target_is_real=True, for_discriminator=True)
        )

    @torch.no_grad()
    def _update_latent_stats(self, mu: Tensor) -> None:
        """Running ``Var(mu)`` -> ``latent_scale``. Under DDP the batch moments are averaged over ranks (equal
        per-rank batches), so every rank holds the same scale, estimated from every rank's data."""
        m = mu.float()
        n = m.numel()
        moments = torch.stack([m.mean(), m.square().mean()])
        trainer = self._trainer  # None outside Lightning
        if trainer is not None and trainer.world_size > 1:
            moments = trainer.strategy.reduce(moments, reduce_op="mean")
            n *= trainer.world_size
        var = (moments[1] - moments[0].square()).clamp_min(0) * (n / max(n - 1, 1))
        if self.latent_var <= 0:
            self.latent_var.copy_(var)
        else:
            self.latent_var.lerp_(var, self.hparams.scale_momentum)
        self.latent_scale.copy_(self.latent_var.clamp_min(1e-12).rsqrt())

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = self._images(batch)
        loss, mu, recon = self._losses(x, generator=self.step_generator(batch_idx, x.device))
        self._update_latent_stats(mu.detach())
        self.log("train/loss", loss, prog_bar=True, batch_size=x.shape[0])
        self.log("latent_scale", self.latent_scale, batch_size=x.shape[0])
        if self.automatic_optimization:
            return loss
        # manual optimisation (adversarial term): the discriminator's loss sees detached reconstructions and the
        # generator's loss a detached discriminator, so one backward of their sum gives each optimiser exactly its
        # own gradient; one backward per step is what DDP's gradient reduction expects (every parameter used once)
        opt_g, opt_d = self.optimizers()
        d_loss = self.discriminator_loss(x, recon) * (1.0 if self._adversarial_on() else 0.0)
        opt_g.zero_grad()
        opt_d.zero_grad()
        self.manual_backward(loss + d_loss)
        opt_g.step()
        opt_d.step()  # always stepped (zero loss in warm-up), so global_step = 2 x iterations throughout
        for sched in self.lr_schedulers() or []:
            sched.step()
        self.log("train/d_loss", d_loss, batch_size=x.shape[0])
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        from medfusion.eval.image import batch_mean, psnr

        x = self._images(batch)
        recon = self.reconstruct(x)
        self.log("val/loss", F.l1_loss(recon, x), batch_size=x.shape[0], sync_dist=True)
        value = batch_mean(psnr, recon.clamp(-1, 1), x, 2.0)
        self.log("val/psnr", value, prog_bar=True, batch_size=x.shape[0], sync_dist=True)

    @torch.no_grad()
    def calibrate_latent_scale(
        self, images: Iterable[Tensor | dict[str, Any]], max_batches: int | None = None
    ) -> float:
        """Set ``latent_scale = 1 / std(mu)`` exactly over ``images`` (tensors or batches); returns it."""
        was_training = self.training
        self.eval()
        n, mean, m2 = 0, 0.0, 0.0
        for i, item in enumerate(images):
            if max_batches is not None and i >= max_batches:
                break
            x = self._images(item) if isinstance(item, dict) else item
            mu = self.encode(x.to(self.device, self.dtype)).mean.double()
            # Chan et al. parallel update of the mean / sum of squared deviations
            k, bm = mu.numel(), mu.mean().item()
            bm2 = ((mu - bm) ** 2).sum().item()
            delta = bm - mean
            tot = n + k
            mean += delta * k / tot
            m2 += bm2 + delta**2 * n * k / tot
            n = tot
        self.train(was_training)
        if n < 2:
            raise ValueError("calibrate_latent_scale needs at least two latent values")
        var = m2 / (n - 1)
        self.latent_var.fill_(var)
        self.latent_scale.fill_(1.0 / math.sqrt(max(var, 1e-12)))
        return float(self.latent_scale)

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.net.parameters(), lr=self.hparams.lr)
        if self.discriminator is None:
            return cosine_schedule(self, opt)
        opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.adversarial.disc_lr or self.hparams.lr, betas=(0.5, 0.9)
        )
        g, d = (cosine_schedule(self, o, steps_per_iteration=2) for o in (opt, opt_d))
        return [x if isinstance(x, dict) else {"optimizer": x} for x in (g, d)]

    # -------------------------------------------------------------------------------- old exports
    @classmethod
    def upgrade_config(cls, init_args: dict[str, Any]) -> dict[str, Any]:
        """Init args of medfusion 0.1 (flat ``skip_connections``, ``adv_*``, ``disc_*``, ``cross_skips``,
        ``skip_dropout``) -> this version's; ``ValueError`` for the stage-1 variants that were removed."""
        args = dict(init_args)
        for name, default in (("cross_skips", False), ("skip_dropout", 0.0)):
            if name in args:
                value = args.pop(name)
                if value != default:
                    raise ValueError(
                        f"{name} was removed in medfusion 0.2 (the stage-1 variant did not pay, see "
                        f"docs/methods/diffusion_ct.md); this model was trained with {name}={value!r}: retrain "
                        "it without"
                    )
        if "skip_connections" in args:
            args["architecture"] = "skip" if args.pop("skip_connections") else "kl"
            if args["architecture"] == "kl":
                args.pop("skip_from_level", None)  # unused by AutoencoderKL in 0.1, always 0 there
        old = {k: args.pop(k) for k in list(args) if k in _V01_ADVERSARIAL}
        if old and "adversarial" not in args:
            on = float(old.get("adv_weight", 0.0)) > 0
            args["adversarial"] = {_V01_ADVERSARIAL[k]: v for k, v in old.items()} if on else None
        return args

    def upgrade_state_dict(self, state: dict[str, Tensor]) -> dict[str, Tensor]:
        """0.1 kept MONAI's ``AutoencoderKL`` directly under ``net.``; it now sits in the adapter (``net.kl.``)."""
        if self.hparams.architecture != "kl" or any(k.startswith("net.kl.") for k in state):
            return state
        return {("net.kl." + k[4:] if k.startswith("net.") else k): v for k, v in state.items()}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        if "state_dict" in checkpoint:  # resuming a 0.1 run: Lightning loads the weights after this hook
            checkpoint["state_dict"] = self.upgrade_state_dict(checkpoint["state_dict"])

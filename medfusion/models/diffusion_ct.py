"""DiffusionCT: latent diffusion for CT standardization (Selim et al., arXiv 2301.08815 / 2310.05237).

The method has two stages, and so two LightningModules live in this one file:

1. :class:`DiffusionCTAutoencoder` (phase 1 of the paper): an encoder-decoder trained alone to reconstruct CT of
   *every* protocol (standard and non-standard), so that its bottleneck is a shared latent representation.
   Loss ``L1 + w_ssim (1 - SSIM) + w_kl KL (+ w_adv L_adv)`` on images scaled to [-1, 1] by the HU window of the data
   pipeline. The optional patch-adversarial term (``adv_weight > 0``; MONAI ``PatchDiscriminator`` and least-squares
   ``PatchAdversarialLoss``, as in Rombach et al. 2022's autoencoders and MONAI's generative tutorials) trains a
   discriminator in the same step (manual optimisation, two optimisers) from ``adv_start_step`` on.
   After training, latents are used as ``z = s * mu`` with the scale ``s = 1 / std(mu)`` over the training set
   (Rombach et al. 2022, sec. 3.3; user_asks §0.10). ``s`` is stored with the weights (buffer ``latent_scale``).
2. :class:`DiffusionCT` (phase 2): a DDPM (Ho et al. 2020, eq. 4 and 14) in that latent space, with the autoencoder
   frozen. Two modes:

   * ``conditional`` (paired data): the network sees the noised target latent concatenated with the source latent
     ``z_src`` and learns the standard-protocol latent. With ``residual=True`` (default) the diffused quantity is
     ``x0 = r * (z_std - z_src)`` with its own scale ``r = 1 / std(z_std - z_src)``; the measured feasibility run
     (shared/reference/diffusionct_feasibility.md, risk 4) showed that a from-noise model fails to learn the
     near-identity map in a few hundred steps while the residual target reaches the autoencoder ceiling.
   * ``translate`` (unpaired: only standard scans are needed; batches with ``target`` or ``image`` alone, e.g. the
     built-in ``image.json`` manifest): an unconditional DDPM on standard latents; at
     inference the source latent is noised to ``t_start = strength * (T - 1)`` with ``q(x_t | x_0)`` (eq. 4) and
     denoised from there (SDEdit, Meng et al. 2022). ``strength = 0`` returns the plain reconstruction.

   * ``regression=True`` (conditional mode; our addition, after CorrDiff: Mardani et al. 2025, "Residual corrective
     diffusion modeling for km-scale atmospheric downscaling", arXiv 2309.15214): a regression U-Net ``mu`` (MONAI
     ``UNet`` in the latent space, output gated from zero) learns the conditional mean ``E[r (z_std - z_src) | z_src]``
     with an MSE loss, and the DDPM diffuses only what is left, ``x0 = r (z_std - z_src) - mu(z_src)``: the part of
     the standard scan the source does not determine (its own noise texture). Why: a DDPM learns the predictable
     part of a near-deterministic map slowly (its high-noise steps are a regression trained on one timestep in T),
     and what it has not learned comes out as noise added to the source instead of the source's noise transformed
     (bench/results/diffusion_ct.md, "Session 4": 12,000 steps still trailed a 3,000-step supervised U-Net by 4 dB).
     Deviation from CorrDiff, which trains ``mu`` first and freezes it: both nets train in the same step (the DDPM's
     target uses ``mu`` detached), so the method stays one stage and DDP sees every parameter used in every step;
     ``mu`` converges in a fraction of the DDPM's steps, after which the DDPM's target is stationary. The scale
     ``r`` is calibrated on the first batch, when ``mu = 0``, so the DDPM's data have SD below 1 once ``mu`` has
     learned. :meth:`DiffusionCT.standardize` with ``mean_only=True`` returns ``D(z_src + mu / r)``: the
     posterior-mean estimate (best PSNR, no texture: the blurred answer the issue warns about). Measured (4,000 CPU
     steps, networks on the image grid): +0.1 dB and +0.01 texture CCC over the plain DDPM; on the latent grid it
     changed nothing; the network grid below was the limit (bench/results/diffusion_ct.md, "Session 5"). A plain
     regression tolerates a far higher rate than the DDPM (``regression_lr``): at 1e-3 (DDPM 2e-4) the same 4,000
     steps gave 39.23 dB for the DDPM sample and 40.96 dB (SSIM 0.972, no blurring: noise SD and edges at the
     standard's) for ``mean_only`` (session 6). ``regression_rescale_step`` rescales the DDPM's target to unit
     variance once the regression has trained for that many steps (CorrDiff normalises the residual it diffuses; with
     ``r`` fixed at the first batch the target shrinks as ``mu`` learns, a lower effective SNR at every ``t``).
     Measured in session 7 (12 test patients, same 4,000 steps): it does not pay (sample CCC 0.39 vs 0.46), so it is
     off by default.

   Network grid (``pixel_shuffle = k``, our addition). With DC-AE shortcuts and as many latent values as pixels (16
   channels at f = 4 in 2D) the latent is a lossless rearrangement of the image, 4 x 4 pixels per latent position; a
   denoiser of 64 channels on that grid has 4 channels per pixel for a per-pixel task (one kernel's noise texture into
   another's), and it learned it slowly: after 12,000 CPU steps it still added noise to smooth and thick inputs.
   ``pixel_shuffle = 2`` rearranges the latent back to the image grid (channel-to-space in the autoencoder's own
   channel order) before the denoiser and the regression U-Net and undoes it on their outputs; the diffusion itself
   stays in the latent (same ``q(x_t | x_0)``, same scale, same decoder). Measured on 12 test patients after 4,000
   steps (bench/results/diffusion_ct.md, "Session 5"): D(z_hat) 38.42 dB and residual decoding 39.01 dB mean PSNR
   (identity 37.93; the same DDPM on the latent grid: 35.3 / 35.7), texture CCC 0.47 (identity 0.19, repeat scan
   0.78); with the regression 38.51 / 39.14 dB, CCC 0.48.

   Sampling uses :func:`medfusion.diffusion.samplers.sample` (default DPM-Solver++(2M), 20 steps) with the
   exponential-moving-average copy of the denoiser. ``v``-prediction is the default because ε-prediction collapsed
   in short training (feasibility note, risk 3).

Decoding (``decode``). ``"latent"`` (the paper): the output is ``D(z_hat)``, so it can be no closer to the standard
scan than the encoder-decoder's own reconstruction (its ceiling). At the budgets we can train (CPU minutes), that
ceiling (36-38 dB on the built-in 128² phantoms) lies *below* the raw input of mild protocols (38-44 dB against the
standard scan), so every latent-decoded output loses fidelity there (bench/results/diffusion_ct.md), unless stage 1
has DC-AE's residual shortcuts (``shortcuts=True``): 46.5 dB after the same 3,000 steps, and the limit moves to
stage 2 (bench/results/diffusion_ct_bench_shortcuts.md). ``"residual"``
(our deliberate deviation) decodes only the *change* the diffusion makes to the latent and adds it to the input:
``y = x + D(z_hat) - D(E(x))``. The autoencoder's reconstruction error cancels to first order, ``z_hat = z_src``
returns the input exactly, and the standardization is still the decoder's image of the latent transformation; what
the latent cannot represent (finer than the autoencoder resolves) is kept from the input, not replaced.
``residual_sigma = s > 0`` keeps only the low-pass part (Gaussian, ``s`` pixels) of the autoencoder's error:
``y = D(z_hat) + G_s * (x - D(E(x)))``. It corrects the autoencoder's coarse errors (its context-dependent HU bias,
bench/results/diffusion_ct.md) while, as in latent decoding, source noise finer than ``s`` that the latent cannot
represent is dropped, not kept: the right choice when sources are noisier than the standard (low dose, sharp
kernels); the full residual (``s = 0``) when they are smoother. Measured on both in bench/results/diffusion_ct.md.

KL weight (deliberate deviation from MONAI's generative tutorials, tested). The KL term is the posterior's KL
summed over the latent elements *divided by the number of image pixels*, so ``kl_weight`` weighs it against the
per-pixel mean L1 as Rombach et al. 2022 weigh their per-image KL (1e-6) against a per-image *summed*
reconstruction loss. The tutorials' pairing (mean L1 + 1e-6 x summed KL) makes the KL 16,384 times stronger at 128²,
and more for larger latents: measured here, a factor-2, 8-channel latent then kept a posterior SD of 0.58 against
a mean SD of 0.77 (the latent carries little more than a blurred image) and reconstructed at 35.7 dB after 2,000
steps (36.8 dB with this weighting; posterior SD 0.011). The f = 4 latents of the demo were limited by training
length more than by the KL; ``shortcuts`` fixed that (bench/results/diffusion_ct.md, "Session 4").

Batch keys read: ``source`` and ``target`` (``medfusion.keys``), images ``(B, 1, *spatial)`` in [-1, 1]; stage 1 also
accepts ``image``.

Training randomness (stage 1: the posterior sample when ``kl_weight > 0``; stage 2: ``t`` and the noise) comes from a
fresh generator per step on the data's device, seeded from (experiment seed, rank, global step, micro-batch)
(:mod:`medfusion.models._rng`; the experiment seed is ``torch.initial_seed()`` when the module is built, i.e.
``seed_everything``'s): ranks draw different noise and a run resumed from a checkpoint draws the same noise as the
uninterrupted one (user_asks §0.12). Stage 2's EMA is an ``AveragedModel`` inside the module: the checkpoint's
``state_dict`` holds both the raw (``net.*``) and the EMA (``ema.module.*``) weights.

Skip connections. The paper's lineage (UNet++ in LTDiff++) probably keeps decoder skips, but kernel differences are
high-frequency texture and skips from the source encoder carry that texture past the bottleneck.
``skip_connections=False`` (default) uses MONAI's ``AutoencoderKL``; ``True`` uses a small U-Net encoder-decoder
written here (MONAI ships no autoencoder with a skip path), whose decoder takes the encoder features of the image
being decoded (in stage 2: the *source* scan), which gives a higher reconstruction ceiling at the price of
keeping source texture. ``skip_from_level=1`` drops the full-resolution skip (where most noise / kernel texture
lives) and keeps the coarser ones: a middle ground measured in bench/results/diffusion_ct.md ("Demo").

Cross-skip training (``cross_skips=True``, our addition for paired data). A skip-connected decoder trained only to
reconstruct learns to take everything from the skips, which leaves the latent, and so the diffusion in it, inert
(measured: stage 2 within 0.02 dB of the passthrough). With ``cross_skips`` each training pair (source, standard of
one anatomy) is also decoded from its own latent and the *other* scan's skips, ``D(z_src, skips_std) -> source`` and
``D(z_std, skips_src) -> standard``: the skips carry the anatomy, the latent must carry the protocol's texture. That
is exactly what stage 2 needs at inference, where the transformed latent is decoded with the source's skips.
Trained that way alone, the decoder still learned to ignore the latent (measured twice, bench/results/diffusion_ct.md).
``skip_dropout = p`` zeroes all skips of a training decode with probability ``p``, so the latent alone must also
reconstruct; with ``p = 0.5`` (and ``cross_skips``) the standard's latent decoded with the source's skips moved every
protocol toward the standard (+0.7 to +1.2 dB over the passthrough), the ceiling was 39.5-40.3 dB (skip-free:
35.7 dB) and the whole model the best DiffusionCT on mild protocols (bench/results/diffusion_ct_bench_skipdrop.md).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any, Literal, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from medfusion import keys
from medfusion.models._rng import StepRNG, StepRNGHooks
from medfusion.nets import autoencoder as nets
from medfusion.nets.autoencoder import GatedUNet, SkipAutoencoder

MODES = ("conditional", "translate")
DECODES = ("latent", "residual")


class Encoded(NamedTuple):
    """Output of :meth:`DiffusionCTAutoencoder.encode`.

    ``mean`` and ``sigma``: posterior mean and SD, ``(B, C_lat, *spatial / f)``, *unscaled*; ``skips``: encoder
    features for the decoder (empty tuple unless ``skip_connections``).
    """

    mean: Tensor
    sigma: Tensor
    skips: tuple[Tensor, ...]


# ----------------------------------------------------------------------------------------------- stage 1
class DiffusionCTAutoencoder(StepRNGHooks, L.LightningModule):
    """DiffusionCT phase 1: CT encoder-decoder whose bottleneck is the latent space of the diffusion model.

    Args:
        spatial_dims: 2 (slices) or 3 (volumes / patches).
        in_channels: image channels (1 for CT).
        channels: feature channels per level; the latent is downsampled by ``f = 2 ** (len(channels) - 1)``.
        latent_channels: channels of the latent ``(B, C_lat, *spatial / f)``.
        num_res_blocks: residual blocks per level.
        norm_num_groups: GroupNorm groups (must divide every entry of ``channels`` for ``AutoencoderKL``).
        attention: self-attention in the deepest level of ``AutoencoderKL`` (costly in 3D).
        skip_connections: ``False`` = MONAI ``AutoencoderKL`` (no skips: everything passes the bottleneck);
            ``True`` = U-Net encoder-decoder whose decoder also receives the encoder features of the decoded image
            (carries source texture past the bottleneck; see the module docstring).
        skip_from_level: with ``skip_connections``, only encoder levels ``>= skip_from_level`` feed the decoder
            (0 = every level including full resolution; 1 = drop the full-resolution skip, which carries most of
            the noise / kernel texture; ``len(channels) - 1`` = no skip at all).
        cross_skips: with ``skip_connections``, also train on swapped skips of each (source, target) pair (module
            docstring); batches must then hold ``source`` and ``target`` of equal size.
        skip_dropout: with ``skip_connections``, probability that a training decode gets no skips at all (zeros),
            so that the latent alone must reconstruct (module docstring). Inference always uses the skips.
        shortcuts: with ``skip_connections``, DC-AE's parameter-free residual shortcuts around every change of
            resolution and width (Chen et al. 2025; ``SkipAutoencoder``). With ``skip_from_level = len(channels) -
            1`` (no skips) and as many latent values as pixels (2D: factor 4 and 16 latent channels) the shortcut
            alone is lossless, so stage 1 starts at a high ceiling (bench/results/diffusion_ct.md, "Session 4").
        l1_weight, ssim_weight, kl_weight: loss weights of ``L1``, ``1 - SSIM`` (data range 2) and the KL term
            (summed over the latent, per image pixel: module docstring).
        adv_weight: weight of the generator's patch-adversarial loss (0 = off, no discriminator is built).
        adv_start_step: training iteration from which the adversarial terms are on (reconstruction warm-up).
        disc_channels, disc_layers, disc_lr: the ``PatchDiscriminator`` (instance norm) and its Adam rate
            (default ``lr``). With the adversarial term one training iteration steps two optimisers, and
            Lightning counts both in ``global_step``: ``max_steps`` is then twice the iterations.
        lr: Adam learning rate (cosine decay over the trainer's steps when they are finite).
        scale_momentum: momentum of the running variance of posterior means that gives ``latent_scale``.
        hu_window: (low, high) HU mapped to [-1, 1] by the data pipeline; stored so that inference
            (``medfusion standardize``) scales new scans the same way.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_channels: int = 1,
        channels: tuple[int, ...] = (32, 64, 64),
        latent_channels: int = 4,
        num_res_blocks: int = 1,
        norm_num_groups: int = 32,
        attention: bool = False,
        skip_connections: bool = False,
        skip_from_level: int = 0,
        cross_skips: bool = False,
        skip_dropout: float = 0.0,
        shortcuts: bool = False,
        l1_weight: float = 1.0,
        ssim_weight: float = 0.2,
        kl_weight: float = 1e-6,
        adv_weight: float = 0.0,
        adv_start_step: int = 0,
        disc_channels: int = 32,
        disc_layers: int = 3,
        disc_lr: float | None = None,
        lr: float = 1e-3,
        scale_momentum: float = 0.02,
        hu_window: tuple[float, float] = (-1000.0, 1000.0),
    ):
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if len(channels) < 1:
            raise ValueError("channels must have at least one level")
        if not 0 <= skip_from_level <= len(channels) - 1:
            raise ValueError(
                f"skip_from_level must be in 0..{len(channels) - 1} (len(channels) - 1), got {skip_from_level}"
            )
        self.save_hyperparameters()
        channels = tuple(int(c) for c in channels)
        if skip_connections:
            self.net = SkipAutoencoder(
                spatial_dims, in_channels, channels, latent_channels, num_res_blocks, norm_num_groups,
                skip_from_level, shortcuts,
            )  # fmt: skip
        else:
            from monai.networks.nets import AutoencoderKL

            n = len(channels)
            self.net = AutoencoderKL(
                spatial_dims=spatial_dims,
                in_channels=in_channels,
                out_channels=in_channels,
                channels=channels,
                latent_channels=latent_channels,
                num_res_blocks=(num_res_blocks,) * n,
                attention_levels=(False,) * (n - 1) + (bool(attention),),
                norm_num_groups=norm_num_groups,
                with_encoder_nonlocal_attn=bool(attention),
                with_decoder_nonlocal_attn=bool(attention),
            )
        if shortcuts and not skip_connections:
            raise ValueError(
                "shortcuts needs skip_connections=True (our U-Net encoder-decoder; skip_from_level="
                f"{len(channels) - 1} for none); MONAI's AutoencoderKL has no shortcut option"
            )
        if cross_skips and not skip_connections:
            raise ValueError(
                "cross_skips needs skip_connections=True (it trains the decoder on swapped skips)"
            )
        if not 0.0 <= skip_dropout < 1.0 or (skip_dropout > 0 and not skip_connections):
            raise ValueError(
                f"skip_dropout must be in [0, 1) and needs skip_connections=True, got {skip_dropout}"
            )
        if adv_weight < 0 or adv_start_step < 0:
            raise ValueError(
                f"adv_weight and adv_start_step must be >= 0, got {adv_weight}, {adv_start_step}"
            )
        from monai.losses import SSIMLoss

        self.ssim_loss = SSIMLoss(spatial_dims=spatial_dims, data_range=2.0, win_size=7)
        self.discriminator: nn.Module | None = None
        if adv_weight > 0:
            from monai.losses import PatchAdversarialLoss
            from monai.networks.nets import PatchDiscriminator

            self.discriminator = PatchDiscriminator(
                spatial_dims=spatial_dims, num_layers_d=disc_layers, channels=disc_channels, in_channels=in_channels,
                out_channels=1, norm="INSTANCE",
            )  # fmt: skip
            self.adv_loss = PatchAdversarialLoss(criterion="least_squares")
            self.automatic_optimization = False  # generator and discriminator step in turn
        # latent scale s = 1 / std(mu) (running estimate over training batches, or exact via calibrate_latent_scale)
        self.register_buffer("latent_scale", torch.ones(()))
        self.register_buffer("latent_var", torch.zeros(()))  # 0 = not yet estimated
        self._train_rng = StepRNG()  # base seed = the experiment's seed_everything seed

    # -------------------------------------------------------------------------------- encode / decode
    @property
    def hu_window(self) -> tuple[float, float]:
        return (float(self.hparams.hu_window[0]), float(self.hparams.hu_window[1]))

    @property
    def downsample_factor(self) -> int:
        """Spatial reduction factor of the latent (input sizes must be divisible by it)."""
        return 2 ** (len(self.hparams.channels) - 1)

    def encode(self, x: Tensor) -> Encoded:
        """Posterior of ``x`` ``(B, C, *spatial)`` in [-1, 1]; unscaled mean and SD."""
        if self.hparams.skip_connections:
            mu, sigma, skips = self.net.encode(x)
            return Encoded(mu, sigma, skips)
        mu, sigma = self.net.encode(x)
        return Encoded(mu, sigma, ())

    def decode(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        """Image from an *unscaled* latent ``z``; ``skips`` are required when ``skip_connections``."""
        if self.hparams.skip_connections:
            if not skips:
                raise ValueError("this autoencoder uses skip connections: decode() needs the encoder skips")
            return self.net.decode(z, skips)
        return self.net.decode(z)

    def encode_latent(self, x: Tensor) -> tuple[Tensor, tuple[Tensor, ...]]:
        """Scaled diffusion latent ``s * mu`` (unit variance over the training set) and the skips."""
        enc = self.encode(x)
        return enc.mean * self.latent_scale, enc.skips

    def decode_latent(self, z: Tensor, skips: tuple[Tensor, ...] = ()) -> Tensor:
        """Inverse of :meth:`encode_latent`: ``decode(z / s)``."""
        return self.decode(z / self.latent_scale, skips)

    def reconstruct(self, x: Tensor) -> Tensor:
        """``decode(encode(x).mean)``: the passthrough used as the ceiling / ablation."""
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
            eps = torch.randn(
                z.shape, generator=generator, device=generator.device if generator is not None else z.device
            )
            z = z + enc.sigma * eps.to(z.device, z.dtype)
        recon = self._train_decode(z, enc.skips, generator)
        loss = self._recon_loss(recon, x)
        if hp.get("cross_skips", False):
            # x = cat([source, target]): decode each latent with the other scan's skips (module docstring)
            if x.shape[0] % 2:
                raise ValueError("cross_skips needs paired batches: cat([source, target]) of equal sizes")
            half = x.shape[0] // 2
            swapped = tuple(torch.cat([t[half:], t[:half]]) for t in enc.skips)
            loss = 0.5 * (loss + self._recon_loss(self._train_decode(z, swapped, generator), x))
        if hp.kl_weight > 0:
            var = enc.sigma.pow(2)
            kl = 0.5 * (enc.mean.pow(2) + var - torch.log(var.clamp_min(1e-12)) - 1).flatten(1).sum(1).mean()
            loss = loss + hp.kl_weight * kl / x[0].numel()  # per image pixel, as the L1 (module docstring)
        if self._adversarial_on():
            # the generator's term sees the discriminator with detached weights: its gradient reaches the generator
            # only, so generator and discriminator losses can share one backward pass (one DDP reduction per step)
            frozen = {k: v.detach() for k, v in self.discriminator.named_parameters()}
            fake = torch.func.functional_call(self.discriminator, frozen, (recon.contiguous(),))[-1]
            loss = loss + hp.adv_weight * self.adv_loss(fake, target_is_real=True, for_discriminator=False)
        return loss, enc.mean, recon

    def _train_decode(
        self, z: Tensor, skips: tuple[Tensor, ...], generator: torch.Generator | None
    ) -> Tensor:
        """``decode`` with skip dropout (all skips zeroed with probability ``skip_dropout``) in training mode."""
        p = float(self.hparams.get("skip_dropout", 0.0))
        if p > 0 and self.training and skips:
            u = torch.rand(
                (), generator=generator, device=generator.device if generator is not None else "cpu"
            )
            if float(u) < p:
                skips = tuple(torch.zeros_like(t) for t in skips)
        return self.decode(z, skips)

    def _recon_loss(self, recon: Tensor, x: Tensor) -> Tensor:
        hp = self.hparams
        loss = hp.l1_weight * F.l1_loss(recon, x)
        if hp.ssim_weight > 0:
            loss = loss + hp.ssim_weight * self.ssim_loss(recon, x)
        return loss

    def loss(self, x: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Training loss of images ``x`` (with the generator's adversarial term when on) and the posterior means."""
        loss, mu, _ = self._losses(x, generator)
        return loss, mu

    def _iteration(self) -> int:
        """Training iterations done (Lightning's ``global_step`` counts both optimisers with the discriminator)."""
        return int(self.global_step) // (2 if self.discriminator is not None else 1)

    def _adversarial_on(self) -> bool:
        return self.discriminator is not None and self._iteration() >= self.hparams.adv_start_step

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
        if self.hparams.get("cross_skips", False):
            if keys.SOURCE not in batch or keys.TARGET not in batch:
                raise KeyError(
                    f"cross_skips needs paired batches with {keys.SOURCE!r} and {keys.TARGET!r}; got {sorted(batch)}"
                )
            x = torch.cat([torch.as_tensor(batch[keys.SOURCE]), torch.as_tensor(batch[keys.TARGET])], dim=0)
        else:
            x = self._images(batch)
        loss, mu, recon = self._losses(x, generator=self._train_rng.generator(self, batch_idx, x.device))
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
        from monai.metrics import PSNRMetric

        x = self._images(batch)
        recon = self.reconstruct(x)
        psnr = PSNRMetric(max_val=2.0)(recon.clamp(-1, 1), x).mean()
        self.log("val/loss", F.l1_loss(recon, x), batch_size=x.shape[0], sync_dist=True)
        self.log("val/psnr", psnr, prog_bar=True, batch_size=x.shape[0], sync_dist=True)

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
            return _with_cosine(self, opt)
        opt_d = torch.optim.Adam(
            self.discriminator.parameters(), lr=self.hparams.disc_lr or self.hparams.lr, betas=(0.5, 0.9)
        )
        g, d = (
            _with_cosine(self, opt, steps_per_iteration=2),
            _with_cosine(self, opt_d, steps_per_iteration=2),
        )
        return [
            g if isinstance(g, dict) else {"optimizer": g},
            d if isinstance(d, dict) else {"optimizer": d},
        ]


def _with_cosine(module: L.LightningModule, opt: torch.optim.Optimizer, steps_per_iteration: int = 1):
    """Cosine decay over the trainer's total steps when those are finite, else a constant rate."""
    try:
        total = module.trainer.estimated_stepping_batches / steps_per_iteration
    except (RuntimeError, AttributeError):
        total = float("inf")
    if not math.isfinite(total) or total <= 0:
        return opt
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, T_max=int(total), eta_min=0.05 * opt.defaults["lr"]
    )
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


# ----------------------------------------------------------------------------------------------- stage 2
class DiffusionCT(StepRNGHooks, L.LightningModule):
    """DiffusionCT phase 2: latent DDPM with the phase-1 encoder-decoder frozen (see the module docstring).

    Args:
        autoencoder: path of the trained :class:`DiffusionCTAutoencoder`: a Lightning ``.ckpt`` or a folder written
            by :func:`medfusion.models.export.export_model`. Loaded without pickle and frozen.
        autoencoder_config: ``{"class_path", "init_args"}`` of the autoencoder; filled in automatically, so that a
            checkpoint or export of this model rebuilds stage 1 from its own weights (the path is then not needed).
        mode: ``"conditional"`` (paired source/target) or ``"translate"`` (train on standard scans only; SDEdit).
        channels, attention_levels, num_res_blocks, num_head_channels: denoiser U-Net
            (:class:`medfusion.nets.unet.DiffusionUNet`); ``unet_kwargs`` are passed on to it.
        schedule: noise schedule kind (``linear``, ``scaled_linear``, ``cosine``); ``num_train_timesteps`` T.
        prediction: network target (``epsilon``, ``v``, ``x0``).
        residual: in conditional mode diffuse ``r * (z_std - z_src)`` instead of ``z_std``.
        regression: conditional mode with ``residual``: a regression U-Net learns the conditional mean of the scaled
            residual and the DDPM models what is left (CorrDiff; module docstring).
        regression_channels: channels per level of the regression U-Net (MONAI ``UNet``, stride 2 between levels).
        regression_rescale_step: with ``regression``, the training step at which the DDPM's target
            ``r (z_std - z_src) - mu`` is rescaled to unit variance (``s = 1 / std``, all-reduced across ranks, set
            once and saved with the model); None = off (``s = 1``). ``r`` is fixed on the first batch, when ``mu = 0``,
            so the DDPM's data shrink as ``mu`` learns; CorrDiff normalises the residual after training the
            regression, this does it once the regression has had ``regression_rescale_step`` steps. Sampling
            returns ``x0 / s + mu``. Measured (bench/results/diffusion_ct_bench_regression.md, run 6, k = 1000 of
            4,000 steps): the posterior mean unchanged, the sample noisier (texture CCC 0.39 vs 0.46): hence off.
        regression_lr: AdamW learning rate of the regression U-Net (None = ``lr``; the cosine decay ends at 5% of
            ``lr`` for both).
        pixel_shuffle: ``k`` channel-to-space steps (``PixelShuffle(2)`` in the autoencoder's channel order) applied to
            the latent before the denoiser and the regression U-Net (and undone on their outputs): the networks then
            run on a ``2^k`` times finer grid with ``C_lat / 2^(d k)`` channels. With the lossless shortcut latent (16
            channels at f = 4, 2D) ``k = 2`` puts them on the image grid: our addition, because a 64-channel
            network at f = 4 has 4 channels per pixel for what is a per-pixel texture task (measured: the regression
            alone reached 36.6 dB on the latent grid and 39.3 dB on the image grid, same steps; the DDPM 35.7 and
            39.0 dB; module docstring).
        min_snr_gamma: Min-SNR loss weighting (Hang et al. 2023), None = off.
        sampler, num_inference_steps, timestep_spacing: defaults used by :meth:`standardize`.
        decode: ``"latent"`` (output ``D(z_hat)``, the paper) or ``"residual"`` (output ``x + D(z_hat) - D(E(x))``;
            see the module docstring); :meth:`standardize` can override it per call.
        residual_sigma: with ``decode="residual"``, keep only the Gaussian low-pass (SD in pixels) of the
            autoencoder's error ``x - D(E(x))`` (0 = all of it).
        translate_strength: fraction of T to which the source latent is noised in translate mode.
        lr, weight_decay: AdamW; ema_decay: decay of the EMA copy used for sampling (None = no EMA).
        val_num_samples: slices sampled per validation epoch on rank 0 for PSNR/SSIM.
        seed: seed of validation sampling.
    """

    def __init__(
        self,
        autoencoder: str | None = None,
        mode: Literal["conditional", "translate"] = "conditional",
        channels: tuple[int, ...] = (64, 128),
        attention_levels: tuple[bool, ...] = (False, True),
        num_res_blocks: int = 1,
        num_head_channels: int = 32,
        unet_kwargs: dict[str, Any] | None = None,
        schedule: str = "linear",
        num_train_timesteps: int = 1000,
        prediction: str = "v",
        residual: bool = True,
        regression: bool = False,
        regression_channels: tuple[int, ...] = (64, 128, 256),
        regression_lr: float | None = None,
        regression_rescale_step: int | None = None,
        pixel_shuffle: int = 0,
        min_snr_gamma: float | None = None,
        sampler: str = "dpmpp_2m",
        num_inference_steps: int = 20,
        timestep_spacing: str = "trailing",
        translate_strength: float = 0.5,
        decode: Literal["latent", "residual"] = "latent",
        residual_sigma: float = 0.0,
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        ema_decay: float | None = 0.999,
        val_num_samples: int = 4,
        seed: int = 0,
        autoencoder_config: dict[str, Any] | None = None,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if not 0.0 <= translate_strength <= 1.0:
            raise ValueError(f"translate_strength must be in [0, 1], got {translate_strength}")
        if decode not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {decode!r}")
        if residual_sigma < 0:
            raise ValueError(f"residual_sigma must be >= 0 (pixels), got {residual_sigma}")
        if regression and not (mode == "conditional" and residual):
            raise ValueError(
                "regression=True needs mode='conditional' and residual=True (it learns the mean of z_std - z_src)"
            )
        if regression and len(regression_channels) < 2:
            raise ValueError(
                f"regression_channels needs at least two levels, got {tuple(regression_channels)}"
            )
        if regression_rescale_step is not None and (not regression or regression_rescale_step < 0):
            raise ValueError(
                "regression_rescale_step needs regression=True and a step >= 0 (None = off), "
                f"got {regression_rescale_step} with regression={regression}"
            )
        if pixel_shuffle < 0:
            raise ValueError(f"pixel_shuffle must be >= 0, got {pixel_shuffle}")
        from medfusion.diffusion.gaussian import PREDICTIONS
        from medfusion.diffusion.samplers import SAMPLERS
        from medfusion.diffusion.schedules import SPACINGS

        for name, value, valid in (
            ("prediction", prediction, PREDICTIONS),
            ("sampler", sampler, tuple(SAMPLERS)),
            ("timestep_spacing", timestep_spacing, SPACINGS),
        ):
            if value not in valid:
                raise ValueError(f"{name} must be one of {', '.join(valid)}; got {value!r}")
        self.save_hyperparameters()
        from medfusion.models.export import build_from_config, load_model, module_config

        if autoencoder_config is not None:
            ae = build_from_config(autoencoder_config)
        elif autoencoder is not None:
            ae = load_model(autoencoder)
        else:
            raise ValueError(
                "DiffusionCT needs the trained stage 1: pass autoencoder=PATH (.ckpt or export folder)"
            )
        if not isinstance(ae, DiffusionCTAutoencoder):
            raise ValueError(f"autoencoder must be a DiffusionCTAutoencoder, got {type(ae).__name__}")
        self.hparams["autoencoder_config"] = module_config(ae)
        self.autoencoder = ae
        self.autoencoder.requires_grad_(False)
        self.autoencoder.eval()

        from medfusion.diffusion.schedules import NoiseSchedule
        from medfusion.nets.unet import DiffusionUNet

        self.spatial_dims = int(ae.hparams.spatial_dims)
        c_lat = int(ae.hparams.latent_channels)
        per_step = 2**self.spatial_dims
        if c_lat % per_step**pixel_shuffle:
            raise ValueError(
                f"pixel_shuffle={pixel_shuffle} needs latent_channels divisible by {per_step**pixel_shuffle} "
                f"({per_step} per step in {self.spatial_dims}D); the autoencoder has {c_lat}"
            )
        c_net = c_lat // per_step**pixel_shuffle
        self.net = DiffusionUNet(
            spatial_dims=self.spatial_dims,
            in_channels=c_net,
            out_channels=c_net,
            cond_channels=c_net if mode == "conditional" else 0,
            channels=tuple(channels),
            attention_levels=tuple(attention_levels),
            num_res_blocks=num_res_blocks,
            num_head_channels=num_head_channels,
            **(unet_kwargs or {}),
        )
        self.regressor: nn.Module | None = None
        if regression:
            self.regressor = GatedUNet(self.spatial_dims, c_lat, tuple(regression_channels), pixel_shuffle)
        self.schedule = NoiseSchedule.create(kind=schedule, num_train_timesteps=num_train_timesteps)
        self.ema: nn.Module | None = None
        if ema_decay is not None:
            from torch.optim.swa_utils import AveragedModel

            from medfusion.models.callbacks import EMAAvgFn

            # EMAAvgFn, not torch's closure: ddp_spawn pickles the module (tested)
            self.ema = AveragedModel(self.net, multi_avg_fn=EMAAvgFn(ema_decay), use_buffers=True)
            self.ema.requires_grad_(False)
        # r = 1 / std(z_std - z_src): calibrated on the first training batch (0 = not yet)
        self.register_buffer("residual_scale", torch.zeros(()))
        if regression_rescale_step is not None:
            # s = 1 / std(r (z_std - z_src) - mu): set once, at that step (0 = not yet; the DDPM then sees s = 1)
            self.register_buffer("dm_scale", torch.zeros(()))
        self._train_rng = StepRNG()  # base seed = the experiment's seed_everything seed

    # -------------------------------------------------------------------------------- helpers
    def train(self, mode: bool = True):  # the frozen stage 1 always stays in eval mode
        super().train(mode)
        self.autoencoder.eval()
        return self

    @property
    def hu_window(self) -> tuple[float, float]:
        """HU window of the training data (from the stage-1 autoencoder)."""
        return self.autoencoder.hu_window

    @property
    def uses_residual(self) -> bool:
        return self.hparams.mode == "conditional" and bool(self.hparams.residual)

    @property
    def divisible_by(self) -> int:
        """Input spatial sizes must be multiples of this (autoencoder and denoiser downsampling)."""
        levels = len(self.hparams.channels)
        if self.regressor is not None:
            levels = max(levels, len(self.hparams.regression_channels))
        # the networks run on a 2^k finer grid than the latent (pixel_shuffle = k)
        return self.autoencoder.downsample_factor * 2 ** max(0, levels - 1 - self.hparams.pixel_shuffle)

    def _denoise(self, net: nn.Module, x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
        """The denoiser on the latent grid, or on the ``2^k`` finer one (``pixel_shuffle = k``)."""
        k = self.hparams.pixel_shuffle
        if k == 0:
            return net(x_t, t, cond)
        up = lambda v: nets.pixel_shuffle(v, k)  # noqa: E731
        return nets.pixel_unshuffle(net(up(x_t), t, None if cond is None else up(cond)), k)

    def _denoiser(self, use_ema: bool = True) -> nn.Module:
        if use_ema and self.ema is not None and int(self.ema.n_averaged) > 0:
            return self.ema.module
        return self.net

    def _training_images(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        """``(source, standard)`` images of a batch. Conditional mode needs pairs (``source`` + ``target``); translate
        mode needs only standard-protocol scans, under ``target`` (a paired manifest) or ``image`` (an ``image``-task
        manifest of standard scans, the unpaired case), and returns ``source = None``."""
        if self.hparams.mode == "translate":
            for k in (keys.TARGET, keys.IMAGE):
                if k in batch:
                    return None, batch[k]
            raise ValueError(
                f"translate mode trains on standard-protocol scans under {keys.TARGET!r} or {keys.IMAGE!r}; "
                f"the batch has {sorted(batch)}"
            )
        if keys.SOURCE not in batch or keys.TARGET not in batch:
            raise ValueError(
                f"conditional mode trains on pairs ({keys.SOURCE!r} + {keys.TARGET!r}, a standardize manifest); "
                f"the batch has {sorted(batch)}; for standard scans alone use mode='translate'"
            )
        return batch[keys.SOURCE], batch[keys.TARGET]

    @torch.no_grad()
    def _latents(self, batch: dict[str, Any]) -> tuple[Tensor | None, Tensor]:
        src, tgt = self._training_images(batch)
        z_tgt, _ = self.autoencoder.encode_latent(tgt)
        z_src = None if src is None else self.autoencoder.encode_latent(src)[0]
        return z_src, z_tgt

    @torch.no_grad()
    def _inverse_std(self, x: Tensor) -> Tensor:
        """``1 / std(x)`` over the batch, its variance averaged over DDP ranks (one value everywhere)."""
        var = x.detach().float().var()
        trainer = self._trainer  # None outside Lightning
        if trainer is not None and trainer.world_size > 1:
            var = trainer.strategy.reduce(var, reduce_op="mean")
        return var.clamp_min(1e-12).rsqrt()

    def _calibrate_residual(self, z_src: Tensor, z_tgt: Tensor) -> None:
        self.residual_scale.copy_(self._inverse_std(z_tgt - z_src))

    @property
    def _dm_scale(self) -> Tensor | float:
        """Scale of the DDPM's target after the regression (``regression_rescale_step``; 1 when off or not set)."""
        scale = getattr(self, "dm_scale", None)
        if scale is None:
            return 1.0
        return torch.where(scale > 0, scale, torch.ones_like(scale))  # no host sync in the training step

    def diffusion_target(
        self, z_src: Tensor, z_tgt: Tensor, mean: Tensor | None = None
    ) -> tuple[Tensor, Tensor | None]:
        """Clean sample ``x0`` that the DDPM models and its condition, per mode (module docstring); ``mean`` is the
        regression U-Net's output (``regression=True``), subtracted from the scaled residual."""
        if self.hparams.mode == "translate":
            return z_tgt, None
        if self.uses_residual:
            x0 = (z_tgt - z_src) * self.residual_scale
            return (x0 if mean is None else (x0 - mean) * self._dm_scale), z_src
        return z_tgt, z_src

    def losses(
        self, batch: dict[str, Any], generator: torch.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(diffusion, regression)`` losses on one batch: the DDPM loss (Ho et al. 2020, eq. 14; ``prediction``
        picks the target) and, with ``regression=True``, the regression U-Net's MSE to the scaled residual
        (CorrDiff; 0 otherwise)."""
        from medfusion.diffusion.gaussian import diffusion_loss, q_sample

        z_src, z_tgt = self._latents(batch)
        if self.uses_residual and self.residual_scale <= 0:
            self._calibrate_residual(z_src, z_tgt)
        reg_loss = z_tgt.new_zeros(())
        mean = None
        if self.regressor is not None:
            mean = self.regressor(z_src)
            reg_loss = F.mse_loss(mean, (z_tgt - z_src) * self.residual_scale)
            mean = mean.detach()  # the DDPM's target does not train the regression (CorrDiff)
            step = self.hparams.regression_rescale_step
            if step is not None and self.training and self._trainer is not None and self.global_step >= step:
                if self.dm_scale <= 0:
                    self.dm_scale.copy_(self._inverse_std((z_tgt - z_src) * self.residual_scale - mean))
        x0, cond = self.diffusion_target(z_src, z_tgt, mean)
        dev = generator.device if generator is not None else x0.device
        t = torch.randint(
            0, self.hparams.num_train_timesteps, (x0.shape[0],), generator=generator, device=dev
        )
        noise = torch.randn(x0.shape, generator=generator, device=dev, dtype=x0.dtype)
        t, noise = t.to(x0.device), noise.to(x0.device)
        x_t = q_sample(x0, t, noise, self.schedule)
        out = self._denoise(self.net, x_t, t, cond)
        dm_loss = diffusion_loss(
            out,
            x0,
            noise,
            t,
            self.schedule,
            self.hparams.prediction,
            min_snr_gamma=self.hparams.min_snr_gamma,
        )
        return dm_loss, reg_loss

    def loss(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Training objective on one batch: the sum of :meth:`losses`."""
        dm_loss, reg_loss = self.losses(batch, generator)
        return dm_loss + reg_loss

    # -------------------------------------------------------------------------------- Lightning hooks
    def on_train_start(self) -> None:
        # different diffusion noise / timesteps on every rank (user_asks §0.13)
        if self.trainer.world_size > 1:
            torch.manual_seed(int(torch.initial_seed()) + 7919 * self.global_rank)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        x = self._training_images(batch)[1]
        gen = self._train_rng.generator(self, batch_idx, x.device)
        dm_loss, reg_loss = self.losses(batch, generator=gen)
        bs = x.shape[0]
        self.log("train/loss", dm_loss + reg_loss, prog_bar=True, batch_size=bs)
        if self.regressor is not None:
            self.log("train/regression_loss", reg_loss, batch_size=bs)
        return dm_loss + reg_loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # EMA right after the weights change (once per optimiser step) and before any on_train_batch_end callback:
        # ModelCheckpoint writes there, so a checkpoint of step k holds the EMA of step k (user_asks §0.12)
        if self.ema is not None:
            self.ema.update_parameters(self.net)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        bs = self._training_images(batch)[1].shape[0]
        gen = torch.Generator().manual_seed(self.hparams.seed + batch_idx)
        self.log("val/loss", self.loss(batch, generator=gen), batch_size=bs, sync_dist=True)
        paired = keys.SOURCE in batch and keys.TARGET in batch  # unpaired translate data: no PSNR to report
        if paired and batch_idx == 0 and self.global_rank == 0 and self.hparams.val_num_samples > 0:
            from monai.metrics import PSNRMetric, SSIMMetric

            n = min(self.hparams.val_num_samples, bs)
            out = self.standardize(
                batch[keys.SOURCE][:n], generator=torch.Generator().manual_seed(self.hparams.seed)
            )
            ref = batch[keys.TARGET][:n]
            psnr = PSNRMetric(max_val=2.0)(out.clamp(-1, 1), ref).mean()
            ssim = SSIMMetric(spatial_dims=self.spatial_dims, data_range=2.0, win_size=7)(
                out.clamp(-1, 1), ref
            ).mean()
            self.log("val/psnr", psnr, prog_bar=True, rank_zero_only=True, batch_size=n)
            self.log("val/ssim", ssim, rank_zero_only=True, batch_size=n)

    def configure_optimizers(self):
        groups: list[dict[str, Any]] = [{"params": list(self.net.parameters())}]
        if self.regressor is not None:
            reg_lr = self.hparams.regression_lr
            groups.append({"params": list(self.regressor.parameters()), "lr": reg_lr or self.hparams.lr})
        opt = torch.optim.AdamW(groups, lr=self.hparams.lr, weight_decay=self.hparams.weight_decay)
        return _with_cosine(self, opt)

    # -------------------------------------------------------------------------------- inference
    @torch.no_grad()
    def standardize(
        self,
        images: Tensor,
        *,
        num_steps: int | None = None,
        sampler: str | None = None,
        strength: float | None = None,
        generator: torch.Generator | None = None,
        use_ema: bool = True,
        decode: str | None = None,
        residual_sigma: float | None = None,
        mean_only: bool = False,
        noise: Tensor | None = None,
    ) -> Tensor:
        """Standardize ``images`` ``(B, 1, *spatial)`` in [-1, 1] (HU window of training) -> same shape and range.

        Spatial sizes must be multiples of :attr:`divisible_by` (``medfusion.apps.volume_job`` pads for you).
        ``generator`` (CPU) makes the result reproducible; ``strength`` overrides ``translate_strength`` (translate
        mode runs ``min(num_steps, t_start + 1)`` steps from ``t_start = round(strength * (T - 1))``); ``decode``
        overrides the ``decode`` hyperparameter (``"latent"`` or ``"residual"``), ``residual_sigma`` the low-pass of the
        residual (pixels; 0 = none). ``mean_only`` (``regression=True`` only) skips the DDPM and decodes the
        regression's conditional-mean latent ``z_src + mu(z_src) / r``: the MMSE estimate, without the standard's
        texture. ``noise`` (shape of the source latent, :meth:`latent_shape`) replaces the sampler's initial noise
        draw (translate mode: the noise of ``q(x_t | x_0)``): sliding windows of one volume pass crops of one shared
        field, so overlapping windows start from the same noise and blending keeps the sample's texture (with an
        ODE sampler the initial noise is the only randomness).
        """
        from medfusion.diffusion.gaussian import q_sample
        from medfusion.diffusion.samplers import sample
        from medfusion.diffusion.schedules import timesteps as make_timesteps

        hp = self.hparams
        if images.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected (B, C, *spatial) with {self.spatial_dims} spatial dims, got shape {tuple(images.shape)}"
            )
        bad = [s for s in images.shape[2:] if s % self.divisible_by]
        if bad:
            raise ValueError(
                f"spatial sizes {tuple(images.shape[2:])} must be multiples of {self.divisible_by}"
            )
        how = hp.get("decode", "latent") if decode is None else decode
        if how not in DECODES:
            raise ValueError(f"decode must be one of {DECODES}, got {how!r}")
        sigma = float(hp.get("residual_sigma", 0.0) if residual_sigma is None else residual_sigma)
        if sigma < 0:
            raise ValueError(f"residual_sigma must be >= 0 (pixels), got {sigma}")
        if mean_only and self.regressor is None:
            raise ValueError("mean_only=True needs a model trained with regression=True")
        was_training = self.training
        self.eval()
        steps = int(num_steps or hp.num_inference_steps)
        name = sampler or hp.sampler
        net = self._denoiser(use_ema)
        x = images.to(self.device, self.dtype)
        z_src, skips = self.autoencoder.encode_latent(x)

        def model(x_t: Tensor, t: Tensor, cond: Tensor | None) -> Tensor:
            return self._denoise(net, x_t, t, cond)

        def randn(shape: torch.Size) -> Tensor:
            dev = "cpu" if generator is not None else z_src.device
            return torch.randn(shape, generator=generator, device=dev).to(z_src.device, z_src.dtype)

        if noise is not None and tuple(noise.shape) != tuple(z_src.shape):
            raise ValueError(
                f"noise must have the latent's shape {tuple(z_src.shape)}, got {tuple(noise.shape)}"
            )
        first = (
            (lambda: noise.to(z_src.device, z_src.dtype))
            if noise is not None
            else (lambda: randn(z_src.shape))
        )

        T = hp.num_train_timesteps
        if hp.mode == "translate":
            s = hp.translate_strength if strength is None else float(strength)
            if not 0.0 <= s <= 1.0:
                raise ValueError(f"strength must be in [0, 1], got {s}")
            t_start = int(round(s * (T - 1)))
            if t_start <= 0:
                z = z_src
            else:
                # SDEdit from t_start needs at most t_start + 1 network evaluations (documented cap)
                n = min(steps, t_start + 1)
                ts = make_timesteps(n, hp.timestep_spacing, T, t_start=t_start).to(z_src.device)
                t0 = torch.full((z_src.shape[0],), int(ts[0]), device=z_src.device, dtype=torch.long)
                x_t = q_sample(z_src, t0, first(), self.schedule)
                z = sample(
                    name,
                    model,
                    x_t,
                    ts,
                    schedule=self.schedule,
                    prediction=hp.prediction,
                    generator=generator,
                )
        else:
            if self.uses_residual and self.residual_scale <= 0:
                raise RuntimeError(
                    "residual_scale is not calibrated: train the model (or call loss() on a batch) first"
                )
            mean = self.regressor(z_src) if self.regressor is not None else None
            if mean_only:
                x0 = mean
            else:
                ts = make_timesteps(steps, hp.timestep_spacing, T).to(z_src.device)
                x0 = sample(
                    name,
                    model,
                    first(),
                    ts,
                    schedule=self.schedule,
                    prediction=hp.prediction,
                    cond=z_src,
                    generator=generator,
                )
                if mean is not None:
                    x0 = x0 / self._dm_scale + mean
            z = z_src + x0 / self.residual_scale if self.uses_residual else x0
        out = self.autoencoder.decode_latent(z, skips)
        if how == "residual":  # y = D(z_hat) + G_s * (x - D(E(x))) (module docstring; s = 0: no low-pass)
            error = x - self.autoencoder.decode_latent(z_src, skips)
            if sigma > 0:
                from monai.networks.layers import GaussianFilter

                error = GaussianFilter(self.spatial_dims, sigma).to(error.device)(error)
            out = out + error
        self.train(was_training)
        return out

    def latent_shape(self, image_shape: Sequence[int]) -> tuple[int, ...]:
        """Shape of the latent of images ``(B, C, *spatial)`` (spatial sizes multiples of :attr:`divisible_by`)."""
        f = self.autoencoder.downsample_factor
        c = int(self.autoencoder.hparams.latent_channels)
        return (int(image_shape[0]), c, *(int(s) // f for s in image_shape[2:]))

    def forward(self, images: Tensor) -> Tensor:
        return self.standardize(images)

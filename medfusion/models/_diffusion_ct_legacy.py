"""Loading DiffusionCT stage-2 models exported by medfusion 0.1, whose constructor took flat arguments.

0.2 grouped them (``denoiser``, ``regression``, ``sampling``), removed ``regression_rescale_step`` (the measurement
that tested it is on docs/methods/diffusion_ct.md) and put the networks of ``pixel_shuffle`` models inside
:class:`medfusion.nets.latent_grid.ImageGrid`. Stage 1's own changes are :meth:`DiffusionCTAutoencoder.upgrade_config`
and ``upgrade_state_dict`` (called for the nested ``autoencoder_config`` when it is built).
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

_DENOISER = {"channels": "channels", "attention_levels": "attention_levels", "num_res_blocks": "num_res_blocks",
             "num_head_channels": "num_head_channels"}  # fmt: skip
_UNET_KWARGS = ("norm_num_groups", "resblock_updown")  # the DiffusionUNet arguments DenoiserConfig has
_SAMPLING = {"sampler": "sampler", "num_inference_steps": "num_steps", "timestep_spacing": "timestep_spacing",
             "translate_strength": "strength", "decode": "decode", "residual_sigma": "residual_sigma"}  # fmt: skip
_FLAT = (*_DENOISER, "unet_kwargs", *_SAMPLING, "regression_channels", "regression_lr", "regression_rescale_step")


def upgrade_v01_stage2_config(init_args: dict[str, Any]) -> dict[str, Any]:
    """0.1's flat init args -> 0.2's groups; unchanged when none of the flat names is present."""
    args = dict(init_args)
    if not any(k in args for k in _FLAT) and not isinstance(args.get("regression"), bool):
        return args  # 0.2's format (its "regression" is a mapping or None, 0.1's a bool)
    step = args.pop("regression_rescale_step", None)
    if step is not None:
        raise ValueError(
            "regression_rescale_step was removed in medfusion 0.2 (it did not pay, see docs/methods/diffusion_ct.md); "
            f"this model was trained with it set to {step}: retrain without it"
        )
    denoiser = {new: args.pop(old) for old, new in _DENOISER.items() if old in args}
    extra = dict(args.pop("unet_kwargs", None) or {})
    other = sorted(set(extra) - set(_UNET_KWARGS))
    if other:
        raise ValueError(
            f"unet_kwargs {other} cannot be expressed in medfusion 0.2's DenoiserConfig (it has "
            f"{', '.join(_UNET_KWARGS)} besides the U-Net's levels): retrain with those"
        )
    args["denoiser"] = {**denoiser, **extra}
    sampling = {new: args.pop(old) for old, new in _SAMPLING.items() if old in args}
    args["sampling"] = sampling
    on = bool(args.pop("regression", False))
    reg = {"channels": args.pop("regression_channels", None), "lr": args.pop("regression_lr", None)}
    args["regression"] = {k: v for k, v in reg.items() if v is not None} if on else None
    return args


def upgrade_v01_stage2_state(module: Any, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """0.1 key names -> 0.2's for a :class:`medfusion.models.diffusion_ct.DiffusionCT` ``module``."""
    ae = {k[len("autoencoder.") :]: v for k, v in state.items() if k.startswith("autoencoder.")}
    out = {k: v for k, v in state.items() if not k.startswith("autoencoder.")}
    out.update({f"autoencoder.{k}": v for k, v in module.autoencoder.upgrade_state_dict(ae).items()})
    if not module.hparams.pixel_shuffle:
        return out
    renamed = {}
    for k, v in out.items():
        for prefix in ("net.", "ema.module.", "regressor."):
            if k.startswith(prefix) and not k.startswith(prefix + "net."):
                k = prefix + "net." + k[len(prefix) :]  # the network now sits inside ImageGrid (.net)
                break
        renamed[k] = v
    return renamed

"""How the files of this folder were made: tiny DiffusionCT models exported by medfusion 0.1.0 (before issue 17
regrouped the constructors), and their outputs on a fixed input. Kept as a record; it runs only against 0.1.0's
``medfusion.models.diffusion_ct`` (``git show a6a28f8:medfusion/models/diffusion_ct.py``).

    python tests/models/data/legacy_v0_1/make_legacy.py
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from medfusion import keys
from medfusion.models.diffusion_ct import DiffusionCT, DiffusionCTAutoencoder
from medfusion.models.export import export_model

HERE = Path(__file__).parent


def main() -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.rand(4, 1, 16, 16, generator=g) * 1.2 - 0.8
    source = target + 0.2 * torch.randn(target.shape, generator=g)
    batch = {keys.SOURCE: source, keys.TARGET: target}
    x = source[:2]
    expected: dict[str, torch.Tensor] = {"input": x}

    # stage 1, MONAI AutoencoderKL (no skips)
    torch.manual_seed(0)
    kl = DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    kl.calibrate_latent_scale([batch])
    export_model(kl.eval(), HERE / "stage1_kl", overwrite=True)
    expected["stage1_kl"] = kl.reconstruct(x).detach()

    # stage 1, our skip autoencoder with DC-AE shortcuts and the full-resolution skip dropped
    torch.manual_seed(1)
    skip = DiffusionCTAutoencoder(
        spatial_dims=2, channels=(8, 16, 16), latent_channels=4, norm_num_groups=4, skip_connections=True,
        skip_from_level=1, shortcuts=True,
    )  # fmt: skip
    skip.calibrate_latent_scale([batch])
    export_model(skip.eval(), HERE / "stage1_skip", overwrite=True)
    stage1_skip = HERE / "stage1_skip"

    # stage 2, conditional + regression + pixel shuffle + residual decoding, on the skip autoencoder
    torch.manual_seed(2)
    reg = DiffusionCT(
        autoencoder=str(stage1_skip), mode="conditional", channels=(8, 16), attention_levels=(False, False),
        num_head_channels=8, unet_kwargs={"norm_num_groups": 4}, regression=True, regression_channels=(4, 8),
        regression_lr=1e-3, pixel_shuffle=1, num_inference_steps=3, decode="residual", residual_sigma=0.5,
        ema_decay=0.9, val_num_samples=0,
    )  # fmt: skip
    reg.loss(batch)  # calibrates the residual scale
    with torch.no_grad():
        reg.regressor.gate.fill_(0.3)
    reg.ema.update_parameters(reg.net)
    export_model(reg.eval(), HERE / "stage2_regression", overwrite=True)
    expected["stage2_regression"] = reg.standardize(x, generator=torch.Generator().manual_seed(0))
    expected["stage2_regression_mean"] = reg.standardize(x, mean_only=True)

    # stage 2, translate mode (SDEdit) on the AutoencoderKL, latent decoding
    torch.manual_seed(3)
    tr = DiffusionCT(
        autoencoder=str(HERE / "stage1_kl"), mode="translate", channels=(8, 16), attention_levels=(False, True),
        num_head_channels=8, unet_kwargs={"norm_num_groups": 4}, residual=False, translate_strength=0.4,
        num_inference_steps=3, ema_decay=None, val_num_samples=0, sampler="ddim",
    )  # fmt: skip
    export_model(tr.eval(), HERE / "stage2_translate", overwrite=True)
    expected["stage2_translate"] = tr.standardize(x, generator=torch.Generator().manual_seed(0))

    save_file({k: v.contiguous() for k, v in expected.items()}, str(HERE / "expected.safetensors"))


if __name__ == "__main__":
    main()

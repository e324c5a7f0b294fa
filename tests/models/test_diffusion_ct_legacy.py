"""Models exported by medfusion 0.1 (flat DiffusionCT constructors) load in this version and give the outputs they
gave when exported; removed options in use are refused with a message that names the change.

The exports and their recorded outputs are in tests/models/data/legacy_v0_1 (made by make_legacy.py there, with
0.1's code): a stage 1 with MONAI's AutoencoderKL, one with the skip autoencoder and DC-AE shortcuts, a conditional
stage 2 with regression, pixel shuffle and residual decoding, and a translate-mode stage 2.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, DiffusionCTAutoencoder, SamplingConfig
from medfusion.models.export import build_from_config, export_model, load_model, module_config

DATA = Path(__file__).parent / "data" / "legacy_v0_1"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(str(DATA / "expected.safetensors"))


def test_stage1_exports_load_and_reconstruct_as_recorded(expected):
    x = expected["input"]
    kl = load_model(DATA / "stage1_kl")
    assert kl.hparams.architecture == "kl" and kl.adversarial is None
    torch.testing.assert_close(kl.reconstruct(x), expected["stage1_kl"], rtol=0, atol=1e-5)  # float sums differ with the thread count
    skip = load_model(DATA / "stage1_skip")
    assert skip.hparams.architecture == "skip" and skip.hparams.skip_from_level == 1 and skip.hparams.shortcuts


def test_stage2_exports_load_and_standardize_as_recorded(expected):
    x = expected["input"]
    reg = load_model(DATA / "stage2_regression")
    assert reg.regression.channels == (4, 8) and reg.hparams.pixel_shuffle == 1
    assert reg.sampling.decode == "residual" and reg.sampling.num_steps == 3
    out = reg.restore(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected["stage2_regression"], rtol=0, atol=1e-5)
    torch.testing.assert_close(reg.restore(x, mean_only=True), expected["stage2_regression_mean"], rtol=0, atol=1e-5)
    tr = load_model(DATA / "stage2_translate")
    assert tr.sampling.sampler == "ddim" and tr.sampling.strength == 0.4 and tr.ema is None
    out = tr.restore(x, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, expected["stage2_translate"], rtol=0, atol=1e-5)


def test_upgraded_model_exports_in_the_new_format(tmp_path, expected):
    """Loading an old export and exporting it again writes the grouped init args (plain YAML), which load as is."""
    reg = load_model(DATA / "stage2_regression")
    export_model(reg, tmp_path / "again")
    cfg = yaml.safe_load((tmp_path / "again" / "config.yaml").read_text())
    args = cfg["init_args"]
    assert "regression_channels" not in args and args["regression"] == {"channels": [4, 8], "lr": 0.001}
    assert args["sampling"]["decode"] == "residual" and args["denoiser"]["norm_num_groups"] == 4
    assert args["autoencoder_config"]["init_args"]["architecture"] == "skip"
    again = load_model(tmp_path / "again")
    x = expected["input"]
    torch.testing.assert_close(again.restore(x, mean_only=True), expected["stage2_regression_mean"], rtol=0, atol=1e-5)


def _old_config(name: str) -> dict:
    return yaml.safe_load((DATA / name / "config.yaml").read_text())


@pytest.mark.parametrize(
    "change, match",
    [
        ({"cross_skips": True}, "cross_skips was removed"),
        ({"skip_dropout": 0.5}, "skip_dropout was removed"),
    ],
)
def test_removed_stage1_variants_are_refused_by_name(change, match):
    cfg = _old_config("stage1_skip")
    cfg["init_args"].update(change)
    with pytest.raises(ValueError, match=match):
        build_from_config(cfg)


def test_removed_stage2_options_are_refused_by_name():
    cfg = _old_config("stage2_translate")
    cfg["init_args"]["regression_rescale_step"] = 1000
    with pytest.raises(ValueError, match="regression_rescale_step was removed.*1000"):
        build_from_config(cfg)
    cfg = _old_config("stage2_translate")
    cfg["init_args"]["unet_kwargs"] = {"num_class_embeds": 3}
    with pytest.raises(ValueError, match="num_class_embeds"):
        build_from_config(cfg)


def test_old_adversarial_arguments_map_to_the_group():
    args = DiffusionCTAutoencoder.upgrade_config(
        {"skip_connections": False, "adv_weight": 0.1, "adv_start_step": 5, "disc_channels": 8, "disc_layers": 3,
         "disc_lr": None, "cross_skips": False, "skip_dropout": 0.0, "skip_from_level": 0}
    )  # fmt: skip
    assert args == {
        "architecture": "kl",
        "adversarial": {"weight": 0.1, "start_step": 5, "disc_channels": 8, "disc_layers": 3, "disc_lr": None},
    }
    off = DiffusionCTAutoencoder.upgrade_config({"adv_weight": 0.0, "adv_start_step": 0})
    assert off == {"adversarial": None}


def test_new_config_round_trips_through_module_config(tmp_path):
    """The grouped init args are stored as plain mappings (YAML, weights-only checkpoints) and rebuild the model."""
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    export_model(ae, tmp_path / "ae")
    model = DiffusionCT(
        autoencoder=str(tmp_path / "ae"), denoiser=DenoiserConfig(channels=(8, 16), num_head_channels=8, norm_num_groups=4),
        sampling=SamplingConfig(num_steps=2, decode="residual"), ema_decay=None,
    )  # fmt: skip
    cfg = module_config(model)
    assert yaml.safe_load(yaml.safe_dump(cfg)) == cfg
    rebuilt = build_from_config(cfg)
    assert rebuilt.denoiser == model.denoiser and rebuilt.sampling == model.sampling
    assert DiffusionCT.upgrade_config(dict(cfg["init_args"])) == cfg["init_args"]  # the new format is left alone

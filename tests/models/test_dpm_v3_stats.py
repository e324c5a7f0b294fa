"""DPM-Solver-v3 for DiffusionCT stage 2: statistics computed for an export, stored with it, loaded by load_model,
and sampler "dpm_v3" selectable (tiny, CPU, seeded)."""

from __future__ import annotations

import pytest
import torch

from medfusion import keys
from medfusion.models.diffusion_ct import DenoiserConfig, DiffusionCT, DiffusionCTAutoencoder, SamplingConfig
from medfusion.models.dpm_v3_stats import STATS_FILE, compute_model_ems, model_ems
from medfusion.models.export import export_model, load_model

DENOISER = DenoiserConfig(
    channels=(16, 32), attention_levels=(False, True), num_head_channels=8, norm_num_groups=8
)


def _pair(n: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    target = torch.rand((n, 1, 32, 32), generator=g) * 1.2 - 0.8
    return {keys.SOURCE: target + 0.2 * torch.randn(target.shape, generator=g), keys.TARGET: target}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An exported tiny stage 2 (residual conditional mode) with non-zero output weights."""
    torch.manual_seed(0)
    ae = DiffusionCTAutoencoder(spatial_dims=2, channels=(8, 16), latent_channels=2, norm_num_groups=4)
    batch = _pair()
    ae.calibrate_latent_scale([batch])
    root = tmp_path_factory.mktemp("dct")
    export_model(ae, root / "stage1")
    model = DiffusionCT(
        autoencoder=str(root / "stage1"), sampling=SamplingConfig(num_steps=4, timestep_spacing="logsnr"),
        denoiser=DENOISER, ema_decay=None,
    )  # fmt: skip
    model.loss(batch)  # calibrates the residual scale
    with torch.no_grad():  # MONAI zero-initialises the output convolution
        for p in model.net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    export_model(model, root / "stage2")
    return root / "stage2", batch


def test_stats_are_stored_with_the_export_and_loaded(exported):
    folder, batch = exported
    path = compute_model_ems(folder, [batch, _pair(seed=1)], grid_steps=8)
    assert path == folder / STATS_FILE and path.is_file()
    model = load_model(folder)
    stats = model.dpm_v3_stats
    assert stats.l.shape == (8, 2) and torch.isfinite(stats.s).all()  # per latent channel
    assert stats.timesteps.tolist()[0] == 999 and stats.timesteps.tolist()[-1] == 0
    # deterministic: the same batches and seed give the same statistics
    again = model_ems(model, [batch, _pair(seed=1)], grid_steps=8)
    assert all(torch.equal(a, b) for a, b in zip(stats, again))
    with pytest.raises(FileExistsError):
        compute_model_ems(folder, [batch], grid_steps=8)

    x = batch[keys.SOURCE][:2]
    gen = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    out = model.restore(x, generator=gen(), sampler="dpm_v3")
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, model.restore(x, generator=gen(), sampler="dpm_v3"))
    assert not torch.equal(out, model.restore(x, generator=gen(), sampler="dpmpp_2m"))
    assert model.describe(sampler="dpm_v3") == "DiffusionCT standardization, dpm_v3 4 steps, latent decoding"


def test_dpm_v3_without_stats_names_how_to_compute_them(exported, tmp_path):
    folder, batch = exported
    model = DiffusionCT(**{**load_model(folder).hparams, "sampling": {"sampler": "dpm_v3"}})
    assert model.sampling.sampler == "dpm_v3"  # selectable in SamplingConfig
    with pytest.raises(ValueError, match="compute_model_ems"):
        model.restore(batch[keys.SOURCE][:1])
    with pytest.raises(ValueError, match="not an exported model"):
        compute_model_ems(tmp_path, [batch])
    with pytest.raises(ValueError, match="no training batches"):
        model_ems(load_model(folder), [])


def test_command_computes_the_stats_from_the_training_config(exported, tmp_path, capsys):
    """``medfusion dpm-v3-stats`` reads batches through the config's data section and writes the statistics."""
    import shutil

    import yaml

    from medfusion.cli import main
    from medfusion.data.builtin import make_dataset

    folder = shutil.copytree(exported[0], tmp_path / "model", ignore=shutil.ignore_patterns(STATS_FILE))
    m = make_dataset(tmp_path / "data", n_patients=4, dim=2, size=32, protocols=["standard", "sharp"], seed=0,
                     split=(0.5, 0.25, 0.25), progress=False)  # fmt: skip
    config = tmp_path / "stage2.yaml"
    config.write_text(yaml.safe_dump({"data": {
        "class_path": "medfusion.data.datamodule.ManifestDataModule",
        "init_args": {"manifest": str(m["standardize"]), "task": "standardize", "spatial_dims": 2,
                      "roi_size": [32, 32], "batch_size": 2, "crop_foreground": False},
    }}))  # fmt: skip
    args = ["dpm-v3-stats", "--model", str(folder), "--config", str(config), "--num-batches", "1"]
    assert main([*args, "--grid-steps", "4"]) == 0
    assert load_model(folder).dpm_v3_stats.l.shape == (4, 2)
    assert main([*args, "--grid-steps", "4"]) == 2  # exists: nothing overwritten without --overwrite
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and STATS_FILE in err
    assert main(["dpm-v3-stats", "--model", str(folder), "--config", str(tmp_path / "none.yaml")]) == 2
